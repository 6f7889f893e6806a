"""Jobs on extractors beyond Inception: `--extractor`, FD/KD/PRC equal torch-fidelity 0.4.0's `calculate_metrics` on
the same images and seeded weights, several extractors in one job, results and references per extractor.

torch-fidelity reads the CLIP and VGG16 files itself (`feature_extractor_weights_path`); its DINOv2 path goes
through `torch.hub.load`, which is answered here with a network built from the same file.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import evalfarm
from evalfarm import keys
from evalfarm.db import Job, session_factory
from evalfarm.errors import ReferenceMismatchError
from evalfarm.models import extractors
from evalfarm.models.weights import file_sha256
from evalfarm.settings import get_settings

from .helpers import rel_err, run_cli, write_images

N_GEN, N_REAL, KID_SUBSET = 14, 12, 6
MEAN_RTOL = 1e-4  #: DESIGN.md: FID and KID mean
STD_RTOL = 1e-3  #: DESIGN.md: KID std
SETTINGS = dict(kid_subset_size=KID_SUBSET, kid_subsets=10, shard_size=5, device="cpu")


@pytest.fixture(scope="module")
def image_sets(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("extractor-sets")
    # Different sizes on purpose: each extractor resizes both to its own input size.
    return (write_images(root / "generated", N_GEN, 32, seed=61, brightness=1.0),
            write_images(root / "real", N_REAL, 40, seed=62, brightness=0.6))


def torch_fidelity(image_sets: tuple[Path, Path], extractor: str, weights: Path | None, **metrics: bool) -> dict:
    torch_fidelity = pytest.importorskip("torch_fidelity")
    return torch_fidelity.calculate_metrics(
        input1=str(image_sets[0]), input2=str(image_sets[1]), feature_extractor=extractor,
        feature_extractor_weights_path=str(weights) if weights else None, kid_subset_size=KID_SUBSET, kid_subsets=10,
        cuda=False, cache=False, verbose=False, **metrics,
    )


def assert_equal_to_torch_fidelity(ours: dict, theirs: dict) -> None:
    checked = 0
    for key, value in theirs.items():
        if key in (keys.KEY_PRECISION, keys.KEY_RECALL, keys.KEY_F_SCORE):
            assert ours[key] == pytest.approx(value, abs=1e-7), key  # fractions of samples: the same counts
        else:
            tol = STD_RTOL if key.endswith("_std") else MEAN_RTOL
            assert rel_err(ours[key], value) <= tol, (key, ours[key], value)
        checked += 1
    assert checked >= 3


# -- parity with torch-fidelity, one extractor per job ------------------------------------------------------------


def test_clip_fd_kd_prc_from_the_cli_equal_torch_fidelity(image_sets, extractor_weights, tmp_path) -> None:
    weights = extractor_weights("clip-vit-b-32")
    out = tmp_path / "result.json"
    proc = run_cli("eval", image_sets[0], "--ref", image_sets[1], "--extractor", "clip-vit-b-32",
                   "--extractor-weights", weights, "--metrics", "fid,kid,prc", "--kid-subset-size", KID_SUBSET,
                   "--kid-subsets", 10, "--shard-size", 5, "--device", "cpu", "--quiet", "--json", out)
    assert proc.returncode == 0, proc.stderr
    ours = json.loads(out.read_text())
    theirs = torch_fidelity(image_sets, "clip-vit-b-32", weights, fid=True, kid=True, prc=True)
    assert_equal_to_torch_fidelity(ours, theirs)
    assert "FD " in proc.stdout and "KD " in proc.stdout and "Precision" in proc.stdout  # not called FID/KID
    assert ours["extractors"]["clip-vit-b-32"]["weights_sha256"] == extractors.file_sha256(weights)


def test_vgg16_is_the_default_for_prc_and_equals_torch_fidelity(image_sets, extractor_weights) -> None:
    weights = extractor_weights("vgg16")
    ours = evalfarm.evaluate(str(image_sets[0]), str(image_sets[1]), metrics=("prc",),
                             extractor_weights={"vgg16": str(weights)}, **SETTINGS)
    theirs = torch_fidelity(image_sets, None, weights, prc=True)  # no extractor named: torch-fidelity's VGG16
    assert list(ours["extractors"]) == ["vgg16"]
    for key in (keys.KEY_PRECISION, keys.KEY_RECALL, keys.KEY_F_SCORE):
        assert ours[key] == pytest.approx(theirs[key], abs=1e-7), key
    assert 0 < ours[keys.KEY_PRECISION] < 1 or 0 < ours[keys.KEY_RECALL] < 1  # not a degenerate all-or-nothing


def test_dinov2_fd_kd_prc_equal_torch_fidelity_around_the_same_network(
    image_sets, extractor_weights, monkeypatch: pytest.MonkeyPatch
) -> None:
    from torch_fidelity import feature_extractor_dinov2

    weights = extractor_weights("dinov2-vit-s-14")
    network = extractors.build("dinov2-vit-s-14", weights, "cpu").net
    monkeypatch.setenv("XFORMERS_DISABLED", "1")
    monkeypatch.setattr(feature_extractor_dinov2.torch.hub, "load", lambda repo, model, **kw: network)
    theirs = torch_fidelity(image_sets, "dinov2-vit-s-14", None, fid=True, kid=True, prc=True)
    ours = evalfarm.evaluate(str(image_sets[0]), str(image_sets[1]), metrics=("fid", "kid", "prc"),
                             extractors=("dinov2-vit-s-14",), extractor_weights={"dinov2-vit-s-14": str(weights)},
                             **SETTINGS)
    assert_equal_to_torch_fidelity(ours, theirs)
    assert ours["extractors"]["dinov2-vit-s-14"]["weights_canonical"] is None  # Meta publishes no hash


# -- several extractors in one job ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_extractor_job(image_sets, extractor_weights, weights_path, tmp_path_factory) -> dict:
    from .helpers import in_home

    with in_home(tmp_path_factory.mktemp("two-extractors-home")):
        return evalfarm.evaluate(
            str(image_sets[0]), str(image_sets[1]), metrics=("is", "fid", "kid", "prc"),
            extractors=(keys.INCEPTION, "dinov2-vit-s-14"), weights=str(weights_path),
            extractor_weights={"dinov2-vit-s-14": str(extractor_weights("dinov2-vit-s-14"))}, splits=2,
            **SETTINGS,
        )


def test_each_extractor_of_a_job_gives_what_a_job_of_its_own_gives(
    two_extractor_job, image_sets, extractor_weights, weights_path
) -> None:
    alone = evalfarm.evaluate(str(image_sets[0]), str(image_sets[1]), metrics=("fid", "kid", "prc"),
                              extractors=("dinov2-vit-s-14",),
                              extractor_weights={"dinov2-vit-s-14": str(extractor_weights("dinov2-vit-s-14"))},
                              **{**SETTINGS, "shard_size": 100})  # one shard: sharding must not matter either
    together = two_extractor_job["extractors"]["dinov2-vit-s-14"]["metrics"]
    assert set(together) == {keys.KEY_FID, keys.KEY_KID_MEAN, keys.KEY_KID_STD, keys.KEY_PRECISION, keys.KEY_RECALL,
                             keys.KEY_F_SCORE}
    for key, value in together.items():
        assert value == pytest.approx(alone[key], rel=1e-6, abs=1e-12), key


def test_torch_fidelity_s_keys_hold_the_first_extractor_s_values(two_extractor_job) -> None:
    by = two_extractor_job["extractors"]
    assert two_extractor_job[keys.KEY_FID] == by[keys.INCEPTION]["metrics"][keys.KEY_FID]
    assert two_extractor_job[keys.KEY_IS_MEAN] == by[keys.INCEPTION]["metrics"][keys.KEY_IS_MEAN]
    assert keys.KEY_IS_MEAN not in by["dinov2-vit-s-14"]["metrics"]  # IS is Inception's alone
    assert two_extractor_job[f"{keys.KEY_FID}@dinov2-vit-s-14"] == by["dinov2-vit-s-14"]["metrics"][keys.KEY_FID]


def test_the_results_database_names_every_value_by_its_extractor(two_extractor_job, tmp_path_factory) -> None:
    names = set(two_extractor_job["metric_keys"])
    assert {keys.KEY_FID, f"{keys.KEY_FID}@dinov2-vit-s-14", f"{keys.KEY_PRECISION}@{keys.INCEPTION}",
            f"{keys.KEY_PRECISION}@dinov2-vit-s-14"} <= names
    assert keys.KEY_PRECISION not in names  # plain "precision" is VGG16's, as torch-fidelity's default
    assert two_extractor_job["weights_sha256"] == two_extractor_job["extractors"][keys.INCEPTION]["weights_sha256"]


def test_each_extractor_s_weights_are_pinned_in_the_job(two_extractor_job, image_sets) -> None:
    weights = {e: v["weights_sha256"] for e, v in two_extractor_job["extractors"].items()}
    assert set(weights) == {keys.INCEPTION, "dinov2-vit-s-14"} and len(set(weights.values())) == 2


# -- references per extractor ---------------------------------------------------------------------------------------


def test_a_cached_reference_is_kept_per_extractor(image_sets, extractor_weights, weights_path) -> None:
    dino = {"dinov2-vit-s-14": str(extractor_weights("dinov2-vit-s-14"))}
    common = dict(metrics=("fid",), weights=str(weights_path), extractor_weights=dino, **SETTINGS)
    first = evalfarm.evaluate(str(image_sets[0]), str(image_sets[1]), extractors=("dinov2-vit-s-14",), **common)
    again = evalfarm.evaluate(str(image_sets[0]), str(image_sets[1]), extractors=("dinov2-vit-s-14",), **common)
    inception = evalfarm.evaluate(str(image_sets[0]), str(image_sets[1]), **common)
    assert first["images_featurized"] == N_GEN + N_REAL
    assert again["images_featurized"] == N_GEN  # DINOv2's reference statistics were reused
    assert again[keys.KEY_FID] == pytest.approx(first[keys.KEY_FID], rel=1e-12)
    assert inception["images_featurized"] == N_GEN + N_REAL  # ...and are not Inception's
    assert inception[keys.KEY_FID] != pytest.approx(first[keys.KEY_FID], rel=1e-3)


def test_a_named_reference_holds_the_extractors_it_was_made_with(image_sets, extractor_weights, weights_path) -> None:
    dino = str(extractor_weights("dinov2-vit-s-14"))
    made = run_cli("ref", "create", "real-dino", image_sets[1], "--extractor", "dinov2-vit-s-14",
                   "--extractor-weights", dino, "--device", "cpu", "--quiet")
    assert made.returncode == 0, made.stderr
    assert "dinov2-vit-s-14 (weights" in made.stdout
    listed = run_cli("ref", "list")
    [row] = [line.split("\t") for line in listed.stdout.splitlines() if line.startswith("real-dino\t")]
    assert row[3] == f"dinov2-vit-s-14:{file_sha256(Path(dino))[:16]}"  # the extractor's, by name
    by_name = evalfarm.evaluate(str(image_sets[0]), "real-dino", metrics=("fid", "kid"),
                                extractors=("dinov2-vit-s-14",), extractor_weights={"dinov2-vit-s-14": dino},
                                **SETTINGS)
    by_path = evalfarm.evaluate(str(image_sets[0]), str(image_sets[1]), metrics=("fid", "kid"),
                                extractors=("dinov2-vit-s-14",), extractor_weights={"dinov2-vit-s-14": dino},
                                cache=False, **SETTINGS)
    assert by_name["images_featurized"] == N_GEN
    for key in (keys.KEY_FID, keys.KEY_KID_MEAN):
        assert by_name[key] == pytest.approx(by_path[key], rel=1e-6), key
    with pytest.raises(ReferenceMismatchError, match=r"holds statistics of dinov2-vit-s-14, not of inception-v3-compat"):
        evalfarm.evaluate(str(image_sets[0]), "real-dino", metrics=("fid",), weights=str(weights_path), **SETTINGS)


# -- what is refused, before any featurizing ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--metrics", "is,fid", "--extractor", "dinov2-vit-s-14"], "Inception Score is defined on inception-v3-compat"),
        (["--metrics", "fid", "--extractor", "dinov2-vit-s-99"], "unknown extractor 'dinov2-vit-s-99'"),
        (["--metrics", "fid", "--extractor", "clip-vit-b-32", "--resize", "clean"], "--resize clean applies to"),
        (["--metrics", "fid", "--extractor", "clip-vit-b-32", "--precision", "bf16"], "--precision bf16 applies to"),
        (["--metrics", "fid", "--extractor", "clip-vit-b-32,vgg16", "--extractor-weights", "/x.pt"],
         "say which extractor it is for"),
    ],
)
def test_an_impossible_extractor_request_is_one_clear_error(image_sets, flags, message) -> None:
    proc = run_cli("eval", image_sets[0], "--ref", image_sets[1], *flags)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_default_metrics_on_another_extractor_leave_out_is(image_sets, extractor_weights, tmp_path) -> None:
    out = tmp_path / "r.json"
    proc = run_cli("eval", image_sets[0], "--ref", image_sets[1], "--extractor", "dinov2-vit-s-14", "--extractor-weights",
                   extractor_weights("dinov2-vit-s-14"), "--kid-subset-size", KID_SUBSET, "--device", "cpu",
                   "--quiet", "--json", out)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(out.read_text())["settings"]["metrics"] == ["fid", "kid"]


def test_missing_extractor_weights_name_the_variable_and_record_the_failure(image_sets) -> None:
    proc = run_cli("eval", image_sets[0], "--ref", image_sets[1], "--metrics", "fid", "--extractor",
                   "dinov2-vit-s-14", "--device", "cpu")
    assert proc.returncode == 1 and "EVALFARM_WEIGHTS_DINOV2_VIT_S_14" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_prc_needs_more_samples_than_the_neighbourhood(image_sets, extractor_weights, tmp_path) -> None:
    few = write_images(tmp_path / "few", 3, 32, seed=5, brightness=1.0)
    with pytest.raises(evalfarm.MetricInputError, match=r"needs more than 3 samples a side"):
        evalfarm.evaluate(str(few), str(image_sets[1]), metrics=("prc",),
                          extractor_weights={"vgg16": str(extractor_weights("vgg16"))}, **SETTINGS)
    with session_factory(get_settings().db_url)() as s:
        job = s.query(Job).order_by(Job.created_at.desc()).first()
    assert job.state == "failed" and "needs more than 3 samples" in job.error


# -- the API's request body -----------------------------------------------------------------------------------------


def test_the_api_body_takes_extractors_and_refuses_unknown_ones() -> None:
    from pydantic import ValidationError

    from evalfarm.api.schemas import JobRequest

    body = JobRequest.model_validate({"samples": "/s", "ref": "r", "metrics": "fid,prc",
                                      "extractors": "dinov2-vit-l-14,clip-vit-l-14", "prc_neighborhood": 5})
    config = body.config()
    assert config.extractors == ("dinov2-vit-l-14", "clip-vit-l-14") and config.prc_neighborhood == 5
    assert config.featurizers == ("dinov2-vit-l-14", "clip-vit-l-14")
    with pytest.raises(ValidationError, match="extractors"):
        JobRequest.model_validate({"samples": "/s", "extractors": ["resnet50"]})
    # IS needs Inception: unasked-for metrics default to FID and KID when the extractors leave it out
    assert JobRequest.model_validate({"samples": "/s", "extractors": ["vgg16"]}).config().metrics == ("fid", "kid")
    assert JobRequest.model_validate({"samples": "/s"}).config().metrics == ("is", "fid", "kid")


def test_a_default_request_digests_as_before_extractors_existed() -> None:
    """Idempotency keys of requests made before `extractors` existed still match: new fields at their defaults
    are left out of the stored config."""
    from evalfarm.config import EvalConfig

    assert "extractors" not in EvalConfig().to_dict() and "prc_neighborhood" not in EvalConfig().to_dict()
    config = EvalConfig(metrics=("fid",), extractors=("vgg16",))
    assert EvalConfig.from_dict(config.to_dict()) == config


def test_a_run_s_dinov2_fd_is_plotted_and_exported_under_its_extractor(image_sets, extractor_weights, tmp_path) -> None:
    from PIL import Image

    from evalfarm.config import EvalConfig
    from evalfarm.export import metric_name
    from evalfarm.scheduler.embedded import run_embedded

    config = EvalConfig(metrics=("fid",), extractors=("dinov2-vit-s-14",), shard_size=5)
    for step in (100, 200):
        result = run_embedded(str(image_sets[0]), str(image_sets[1]), config, device="cpu", run="dino-run", step=step,
                              extractor_weights={"dinov2-vit-s-14": str(extractor_weights("dinov2-vit-s-14"))})
        assert result["metric_keys"] == [f"{keys.KEY_FID}@dinov2-vit-s-14"]
    out = tmp_path / "fd.png"
    plotted = run_cli("plot", "--run", "dino-run", "--metric", "fid", "--extractor", "dinov2-vit-s-14", "-o", out)
    assert plotted.returncode == 0 and "2 points" in plotted.stdout, plotted.stderr
    assert Image.open(out).size[0] > 100
    plain = run_cli("plot", "--run", "dino-run", "--metric", "fid", "-o", tmp_path / "fid.png")
    assert plain.returncode == 1 and "has FID at a step" in plain.stderr  # Inception's FID was never computed
    assert metric_name(f"{keys.KEY_FID}@dinov2-vit-s-14") == "evalfarm/dinov2-vit-s-14/frechet_inception_distance"


def test_the_dashboard_labels_each_value_with_its_extractor(two_extractor_job) -> None:
    from evalfarm.api.dashboard import result_rows

    labels = {row["label"]: row["value"] for row in result_rows(two_extractor_job)}
    by = two_extractor_job["extractors"]
    assert labels["FID"] == by[keys.INCEPTION]["metrics"][keys.KEY_FID]
    assert labels["FID on dinov2-vit-s-14"] == by["dinov2-vit-s-14"]["metrics"][keys.KEY_FID]
    assert labels["Precision on inception-v3-compat"] == by[keys.INCEPTION]["metrics"][keys.KEY_PRECISION]
    assert "Inception Score on dinov2-vit-s-14" not in labels


# -- jobs stored before there were other extractors, and workers that disagree on one ------------------------------


def test_a_plan_stored_before_extractors_existed_reads_as_inception_s() -> None:
    from evalfarm.scheduler.plan import JobPlan

    old = JobPlan.from_dict({
        "samples": {"uri": "/s", "n": 4, "content_hash": "c", "how": "shards", "store_key": None, "shards": [[0, 4]]},
        "reference": {"uri": "/r", "n": 3, "content_hash": "d", "how": "stored", "store_key": "refs/x.npz",
                      "shards": None},
    })
    assert old.side("reference").store_keys == {keys.INCEPTION: "refs/x.npz"}
    assert old.side("samples").store_keys == {} and old.weights == {}
    assert old.to_dict()["reference"]["store_key"] == "refs/x.npz"  # still readable by the previous release


def test_a_job_planned_before_extractors_existed_is_pinned_to_its_inception_weights(image_sets) -> None:
    from evalfarm.config import EvalConfig
    from evalfarm.scheduler import records
    from evalfarm.scheduler.context import embedded_context
    from evalfarm.scheduler.steps import plan_job

    ctx = embedded_context(get_settings())
    job_id = records.create_job(ctx.sessions, records.Submission(str(image_sets[0]), str(image_sets[1]),
                                                                 EvalConfig(metrics=("fid",))), mode="embedded").job_id
    plan_job(ctx, job_id, {keys.INCEPTION: "a" * 64})
    with ctx.sessions.begin() as s:  # what the previous release stored: no per-extractor weights in the plan
        job = s.get(Job, job_id)
        job.plan = {k: v for k, v in job.plan.items() if k != "weights"}
    assert records.get_job(ctx.sessions, job_id).extractor_weights == {keys.INCEPTION: "a" * 64}


def test_a_worker_with_other_weights_for_one_extractor_refuses_the_shard(image_sets) -> None:
    from evalfarm.config import EvalConfig
    from evalfarm.errors import WeightsError
    from evalfarm.scheduler import records
    from evalfarm.scheduler.context import embedded_context
    from evalfarm.scheduler.steps import plan_job

    ctx = embedded_context(get_settings())
    config = EvalConfig(metrics=("fid",), extractors=(keys.INCEPTION, "dinov2-vit-s-14"), shard_size=5)
    job_id = records.create_job(ctx.sessions, records.Submission(str(image_sets[0]), str(image_sets[1]), config),
                                mode="embedded").job_id
    pinned = {keys.INCEPTION: "a" * 64, "dinov2-vit-s-14": "b" * 64}
    plan_job(ctx, job_id, pinned)
    with pytest.raises(WeightsError, match=r"dinov2-vit-s-14 weights .*EVALFARM_WEIGHTS_DINOV2_VIT_S_14"):
        records.claim_shard(ctx.sessions, job_id, "samples", 0, worker="w", lease_s=None, max_attempts=4,
                            weights={**pinned, "dinov2-vit-s-14": "c" * 64})
    assert records.claim_shard(ctx.sessions, job_id, "samples", 0, worker="w", lease_s=None, max_attempts=4,
                               weights=pinned) is not None


def test_a_named_extractor_that_no_metric_uses_is_refused() -> None:
    from evalfarm.config import EvalConfig

    with pytest.raises(ValueError, match="no requested metric uses dinov2-vit-s-14"):
        EvalConfig(metrics=("is",), extractors=(keys.INCEPTION, "dinov2-vit-s-14"))


def test_an_inception_weights_pin_on_a_job_without_inception_is_refused(image_sets) -> None:
    from evalfarm.config import EvalConfig
    from evalfarm.errors import InvalidField
    from evalfarm.scheduler import records
    from evalfarm.scheduler.context import embedded_context

    ctx = embedded_context(get_settings())
    request = records.Submission(str(image_sets[0]), str(image_sets[1]),
                                 EvalConfig(metrics=("fid",), extractors=("dinov2-vit-s-14",)), weights_sha256="a" * 64)
    with pytest.raises(InvalidField, match="does not use inception-v3-compat"):
        records.create_job(ctx.sessions, request, mode="embedded")


def test_the_run_page_charts_another_extractor_s_values_apart(two_extractor_job) -> None:
    from evalfarm.api.dashboard import other_extractors
    from evalfarm.runs import Point, series

    metrics = {n: two_extractor_job[n] for n in two_extractor_job["metric_keys"]}
    points = [Point(run="r", step=s, job_id=str(s), finished_at=None, metrics=metrics) for s in (1, 2)]
    assert other_extractors(points) == ["dinov2-vit-s-14"]
    assert [v for _, v, _ in series(points, "fid", "dinov2-vit-s-14")] == [metrics[f"{keys.KEY_FID}@dinov2-vit-s-14"]] * 2
    assert [v for _, v, _ in series(points, "fid")] == [metrics[keys.KEY_FID]] * 2


# -- precision/recall's tiles: the same numbers for any tiling, a lost or abandoned tile run again ------------------


@pytest.fixture(scope="module")
def prc_sets(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("prc-sets")
    return (write_images(root / "generated", 21, 32, seed=71, brightness=1.0),
            write_images(root / "real", 21, 32, seed=72, brightness=1.0))


def prc_job(prc_sets, extractor_weights, **config) -> dict:
    return evalfarm.evaluate(str(prc_sets[0]), str(prc_sets[1]), metrics=("prc",), extractors=("clip-vit-b-32",),
                             extractor_weights={"clip-vit-b-32": str(extractor_weights("clip-vit-b-32"))},
                             device="cpu", shard_size=8, **config)


def test_prc_is_identical_for_1_3_and_7_tiles_per_side(prc_sets, extractor_weights) -> None:
    from evalfarm.metrics.prc import precision_recall

    tile_of = {1: 21, 3: 9, 7: 3}  # tiles per side of 21 samples: ceil(21 / tile)
    results = {per_side: prc_job(prc_sets, extractor_weights, prc_block=3, prc_tile=tile)
               for per_side, tile in tile_of.items()}
    values = {n: {k: r[k] for k in (keys.KEY_PRECISION, keys.KEY_RECALL, keys.KEY_F_SCORE)} for n, r in results.items()}
    assert values[1] == values[3] == values[7]
    assert 0 < values[1][keys.KEY_PRECISION] < 1 or 0 < values[1][keys.KEY_RECALL] < 1
    net = extractors.build("clip-vit-b-32", extractor_weights("clip-vit-b-32"), "cpu")
    from evalfarm.pipeline import featurize_range
    from evalfarm.sources import open_source

    gen, real = (featurize_range(open_source(str(p)), 0, 21, net, num_workers=0).features for p in prc_sets)
    assert values[1] == precision_recall(gen, real, block=3, tile=3)  # the in-process math, same block


def tiles_job(prc_sets, config):  # noqa: ANN001, ANN201
    """A PRC job planned and featurized here, stopped where its reduce hands out the first tiles."""
    from evalfarm.scheduler import records
    from evalfarm.scheduler.context import embedded_context
    from evalfarm.scheduler.steps import plan_job, reduce_job, run_shard

    ctx = embedded_context(get_settings())
    job_id = records.create_job(ctx.sessions, records.Submission(str(prc_sets[0]), str(prc_sets[1]), config),
                                mode="embedded").job_id
    return ctx, job_id, plan_job, reduce_job, run_shard


def test_a_tile_whose_worker_died_is_handed_out_again_when_its_lease_ends(prc_sets, weights_path) -> None:
    import time

    from evalfarm.config import EvalConfig
    from evalfarm.models import FeatureExtractor, Weights
    from evalfarm.models.weights import file_sha256
    from evalfarm.scheduler.steps import run_prc_tile

    config = EvalConfig(metrics=("prc",), extractors=(keys.INCEPTION,), prc_block=7, prc_tile=7, shard_size=100)
    ctx, job_id, plan_job, reduce_job, run_shard = tiles_job(prc_sets, config)
    net = FeatureExtractor(Weights(weights_path, file_sha256(weights_path)), "cpu")
    for side, index in plan_job(ctx, job_id, {keys.INCEPTION: net.weights.sha256}).shards:
        run_shard(ctx, job_id, side, index, net, num_workers=0)
    first = reduce_job(ctx, job_id, pending_s=0.2)
    assert len(first.tiles) == 2 * 9 and first.result is None  # 3 × 3 tiles of each side's distances
    assert reduce_job(ctx, job_id, pending_s=0.2).tiles == ()  # all sent: nothing is sent twice
    time.sleep(0.3)  # the worker that took them died before starting them: their messages are presumed lost
    again = reduce_job(ctx, job_id, pending_s=0.2)
    assert set(again.tiles) == set(first.tiles)
    run_prc_tile(ctx, job_id, again.tiles[0], lease_s=0.2)  # started; its worker dies after storing nothing:
    ctx.partials._blobs.pop((job_id, again.tiles[0]))  # noqa: SLF001 - as if it had died mid-tile
    ctx.partials.lease(job_id, again.tiles[0], 0.2)  # its lease, still live, is left to it (it was no longer
    assert reduce_job(ctx, job_id, pending_s=0.2).tiles == ()  # marked sent once it started)
    time.sleep(0.3)  # its lease runs out (and the others' messages are presumed lost again): all are sent again
    assert set(reduce_job(ctx, job_id, pending_s=0.2).tiles) == set(first.tiles)
    for name in again.tiles:
        run_prc_tile(ctx, job_id, name)
    cover = reduce_job(ctx, job_id)
    assert len(cover.tiles) == 9 and all("/cover/" in t for t in cover.tiles)
    for name in cover.tiles:
        run_prc_tile(ctx, job_id, name)
    lost = cover.tiles[0]
    ctx.partials._blobs[(job_id, lost)] = b"garbage"  # noqa: SLF001 - one result altered on disk: it no longer
    assert reduce_job(ctx, job_id).tiles == (lost,)  # matches its digest, and is computed again, not guessed
    run_prc_tile(ctx, job_id, lost)
    done = reduce_job(ctx, job_id).result
    expected = evalfarm.evaluate(str(prc_sets[0]), str(prc_sets[1]), weights=str(weights_path), device="cpu",
                                 config=config)
    assert {k: done[k] for k in expected["metric_keys"]} == {k: expected[k] for k in expected["metric_keys"]}


def test_a_tile_waiting_in_the_queue_longer_than_a_lease_is_not_sent_again_and_duplicates_do_nothing(
    prc_sets, weights_path
) -> None:
    """Many tiles queue behind few workers: a tile sent is not sent again while its message may still be waiting
    (`pending_s`), however long a running tile's lease is; a second delivery of a tile that runs or is done
    neither runs it nor counts a start, so duplicates never add up to the attempt limit."""
    import time

    from evalfarm.config import EvalConfig
    from evalfarm.models import FeatureExtractor, Weights
    from evalfarm.models.weights import file_sha256
    from evalfarm.scheduler.steps import run_prc_tile

    config = EvalConfig(metrics=("prc",), extractors=(keys.INCEPTION,), prc_block=7, prc_tile=7, shard_size=100)
    ctx, job_id, plan_job, reduce_job, run_shard = tiles_job(prc_sets, config)
    net = FeatureExtractor(Weights(weights_path, file_sha256(weights_path)), "cpu")
    for side, index in plan_job(ctx, job_id, {keys.INCEPTION: net.weights.sha256}).shards:
        run_shard(ctx, job_id, side, index, net, num_workers=0)
    first = reduce_job(ctx, job_id, pending_s=60)
    time.sleep(0.3)  # longer than the lease below: still waiting in the queue, not lost
    assert reduce_job(ctx, job_id, pending_s=60).tiles == ()
    done, running = first.tiles[0], first.tiles[1]
    run_prc_tile(ctx, job_id, done, lease_s=0.2)
    ctx.partials.lease(job_id, running, 60)  # another worker runs it
    for _ in range(6):  # more deliveries than the attempt limit
        run_prc_tile(ctx, job_id, done, lease_s=0.2)
        run_prc_tile(ctx, job_id, running, lease_s=0.2)
    assert ctx.partials._attempts == {(job_id, done): 1}  # noqa: SLF001 - one start counted, for the one run


def test_a_tile_started_too_often_fails_the_job(prc_sets, weights_path) -> None:
    from evalfarm.config import EvalConfig
    from evalfarm.errors import JobError
    from evalfarm.models import FeatureExtractor, Weights
    from evalfarm.models.weights import file_sha256
    from evalfarm.scheduler.steps import MAX_ATTEMPTS, run_prc_tile

    config = EvalConfig(metrics=("prc",), extractors=(keys.INCEPTION,), shard_size=100)
    ctx, job_id, plan_job, reduce_job, run_shard = tiles_job(prc_sets, config)
    net = FeatureExtractor(Weights(weights_path, file_sha256(weights_path)), "cpu")
    for side, index in plan_job(ctx, job_id, {keys.INCEPTION: net.weights.sha256}).shards:
        run_shard(ctx, job_id, side, index, net, num_workers=0)
    name = reduce_job(ctx, job_id).tiles[0]
    for _ in range(MAX_ATTEMPTS):
        ctx.partials.attempt(job_id, name)  # started, and its worker died, each time
    with pytest.raises(JobError, match=r"precision/recall tile inception-v3-compat/nearest-samples/0 started 4 times"):
        run_prc_tile(ctx, job_id, name)
