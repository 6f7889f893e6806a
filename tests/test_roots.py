"""The sample-root policy: what the farm may read, decided before anything is read."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from evalfarm.errors import NotAllowed
from evalfarm.sources import SampleRoots, open_source

from .helpers import write_images


@pytest.fixture
def tree(tmp_path: Path) -> dict[str, Path]:
    """/roots/samples (images), /outside (images), and links from inside the root to outside it."""
    roots, outside = tmp_path / "roots", tmp_path / "outside"
    write_images(roots / "samples", 3, 8, seed=0, brightness=1.0)
    write_images(outside, 3, 8, seed=1, brightness=1.0)
    (roots / "escape").symlink_to(outside, target_is_directory=True)
    mixed = write_images(roots / "mixed", 2, 8, seed=2, brightness=1.0)
    (mixed / "0009.png").symlink_to(outside / "0000.png")
    return {"roots": roots, "outside": outside, "mixed": mixed}


def policy(*roots: object) -> SampleRoots:
    return SampleRoots.parse([str(r) for r in roots])


def test_a_path_inside_a_root_is_allowed(tree):
    policy(tree["roots"]).check(str(tree["roots"] / "samples"))


def test_a_path_outside_every_root_is_refused_naming_the_variable(tree):
    with pytest.raises(NotAllowed, match="EVALFARM_SAMPLE_ROOTS"):
        policy(tree["roots"]).check(str(tree["outside"]))


def test_dot_dot_is_resolved_before_the_check(tree):
    with pytest.raises(NotAllowed):
        policy(tree["roots"]).check(f"{tree['roots']}/samples/../../outside")


def test_a_symlink_out_of_the_root_is_refused(tree):
    with pytest.raises(NotAllowed):
        policy(tree["roots"]).check(str(tree["roots"] / "escape"))


def test_a_sibling_with_the_root_as_name_prefix_is_outside(tmp_path):
    (tmp_path / "samples-evil").mkdir()
    with pytest.raises(NotAllowed):
        policy(tmp_path / "samples").check(str(tmp_path / "samples-evil"))


def test_a_relative_path_is_refused_when_the_check_requires_absolute_paths(tree, monkeypatch):
    monkeypatch.chdir(tree["roots"])
    roots = policy(tree["roots"])
    roots.check("samples")  # a worker resolves it against its own directory
    with pytest.raises(NotAllowed):
        roots.check("samples", require_absolute=True)


def test_no_roots_refuses_every_path(tree):
    with pytest.raises(NotAllowed, match="reads no sample paths until EVALFARM_SAMPLE_ROOTS"):
        SampleRoots.parse([]).check(str(tree["roots"] / "samples"))


def test_unrestricted_allows_anything(tree):
    SampleRoots.unrestricted().check("/etc/passwd")


def test_file_urls_follow_the_local_rules(tree):
    roots = policy(tree["roots"])
    roots.check(f"file://{tree['roots']}/samples")
    for url in (f"file://{tree['outside']}", "file:///etc/passwd", f"file://{tree['roots']}/%2e%2e/outside",
                f"file://otherhost{tree['roots']}/samples"):
        with pytest.raises(NotAllowed):
            roots.check(url)


@pytest.mark.parametrize("url", [
    "http://127.0.0.1:8000/samples/x.npz",
    "https://internal-host/x.npz",
    "memory://samples/x.npz",
    "ftp://host/x.npz",
    "s3://other-bucket/samples/x.npz",
    "s3://team-bucket/samples-evil/x.npz",
    "s3://team-bucket/samples/../private/x.npz",
    "s3://team-bucket/samples/%2e%2e/private/x.npz",
    "s3://team-bucket/samples/x.zip::http://evil/",
    "simplecache::s3://team-bucket/samples/x.npz",
])
def test_urls_outside_a_prefix_or_its_scheme_are_refused(url):
    with pytest.raises(NotAllowed):
        policy("/data/samples", "s3://team-bucket/samples/").check(url)


def test_a_url_inside_its_prefix_is_allowed_whatever_the_case_of_scheme_and_host():
    roots = policy("s3://team-bucket/samples")
    roots.check("s3://team-bucket/samples/run7/120000.npz")
    roots.check("S3://Team-Bucket/samples/run7/")


def test_a_host_reaching_scheme_is_allowed_when_a_root_names_its_prefix():
    policy("https://data.example.org/public/").check("https://data.example.org/public/cifar10.npz")


def test_a_folder_that_links_to_a_file_outside_the_roots_is_refused_before_reading(tree):
    with pytest.raises(NotAllowed, match="0009.png links to a file outside"):
        open_source(str(tree["mixed"]), roots=policy(tree["roots"]))
    assert len(open_source(str(tree["mixed"]))) == 3  # the user's own machine reads it


def test_a_folder_whose_links_stay_inside_the_roots_is_read(tree):
    inner = tree["roots"] / "linked"
    inner.mkdir()
    os.symlink(tree["roots"] / "samples" / "0000.png", inner / "a.png")
    assert len(open_source(str(inner), roots=policy(tree["roots"]))) == 1


def test_a_link_swapped_in_after_the_listing_is_refused_when_read(tree):
    source = open_source(str(tree["roots"] / "samples"), roots=policy(tree["roots"]))
    victim = tree["roots"] / "samples" / "0001.png"
    victim.unlink()
    victim.symlink_to(tree["outside"] / "0001.png")
    source.load(0)
    with pytest.raises(NotAllowed, match="0001.png links to a file outside"):
        source.load(1)


def test_a_nul_byte_is_refused_not_an_error():
    assert not policy("/data/samples").allows("/data/samples/x\x00.npz")


@pytest.mark.parametrize("url", ["memory://samples/x?/../../secret", "local:///etc/passwd"])
def test_query_marks_and_local_urls_open_no_way_out(url):
    with pytest.raises(NotAllowed):
        policy("/data/samples", "memory://samples/").check(url)


@pytest.mark.parametrize("submitted_by,allowed", [(None, True), ("local:ops", True), ("alice", False)])
def test_a_worker_without_roots_reads_only_what_came_straight_through_the_database(submitted_by, allowed):
    from types import SimpleNamespace

    from evalfarm.scheduler.context import Context
    from evalfarm.scheduler.steps import read_policy

    without_roots = Context(sessions=None, store=None, partials=None, roots=None)
    policy_ = read_policy(without_roots, SimpleNamespace(submitted_by=submitted_by))
    assert policy_.allows("/etc/passwd") is allowed
