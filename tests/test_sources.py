"""evalfarm.sources: every kind yields the same images, decoded like torch-fidelity, in the same order."""

from __future__ import annotations

import io
import multiprocessing as mp
import os
import pickle
import shutil
import tarfile
import uuid
import zipfile
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pytest
from PIL import Image

from evalfarm.errors import SourceError
from evalfarm.sources import (
    ArraySource,
    FolderSource,
    Source,
    TarSource,
    ZipSource,
    open_source,
)
from evalfarm.sources.arrays import _RangeReader

N, H, W = 20, 8, 8
KINDS = ["folder", "npz", "npz_compressed", "npy", "tar", "tar_gz", "zip"]


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _tar_bytes(members: dict[str, bytes], mode: str = "w") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _zip_bytes(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def _npz_bytes(save: Any = np.savez, *args: np.ndarray, **kwargs: np.ndarray) -> bytes:
    buf = io.BytesIO()
    save(buf, *args, **kwargs)
    return buf.getvalue()


def _stack(source: Source) -> np.ndarray:
    return np.stack(source.read(0, len(source)))


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, size=(N, H, W, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def sample_sets(tmp_path_factory: pytest.TempPathFactory, images: np.ndarray) -> dict[str, Path]:
    """The same 20 images as every kind; archives are written in reverse order, so sources must sort."""
    root = tmp_path_factory.mktemp("sets")
    pngs = {f"{i:03d}.png": _png(img) for i, img in enumerate(images)}
    folder = root / "folder"
    folder.mkdir()
    for name, data in pngs.items():
        (folder / name).write_bytes(data)
    (folder / "notes.txt").write_text("not an image")
    np.savez(root / "stored.npz", images)
    np.savez_compressed(root / "compressed.npz", images)
    np.save(root / "array.npy", images)
    members = {f"imgs/{name}": data for name, data in reversed(pngs.items())}
    members["imgs/readme.txt"] = b"not an image"
    (root / "images.tar").write_bytes(_tar_bytes(members))
    (root / "images.tar.gz").write_bytes(_tar_bytes(members, "w:gz"))
    members["__MACOSX/imgs/._000.png"] = b"resource fork, not a png"
    (root / "images.zip").write_bytes(_zip_bytes(members))
    return {
        "folder": folder,
        "npz": root / "stored.npz",
        "npz_compressed": root / "compressed.npz",
        "npy": root / "array.npy",
        "tar": root / "images.tar",
        "tar_gz": root / "images.tar.gz",
        "zip": root / "images.zip",
    }


@pytest.fixture
def memfs() -> Any:
    """A private corner of fsspec's process-global memory filesystem."""
    fs = fsspec.filesystem("memory")
    prefix = f"/evalfarm-test-{uuid.uuid4().hex}"
    yield fs, prefix
    if fs.exists(prefix):
        fs.rm(prefix, recursive=True)


# -- every kind, same images ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_reads_the_same_images_in_the_same_order(
    kind: str, sample_sets: dict[str, Path], images: np.ndarray
) -> None:
    np.testing.assert_array_equal(_stack(open_source(str(sample_sets[kind]))), images)


@pytest.mark.parametrize("kind", KINDS)
def test_len_counts_only_images(kind: str, sample_sets: dict[str, Path]) -> None:
    assert len(open_source(str(sample_sets[kind]))) == N


@pytest.mark.parametrize("kind", KINDS)
def test_subrange_read_equals_slice_of_full_read(kind: str, sample_sets: dict[str, Path]) -> None:
    source = open_source(str(sample_sets[kind]))
    full = _stack(source)
    np.testing.assert_array_equal(np.stack(source.read(5, 12)), full[5:12])
    assert source.read(7, 7) == []


@pytest.mark.parametrize("kind", KINDS)
def test_load_returns_one_contiguous_writable_uint8_rgb_image(
    kind: str, sample_sets: dict[str, Path], images: np.ndarray
) -> None:
    image = open_source(str(sample_sets[kind])).load(N - 1)
    assert image.dtype == np.uint8 and image.shape == (H, W, 3)
    assert image.flags.c_contiguous and image.flags.writeable
    assert type(image) is np.ndarray  # never a memmap view of the file
    np.testing.assert_array_equal(image, images[N - 1])


@pytest.mark.parametrize("kind", KINDS)
def test_index_out_of_range_raises_index_error(kind: str, sample_sets: dict[str, Path]) -> None:
    source = open_source(str(sample_sets[kind]))
    with pytest.raises(IndexError):
        source.load(N)
    with pytest.raises(IndexError):
        source.read(0, N + 1)


def test_open_source_picks_the_class_by_kind(sample_sets: dict[str, Path]) -> None:
    expected = {"folder": FolderSource, "npz": ArraySource, "npy": ArraySource, "tar": TarSource}
    expected.update(tar_gz=TarSource, zip=ZipSource, npz_compressed=ArraySource)
    assert {kind: type(open_source(str(path))) for kind, path in sample_sets.items()} == expected


# -- arrays are read by range, not loaded --------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["npz", "npy"])
def test_a_local_array_is_read_by_range_from_its_file_not_loaded(sample_sets: dict[str, Path], kind: str) -> None:
    source = open_source(str(sample_sets[kind]))
    assert isinstance(source._backing(), _RangeReader) and source._backing()._pread
    assert source.copies_ranges  # read by a thread in the featurizing process, not by loader processes


def test_an_array_truncated_while_it_is_read_is_a_clean_error(tmp_path: Path, images: np.ndarray) -> None:
    np.save(tmp_path / "set.npy", images)
    source = open_source(str(tmp_path / "set.npy"))
    source.read(0, 4)
    os.truncate(tmp_path / "set.npy", (tmp_path / "set.npy").stat().st_size // 2)  # rewritten by its producer

    with pytest.raises(SourceError, match=r"set.npy\[\d+:\d+\].*ends .* bytes early"):
        source.read(len(images) - 4, len(images))


def _rss_file_kib() -> int:
    """This process's resident file-backed pages (what a mapping that keeps what it read adds to RSS)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("RssFile:"))


@pytest.mark.parametrize("offset_rows", [0, 7])
def test_reading_a_mapped_array_through_leaves_no_more_of_it_mapped_than_a_batch(
    tmp_path: Path, offset_rows: int
) -> None:
    rows = np.random.default_rng(0).integers(0, 256, (1200, 64, 64, 3), np.uint8)  # 14 MiB
    np.save(tmp_path / "set.npy", rows)
    source = open_source(str(tmp_path / "set.npy"))
    before = _rss_file_kib()
    for at in range(offset_rows, len(rows), 100):  # batches not aligned to pages, as shards' are not
        np.testing.assert_array_equal(np.stack(source.read(at, min(at + 100, len(rows)))), rows[at : at + 100])
    assert _rss_file_kib() - before < 2048  # a batch is 1.2 MiB; all of it would be 14 MiB


def test_compressed_npz_is_streamed_not_loaded(sample_sets: dict[str, Path], images: np.ndarray) -> None:
    source = open_source(str(sample_sets["npz_compressed"]))
    np.testing.assert_array_equal(source.load(15), images[15])
    np.testing.assert_array_equal(source.load(3), images[3])  # backwards: restarts the stream
    assert not isinstance(source._backing(), np.ndarray)


def test_npz_with_one_array_under_another_key_uses_it(tmp_path: Path, images: np.ndarray) -> None:
    np.savez(tmp_path / "samples.npz", samples=images)
    source = open_source(str(tmp_path / "samples.npz"))
    assert source.key == "samples"
    np.testing.assert_array_equal(_stack(source), images)


def test_npz_prefers_arr_0_among_several_arrays(tmp_path: Path, images: np.ndarray) -> None:
    np.savez(tmp_path / "samples.npz", images, np.zeros(N, dtype=np.int64))  # ADM writes (images, labels)
    np.testing.assert_array_equal(_stack(open_source(str(tmp_path / "samples.npz"))), images)


@pytest.mark.parametrize("layout", ["NHW", "NHW1", "NHW4"], ids=["gray", "gray-channel", "rgba"])
def test_array_channel_layouts_become_rgb(tmp_path: Path, layout: str, images: np.ndarray) -> None:
    gray = images[..., 0]
    alpha = np.full(gray.shape + (1,), 7, dtype=np.uint8)
    stored, expected = {
        "NHW": (gray, np.repeat(gray[..., None], 3, axis=3)),
        "NHW1": (gray[..., None], np.repeat(gray[..., None], 3, axis=3)),
        "NHW4": (np.concatenate([images, alpha], axis=3), images),
    }[layout]
    np.save(tmp_path / "a.npy", stored)
    np.testing.assert_array_equal(_stack(open_source(str(tmp_path / "a.npy"))), expected)


def test_fortran_ordered_array_reads_correctly(tmp_path: Path, images: np.ndarray) -> None:
    np.save(tmp_path / "f.npy", np.asfortranarray(images))
    np.testing.assert_array_equal(np.stack(open_source(str(tmp_path / "f.npy")).read(2, 9)), images[2:9])


# -- decoding matches torch-fidelity (PIL convert("RGB")) ----------------------------------------------------


def test_grayscale_png_becomes_three_equal_channels(tmp_path: Path) -> None:
    gray = np.random.default_rng(1).integers(0, 256, size=(6, 5), dtype=np.uint8)
    Image.fromarray(gray).save(tmp_path / "g.png")
    np.testing.assert_array_equal(open_source(str(tmp_path)).load(0), np.repeat(gray[..., None], 3, axis=2))


def test_rgba_png_drops_alpha_without_compositing(tmp_path: Path) -> None:
    rgba = np.random.default_rng(2).integers(0, 256, size=(6, 5, 4), dtype=np.uint8)
    rgba[0, :, 3] = 0  # fully transparent pixels keep their colour
    Image.fromarray(rgba).save(tmp_path / "a.png")
    np.testing.assert_array_equal(open_source(str(tmp_path)).load(0), rgba[..., :3])


def test_palette_png_becomes_rgb(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    palette = rng.integers(0, 256, size=(256, 3), dtype=np.uint8)
    index = rng.integers(0, 256, size=(6, 5), dtype=np.uint8)
    img = Image.new("P", (5, 6))
    img.putpalette(palette.flatten().tolist())
    img.putdata(index.flatten().tolist())
    img.save(tmp_path / "p.png")
    with Image.open(tmp_path / "p.png") as saved:
        assert saved.mode == "P"
    np.testing.assert_array_equal(open_source(str(tmp_path)).load(0), palette[index])


def test_truncated_png_in_folder_fails_naming_the_file(tmp_path: Path) -> None:
    noise = np.random.default_rng(4).integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
    data = _png(noise)
    (tmp_path / "broken.png").write_bytes(data[: len(data) // 2])
    source = open_source(str(tmp_path))
    with pytest.raises(SourceError, match="broken.png"):
        source.load(0)


@pytest.mark.parametrize("kind", ["zip", "tar"])
def test_truncated_png_in_archive_fails_naming_the_member(tmp_path: Path, kind: str) -> None:
    noise = np.random.default_rng(5).integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
    data = _png(noise)
    members = {"ok.png": data, "sub/broken.png": data[: len(data) // 2]}
    path = tmp_path / f"set.{kind}"
    path.write_bytes(_zip_bytes(members) if kind == "zip" else _tar_bytes(members))
    source = open_source(str(path))
    np.testing.assert_array_equal(source.load(0), noise)
    with pytest.raises(SourceError, match="sub/broken.png"):
        source.load(1)


# -- folders -------------------------------------------------------------------------------------------------


def _nested_folder(root: Path) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(6)
    written = {}
    for rel in ["b.png", "a/z.PNG", "c/d/x.jpeg", "a/y.bmp"]:
        img = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if rel.endswith("jpeg"):
            Image.fromarray(img).save(path, format="JPEG")
            img = np.asarray(Image.open(path).convert("RGB"))
        else:
            Image.fromarray(img).save(path, format="BMP" if rel.endswith("bmp") else "PNG")
        written[rel] = img
    return written


def test_recursive_folder_finds_nested_images_sorted_by_path(tmp_path: Path) -> None:
    written = _nested_folder(tmp_path)
    order = ["a/y.bmp", "a/z.PNG", "b.png", "c/d/x.jpeg"]
    source = open_source(str(tmp_path))
    assert [os.path.relpath(source.name_of(i), tmp_path) for i in range(len(source))] == order
    np.testing.assert_array_equal(_stack(source), np.stack([written[rel] for rel in order]))


def test_folder_order_follows_resolved_symlinks(tmp_path: Path, images: np.ndarray) -> None:
    (tmp_path / "zz_elsewhere").mkdir()
    (tmp_path / "zz_elsewhere" / "target.png").write_bytes(_png(images[0]))
    root = tmp_path / "set"
    root.mkdir()
    (root / "b.png").write_bytes(_png(images[1]))
    try:
        os.symlink(tmp_path / "zz_elsewhere" / "target.png", root / "a.png")
    except OSError:
        pytest.skip("symlinks not supported here")
    # torch-fidelity sorts real paths: .../set/b.png < .../zz_elsewhere/target.png, whatever the link's name
    np.testing.assert_array_equal(_stack(open_source(str(root))), images[[1, 0]])


def test_non_recursive_folder_ignores_subfolders(tmp_path: Path) -> None:
    written = _nested_folder(tmp_path)
    source = open_source(str(tmp_path), recursive=False)
    assert len(source) == 1
    np.testing.assert_array_equal(source.load(0), written["b.png"])


def test_hidden_files_and_folders_are_skipped(tmp_path: Path, images: np.ndarray) -> None:
    (tmp_path / "a.png").write_bytes(_png(images[0]))
    (tmp_path / ".b.png").write_bytes(_png(images[1]))
    (tmp_path / ".ipynb_checkpoints").mkdir()
    (tmp_path / ".ipynb_checkpoints" / "c.png").write_bytes(_png(images[2]))
    assert len(open_source(str(tmp_path))) == 1


def test_empty_folder_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="no images") as err:
        open_source(str(tmp_path))
    assert str(tmp_path) in str(err.value) and "png" in str(err.value)


def test_folder_with_only_text_files_is_rejected(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(SourceError, match="no images"):
        open_source(str(tmp_path))


def test_archive_without_images_is_rejected(tmp_path: Path) -> None:
    (tmp_path / "a.zip").write_bytes(_zip_bytes({"a.txt": b"x"}))
    with pytest.raises(SourceError, match="no images"):
        open_source(str(tmp_path / "a.zip"))


def test_missing_path_is_rejected_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "nope.npz"
    with pytest.raises(SourceError, match="nope.npz"):
        open_source(str(missing))


def test_unsupported_file_is_rejected_listing_accepted_kinds(tmp_path: Path) -> None:
    (tmp_path / "samples.csv").write_text("1,2,3\n")
    with pytest.raises(SourceError, match=r"samples\.csv.*\.npz") as err:
        open_source(str(tmp_path / "samples.csv"))
    assert ".zip" in str(err.value) and ".tar" in str(err.value)


def test_corrupt_archive_is_rejected_naming_it(tmp_path: Path) -> None:
    (tmp_path / "bad.zip").write_bytes(b"not a zip at all")
    with pytest.raises(SourceError, match="bad.zip"):
        open_source(str(tmp_path / "bad.zip"))


# -- array validation ----------------------------------------------------------------------------------------


def test_float_npz_is_rejected_asking_for_uint8(tmp_path: Path, images: np.ndarray) -> None:
    np.savez(tmp_path / "f.npz", images.astype(np.float32) / 255)
    with pytest.raises(SourceError, match="uint8") as err:
        open_source(str(tmp_path / "f.npz"))
    assert "float32" in str(err.value) and "NHWC" in str(err.value)


def test_nchw_array_is_rejected_naming_the_layout(tmp_path: Path, images: np.ndarray) -> None:
    np.save(tmp_path / "nchw.npy", images.transpose(0, 3, 1, 2).copy())
    with pytest.raises(SourceError, match="NCHW"):
        open_source(str(tmp_path / "nchw.npy"))


def test_npz_with_several_arrays_and_no_arr_0_lists_keys(tmp_path: Path, images: np.ndarray) -> None:
    np.savez(tmp_path / "m.npz", samples=images, labels=np.zeros(N, dtype=np.int64))
    with pytest.raises(SourceError, match="labels, samples"):
        open_source(str(tmp_path / "m.npz"))


def test_truncated_npy_is_rejected(tmp_path: Path, images: np.ndarray) -> None:
    np.save(tmp_path / "t.npy", images)
    data = (tmp_path / "t.npy").read_bytes()
    (tmp_path / "t.npy").write_bytes(data[: len(data) - 10])
    with pytest.raises(SourceError, match="truncated"):
        open_source(str(tmp_path / "t.npy"))


# -- content hash --------------------------------------------------------------------------------------------


def test_content_hash_ignores_where_the_folder_is(tmp_path: Path, sample_sets: dict[str, Path]) -> None:
    copy = shutil.copytree(sample_sets["folder"], tmp_path / "elsewhere" / "copy")
    assert open_source(str(copy)).content_hash() == open_source(str(sample_sets["folder"])).content_hash()


def test_content_hash_ignores_where_the_archive_is(tmp_path: Path, sample_sets: dict[str, Path]) -> None:
    copy = shutil.copy(sample_sets["zip"], tmp_path / "renamed.zip")
    assert open_source(str(copy)).content_hash() == open_source(str(sample_sets["zip"])).content_hash()


def test_content_hash_changes_with_one_pixel(tmp_path: Path, images: np.ndarray) -> None:
    changed = images.copy()
    changed[7, 3, 4, 1] ^= 1
    hashes = []
    for name, arrays in (("same", images), ("changed", changed)):
        folder = tmp_path / name
        folder.mkdir()
        for i, img in enumerate(arrays):
            (folder / f"{i:03d}.png").write_bytes(_png(img))
        hashes.append(open_source(str(folder)).content_hash())
    assert hashes[0] != hashes[1]


@pytest.mark.parametrize("kind", KINDS)
def test_content_hash_is_stable(kind: str, sample_sets: dict[str, Path]) -> None:
    source = open_source(str(sample_sets[kind]))
    first = source.content_hash()
    assert len(first) == 64 and first == source.content_hash()
    assert open_source(str(sample_sets[kind])).content_hash() == first


# -- processes -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_pickled_source_after_use_reads_the_same_images(
    kind: str, sample_sets: dict[str, Path], images: np.ndarray
) -> None:
    source = open_source(str(sample_sets[kind]))
    source.load(3)  # opens this process's handles
    clone = pickle.loads(pickle.dumps(source))
    np.testing.assert_array_equal(_stack(clone), images)
    np.testing.assert_array_equal(_stack(source), images)


def _read_in_child(source: Source, parent_handle: Any, queue: Any) -> None:
    images = [source.load(i) for i in reversed(range(len(source)))]
    queue.put((np.stack(images[::-1]), source._raw is not parent_handle))


@pytest.mark.skipif("fork" not in mp.get_all_start_methods(), reason="needs the fork start method")
def test_forked_process_opens_its_own_handle(sample_sets: dict[str, Path], images: np.ndarray) -> None:
    source = open_source(str(sample_sets["tar"]))
    source.load(0)
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_read_in_child, args=(source, source._raw, queue))
    child.start()
    got, own_handle = queue.get(timeout=60)
    child.join(timeout=60)
    assert own_handle
    np.testing.assert_array_equal(got, images)
    np.testing.assert_array_equal(_stack(source), images)


# -- fsspec --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["npz", "npz_compressed", "npy", "zip", "tar", "tar_gz"])
def test_memory_url_file_is_read_through_fsspec(
    kind: str, memfs: Any, sample_sets: dict[str, Path], images: np.ndarray
) -> None:
    fs, prefix = memfs
    name = sample_sets[kind].name
    fs.pipe(f"{prefix}/{name}", sample_sets[kind].read_bytes())
    source = open_source(f"memory://{prefix}/{name}")
    np.testing.assert_array_equal(_stack(source), images)
    assert source.content_hash() == open_source(str(sample_sets[kind])).content_hash()


def test_memory_url_folder_is_read_through_fsspec(memfs: Any, images: np.ndarray) -> None:
    fs, prefix = memfs
    for i, img in enumerate(images[:5]):
        fs.pipe(f"{prefix}/set/{i:03d}.png", _png(img))
    fs.pipe(f"{prefix}/set/notes.txt", b"x")
    source = open_source(f"memory://{prefix}/set")
    np.testing.assert_array_equal(_stack(source), images[:5])
    assert source.name_of(0).startswith("memory://")


def test_memory_url_missing_is_rejected_naming_it(memfs: Any) -> None:
    _, prefix = memfs
    with pytest.raises(SourceError, match="missing.npz"):
        open_source(f"memory://{prefix}/missing.npz")


def test_pickled_fsspec_source_reads_the_same_images(memfs: Any, sample_sets: dict[str, Path]) -> None:
    fs, prefix = memfs
    fs.pipe(f"{prefix}/images.zip", sample_sets["zip"].read_bytes())
    source = open_source(f"memory://{prefix}/images.zip")
    first = source.load(0)
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(source)).load(0), first)


# -- a tar's member index, listed once and handed to other processes ------------------------------------------------


class _NoListing(Exception):
    pass


@pytest.mark.parametrize("kind", ["tar", "tar_gz"])
def test_a_tar_opened_from_its_index_is_not_listed_and_reads_the_same_images(
    sample_sets: dict[str, Path], images: np.ndarray, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    index = open_source(str(sample_sets[kind])).index()

    def no_listing(self, raw):  # the one thing an index saves: reading every member's header
        raise _NoListing

    monkeypatch.setattr(TarSource, "_list_members", no_listing)
    source = open_source(str(sample_sets[kind]), index=index)
    np.testing.assert_array_equal(_stack(source), images)
    assert source.name_of(3).endswith("imgs/003.png")


def test_an_index_of_a_tar_that_changed_since_is_not_used(tmp_path: Path, sample_sets: dict[str, Path],
                                                          images: np.ndarray) -> None:
    path = Path(shutil.copy(sample_sets["tar"], tmp_path / "set.tar"))
    index = open_source(str(path)).index()
    members = {f"imgs/{i:03d}.png": _png(img) for i, img in enumerate(images[::-1])}  # same names, other images
    path.write_bytes(_tar_bytes(members))  # rewritten in place: same inode, same size, a later time
    later = path.stat().st_mtime_ns + 1_000_000_000
    os.utime(path, ns=(later, later))
    np.testing.assert_array_equal(_stack(open_source(str(path), index=index)), images[::-1])
    replaced = tmp_path / "new.tar"  # replaced by a rename: another inode
    replaced.write_bytes(_tar_bytes({f"imgs/{i:03d}.png": _png(img) for i, img in enumerate(images)}))
    os.utime(replaced, ns=(later, later))
    os.replace(replaced, path)
    np.testing.assert_array_equal(_stack(open_source(str(path), index=index)), images)


@pytest.mark.parametrize("index", [b"not an index", b""])
def test_a_damaged_index_means_listing_the_tar_again(sample_sets: dict[str, Path], images: np.ndarray,
                                                     index: bytes) -> None:
    np.testing.assert_array_equal(_stack(open_source(str(sample_sets["tar"]), index=index)), images)


def test_other_sources_have_no_index(sample_sets: dict[str, Path]) -> None:
    assert {k: open_source(str(p)).index() for k, p in sample_sets.items() if not k.startswith("tar")} == \
        {k: None for k in sample_sets if not k.startswith("tar")}


def _tampered(index: bytes, **changes: Any) -> bytes:
    with np.load(io.BytesIO(index), allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    for key, change in changes.items():
        arrays[key] = change(arrays[key])
    return _npz_bytes(np.savez, **arrays)


def _renamed(names: np.ndarray) -> np.ndarray:
    text = names.tobytes().decode().split("\0")
    text[0] = "../notes.txt"
    return np.frombuffer("\0".join(text).encode(), np.uint8)


@pytest.mark.parametrize("change", [
    {"where": lambda w: w + np.array([0, 0, 10**9])},  # sizes past the end of the file
    {"where": lambda w: np.concatenate([w[:1], w[:1], w[2:]])},  # one member's bytes under two names
    {"names": _renamed},  # a name listing would never give
], ids=["past-the-end", "duplicate-offsets", "not-an-image-name"])
def test_an_index_that_listing_could_not_give_is_not_used(sample_sets: dict[str, Path], images: np.ndarray,
                                                         change: dict) -> None:
    index = _tampered(open_source(str(sample_sets["tar"])).index(), **change)
    source = open_source(str(sample_sets["tar"]), index=index)
    np.testing.assert_array_equal(_stack(source), images)


def test_an_archive_replaced_after_it_was_listed_is_refused_when_read(tmp_path: Path, sample_sets: dict[str, Path],
                                                                       images: np.ndarray) -> None:
    path = Path(shutil.copy(sample_sets["tar"], tmp_path / "set.tar"))
    source = open_source(str(path))
    replacement = tmp_path / "new.tar"
    replacement.write_bytes(_tar_bytes({f"imgs/{i:03d}.png": _png(img) for i, img in enumerate(images[::-1])}))
    os.replace(replacement, path)
    with pytest.raises(SourceError, match="changed since it was listed"):
        source.load(0)
