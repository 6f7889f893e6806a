"""Section 1: featurization speed of evalfarm vs torch-fidelity vs pytorch-fid on the same images.

Three timings per tool and image set, each after a small warm-up run of that tool:
- pure featurization with a network already built (evalfarm `featurize_range`, torch-fidelity's
  `get_featuresdict_from_dataset`, pytorch-fid's `get_activations`): the throughput that scales;
- the whole user-facing call (evalfarm `evaluate`, torch-fidelity `calculate_metrics`) on set A against
  set B, which adds weight loading, hashing, planning and metric math: what a user waits for.
The metric values of the whole calls are compared (evalfarm must equal torch-fidelity within 1e-4).
pytorch-fid resizes with `F.interpolate` rather than TF1's bilinear resize, so its FID differs by design.
"""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from common import (
    FLOPS_PER_IMAGE,
    Report,
    best_of,
    matmul_gflops,
    relative_difference,
    section_header,
    sync_fn,
    timed,
    write_image_set,
)

PARITY_RTOL = 1e-4
BATCH_SIZE = 64  #: every tool's batch size (evalfarm's and torch-fidelity's default)
SPLITS, SEED = 10, 2020  #: IS splits and torch-fidelity's rng_seed, evalfarm's defaults


@dataclass
class ImageSet:
    label: str
    folder: Path
    n: int

    @property
    def files(self) -> list[str]:
        return sorted(str(p) for p in self.folder.iterdir() if p.suffix in (".png", ".jpg"))


@dataclass
class Workload:
    """Set A (small PNGs) and set B (JPEGs), plus tiny copies of both for warm-ups."""

    a: ImageSet
    b: ImageSet
    warm_a: ImageSet
    warm_b: ImageSet

    @property
    def sets(self) -> tuple[ImageSet, ImageSet]:
        return self.a, self.b


def default_sizes(quick: bool) -> tuple[int, int]:
    """(PNG, JPEG) set sizes: 256/128 by default, 32/16 with --quick."""
    return (32, 16) if quick else (256, 128)


def make_workload(root: Path, quick: bool, n_png: int | None = None, n_jpeg: int | None = None) -> Workload:
    d_png, d_jpeg = default_sizes(quick)
    n_png, n_jpeg, n_warm = n_png or d_png, n_jpeg or d_jpeg, 10
    a = ImageSet("png32", write_image_set(root / "png32", n_png, 32, "png", seed=1), n_png)
    b = ImageSet("jpeg256", write_image_set(root / "jpeg256", n_jpeg, 256, "jpg", seed=2), n_jpeg)
    wa = ImageSet("warm-png32", write_image_set(root / "warm-png32", n_warm, 32, "png", seed=3), n_warm)
    wb = ImageSet("warm-jpeg256", write_image_set(root / "warm-jpeg256", n_warm, 256, "jpg", seed=4), n_warm)
    return Workload(a, b, wa, wb)


# ---------------------------------------------------------------------------------------------- evalfarm


def evalfarm_settings(home: Path, weights: Path, device: str) -> Any:
    """Embedded settings in a private home: its own SQLite database and feature store, no downloads."""
    from evalfarm.settings import Settings

    return Settings(
        store=str(home / "store"), database_url="", weights=str(weights), home=str(home),
        allow_download=False, device=device,
    )


def evalfarm_extractor(weights: Path, device: str, precision: str = "fp32") -> Any:
    from evalfarm.models import FeatureExtractor
    from evalfarm.models.weights import Weights, file_sha256

    return FeatureExtractor(Weights(weights, file_sha256(weights)), device, precision)


def evalfarm_featurize(image_set: ImageSet, extractor: Any, device: str, with_is: bool = True) -> tuple[Any, float]:
    """featurize_range over the whole folder with default DataLoader workers; IS split ids as `evaluate` passes."""
    from evalfarm.metrics import split_assignment
    from evalfarm.pipeline import featurize_range
    from evalfarm.sources import open_source

    source = open_source(str(image_set.folder))
    split_ids = split_assignment(len(source), SPLITS, SEED) if with_is else None
    sync = sync_fn(device)
    sync()
    with timed() as t:
        out = featurize_range(source, 0, len(source), extractor, batch_size=BATCH_SIZE, split_ids=split_ids,
                              splits=SPLITS)
        sync()
    return out, t[0]


def evalfarm_fid(out_a: Any, out_b: Any) -> float:
    from evalfarm.metrics import frechet_distance

    return frechet_distance(out_a.mean(), out_a.cov(), out_b.mean(), out_b.cov())


def evalfarm_evaluate(w: Workload, a: ImageSet, b: ImageSet, settings: Any, precision: str = "fp32") -> tuple[dict, float]:
    import evalfarm

    with timed() as t:
        result = evalfarm.evaluate(
            str(a.folder), str(b.folder), settings=settings, weights=settings.weights, device=settings.device,
            metrics=("is", "fid"), cache=False, batch_size=BATCH_SIZE, precision=precision,
        )
    return result, t[0]


# ---------------------------------------------------------------------------------------------- torch-fidelity


def tf_kwargs(weights: Path, cuda: bool, **extra: Any) -> dict[str, Any]:
    return dict(feature_extractor_weights_path=str(weights), cuda=cuda, cache=False, verbose=False,
                batch_size=BATCH_SIZE, **extra)


def torch_fidelity_extractor(weights: Path, cuda: bool) -> Any:
    from torch_fidelity.utils import create_feature_extractor

    return create_feature_extractor("inception-v3-compat", ["2048", "logits_unbiased"], **tf_kwargs(weights, cuda))


def torch_fidelity_featurize(image_set: ImageSet, extractor: Any, weights: Path, cuda: bool, device: str) -> tuple[dict, float]:
    """torch-fidelity's own loop (its DataLoader: min(4, 2·cores) workers) on a network already built."""
    from torch_fidelity.utils import get_featuresdict_from_dataset, prepare_input_from_id

    dataset = prepare_input_from_id(1, **tf_kwargs(weights, cuda, input1=str(image_set.folder)))
    sync = sync_fn(device)
    sync()
    with timed() as t:
        feats = get_featuresdict_from_dataset(dataset, extractor, BATCH_SIZE, cuda, False, False)
        sync()
    return feats, t[0]


def torch_fidelity_metrics(a: ImageSet, b: ImageSet, weights: Path, cuda: bool) -> tuple[dict, float]:
    import torch_fidelity

    with timed() as t:
        metrics = torch_fidelity.calculate_metrics(
            input1=str(a.folder), input2=str(b.folder), isc=True, fid=True, **tf_kwargs(weights, cuda)
        )
    return metrics, t[0]


# ---------------------------------------------------------------------------------------------- pytorch-fid


def pytorch_fid_model(weights: Path, device: str) -> Any:
    """pytorch-fid's FID-InceptionV3, its weight download replaced by reading our file."""
    import pytorch_fid.inception as inception
    import torch

    original = inception.load_state_dict_from_url
    inception.load_state_dict_from_url = lambda *_a, **_k: torch.load(weights, map_location="cpu")
    try:
        model = inception.InceptionV3([inception.InceptionV3.BLOCK_INDEX_BY_DIM[2048]])
    finally:
        inception.load_state_dict_from_url = original
    return model.to(device).eval()


def pytorch_fid_workers() -> int:
    """What pytorch-fid's command line uses: min(usable cores, 8)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return min(cores, 8)


def pytorch_fid_featurize(image_set: ImageSet, model: Any, device: str) -> tuple[np.ndarray, float]:
    import pytorch_fid.fid_score as fid_score

    fid_score.tqdm = lambda x, **_k: x  # no progress bars in the benchmark output
    sync = sync_fn(device)
    sync()
    with timed() as t, contextlib.redirect_stdout(io.StringIO()):  # its "batch size is bigger" print
        acts = fid_score.get_activations(image_set.files, model, BATCH_SIZE, 2048, device, pytorch_fid_workers())
        sync()
    return acts, t[0]


def pytorch_fid_fid(acts_a: np.ndarray, acts_b: np.ndarray) -> tuple[float | None, str]:
    """pytorch-fid's own FID; its `sqrtm(..., disp=False)` may fail on new SciPy or rank-deficient sets."""
    from pytorch_fid.fid_score import calculate_frechet_distance

    mu1, s1 = acts_a.mean(axis=0), np.cov(acts_a, rowvar=False)
    mu2, s2 = acts_b.mean(axis=0), np.cov(acts_b, rowvar=False)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return float(calculate_frechet_distance(mu1, s1, mu2, s2)), "pytorch-fid calculate_frechet_distance"
    except (TypeError, ValueError) as exc:
        from evalfarm.metrics import frechet_distance

        return frechet_distance(mu1, s1, mu2, s2), f"evalfarm frechet_distance (pytorch-fid's failed: {exc})"


# ---------------------------------------------------------------------------------------------- the section


@dataclass
class Throughput:
    """Seconds per tool per set; images/s are derived."""

    seconds: dict[tuple[str, str], float] = field(default_factory=dict)
    outputs: dict[tuple[str, str], Any] = field(default_factory=dict)

    def record(self, report: Report, tool: str, image_set: ImageSet, output: Any, seconds: float) -> None:
        self.seconds[(tool, image_set.label)] = seconds
        self.outputs[(tool, image_set.label)] = output
        report.figure(f"featurize.{image_set.label}.{tool}.images_per_s", image_set.n / seconds, "images/s")

    def total_ips(self, tool: str, sets: tuple[ImageSet, ...]) -> float:
        return sum(s.n for s in sets) / sum(self.seconds[(tool, s.label)] for s in sets)


TOOLS = ("evalfarm", "torch_fidelity", "pytorch_fid")


def warm_up(w: Workload, nets: dict[str, Any], weights: Path, device: str, cuda: bool) -> None:
    """One small run of every tool: DataLoader start, thread pools, cuDNN autotuning, lazy imports."""
    for s in (w.warm_a, w.warm_b):
        evalfarm_featurize(s, nets["evalfarm"], device)
        torch_fidelity_featurize(s, nets["torch_fidelity"], weights, cuda, device)
        pytorch_fid_featurize(s, nets["pytorch_fid"], device)


def measure_throughput(report: Report, w: Workload, nets: dict[str, Any], weights: Path, device: str) -> Throughput:
    cuda = device == "cuda"
    tp = Throughput()
    for s in w.sets:
        out, sec = evalfarm_featurize(s, nets["evalfarm"], device)
        tp.record(report, "evalfarm", s, out, sec)
        feats, sec = torch_fidelity_featurize(s, nets["torch_fidelity"], weights, cuda, device)
        tp.record(report, "torch_fidelity", s, feats, sec)
        acts, sec = pytorch_fid_featurize(s, nets["pytorch_fid"], device)
        tp.record(report, "pytorch_fid", s, acts, sec)
    for tool in TOOLS:
        report.figure(f"featurize.both.{tool}.images_per_s", tp.total_ips(tool, w.sets), "images/s")
    return tp


def report_ceiling(report: Report, tp: Throughput, w: Workload, device: str, net_ips: float) -> None:
    size = 8192 if device == "cuda" else 2048
    gflops = report.figure(f"featurize.matmul_fp32_{size}.gflops", matmul_gflops(device, size), "GFLOP/s")
    ceiling = report.figure("featurize.flop_ceiling.images_per_s", gflops * 1e9 / FLOPS_PER_IMAGE, "images/s")
    report.note(f"ceiling = matmul rate / {FLOPS_PER_IMAGE / 1e9:.1f} GFLOP per image")
    for tool in TOOLS:
        report.figure(f"featurize.both.{tool}.pct_of_ceiling", 100 * tp.total_ips(tool, w.sets) / ceiling, "%")
    report.figure("featurize.network_only.evalfarm.pct_of_ceiling", 100 * net_ips / ceiling, "%")
    report.figure("featurize.both.evalfarm.pct_of_network_only", 100 * tp.total_ips("evalfarm", w.sets) / net_ips, "%")


def network_only(report: Report, extractor: Any, device: str) -> float:
    """evalfarm's network alone on one in-memory uint8 batch (resize included): the pipeline's upper bound."""
    import torch

    batch = torch.randint(0, 256, (BATCH_SIZE, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    extractor(batch)
    seconds = best_of(lambda: extractor(batch), 20 if device == "cuda" else 1, sync_fn(device))
    return report.figure("featurize.network_only.evalfarm.images_per_s", BATCH_SIZE / seconds, "images/s")


def input_pipeline(report: Report, root: Path, w: Workload) -> None:
    """What the decode side can feed a network: evalfarm's DataLoader alone (default workers, no network).

    On a CPU the network is slower than this by orders of magnitude; on a GPU it must stay above the model's
    images/s or the GPU waits. Also times the host-side statistics of one batch, which run between forward
    passes: FeatureStats.add's in-place syrk against the plain `gram += x.T @ x` it replaced.
    """
    import numpy as np
    import torch

    from evalfarm.metrics import FeatureStats
    from evalfarm.pipeline.featurize import _BatchDataset, default_num_workers
    from evalfarm.sources import open_source

    path = root / "images" / "input-32.npz"
    if not path.exists():
        np.savez(path, arr_0=np.random.default_rng(7).integers(0, 256, (8192, 32, 32, 3), dtype=np.uint8))
    workers = default_num_workers()
    for label, uri in (("npz32", str(path)), (w.b.label, str(w.b.folder))):
        source = open_source(uri)
        loader = torch.utils.data.DataLoader(
            _BatchDataset(source, 0, len(source), BATCH_SIZE, "tf"), batch_size=None, num_workers=workers,
            prefetch_factor=4,
        )
        with timed() as t:
            n = sum(len(batch) for batch in loader)
        report.figure(f"featurize.input_pipeline.{label}.images_per_s", n / t[0], "images/s")
    rng = np.random.default_rng(8)
    pool3 = np.abs(rng.standard_normal((BATCH_SIZE, 2048), dtype=np.float32))
    fc = rng.standard_normal((2048, 1008))
    acc, gram = FeatureStats.new(2048, keep_features=False), np.zeros((2048, 2048))
    splits, split_ids = FeatureStats.new(1, splits=SPLITS, classes=1008), rng.integers(0, SPLITS, BATCH_SIZE)
    no_rows = np.zeros((BATCH_SIZE, 1))

    def plain_gram() -> None:
        nonlocal gram
        x = pool3.astype(np.float64)
        gram += x.T @ x

    for name, fn in (
        ("gram_syrk", lambda: acc.add(pool3)),
        ("gram_plain_matmul", plain_gram),
        ("logits_and_is_sums", lambda: splits.add(no_rows, pool3.astype(np.float64) @ fc, split_ids)),
    ):
        fn()
        report.figure(f"featurize.host_stats.{name}_ms_per_batch", 1e3 * best_of(fn, 5), "ms")
    report.note(f"host statistics per batch of {BATCH_SIZE}: they run between forward passes on the host CPU")


def report_ratios(report: Report, tp: Throughput, w: Workload) -> None:
    for s in w.sets:
        for peer in ("torch_fidelity", "pytorch_fid"):
            r = tp.seconds[(peer, s.label)] / tp.seconds[("evalfarm", s.label)]
            report.figure(f"featurize.{s.label}.ratio_evalfarm_over_{peer}", r, "x")
    for peer in ("torch_fidelity", "pytorch_fid"):
        r = tp.total_ips("evalfarm", w.sets) / tp.total_ips(peer, w.sets)
        report.figure(f"featurize.both.ratio_evalfarm_over_{peer}", r, "x")


def whole_runs(report: Report, w: Workload, settings: Any, weights: Path, cuda: bool) -> tuple[dict, dict]:
    """evaluate() vs calculate_metrics() on A against B, each warmed up once on the tiny sets."""
    evalfarm_evaluate(w, w.warm_a, w.warm_b, settings)
    torch_fidelity_metrics(w.warm_a, w.warm_b, weights, cuda)
    n = w.a.n + w.b.n
    ours, t_ours = evalfarm_evaluate(w, w.a, w.b, settings)
    report.figure("featurize.evaluate_is_fid.wall_s", t_ours, "s")
    report.figure("featurize.evaluate_is_fid.images_per_s_wall", n / t_ours, "images/s")
    report.figure("featurize.evaluate_is_fid.result_images_per_second", ours.get("images_per_second"), "images/s")
    theirs, t_theirs = torch_fidelity_metrics(w.a, w.b, weights, cuda)
    report.figure("featurize.torch_fidelity_calculate_metrics.wall_s", t_theirs, "s")
    report.figure("featurize.torch_fidelity_calculate_metrics.images_per_s_wall", n / t_theirs, "images/s")
    report.figure("featurize.ratio_evaluate_wall_over_calculate_metrics_wall", t_ours / t_theirs, "x")
    return ours, theirs


def report_metrics(report: Report, ours: dict, theirs: dict, tp: Throughput, w: Workload) -> None:
    from evalfarm import KEY_FID, KEY_IS_MEAN, KEY_IS_STD

    for key, short in ((KEY_FID, "fid"), (KEY_IS_MEAN, "is_mean"), (KEY_IS_STD, "is_std")):
        report.figure(f"metrics.evalfarm.{short}", ours[key])
        report.figure(f"metrics.torch_fidelity.{short}", theirs[key])
        report.figure(f"metrics.rel_diff_evalfarm_vs_torch_fidelity.{short}", relative_difference(ours[key], theirs[key]))
    worst = max(relative_difference(ours[k], theirs[k]) for k in (KEY_FID, KEY_IS_MEAN))
    report.figure("metrics.parity_fid_is_mean", "PASS" if worst <= PARITY_RTOL else "FAIL",
                  f"(worst rel diff {worst:.2e}, tolerance {PARITY_RTOL:g})")
    fid_pf, how = pytorch_fid_fid(tp.outputs[("pytorch_fid", w.a.label)], tp.outputs[("pytorch_fid", w.b.label)])
    report.figure("metrics.pytorch_fid.fid", fid_pf)
    report.note(f"pytorch-fid FID via {how}; it resizes with F.interpolate, so it is not expected to match")
    fid_direct = evalfarm_fid(tp.outputs[("evalfarm", w.a.label)], tp.outputs[("evalfarm", w.b.label)])
    report.figure("metrics.evalfarm_featurize_range_fid_rel_diff_vs_evaluate", relative_difference(fid_direct, ours[KEY_FID]))


def lower_precisions(report: Report, w: Workload, weights: Path, device: str, tp: Throughput) -> None:
    """CUDA only: bf16/fp16 autocast speed and how far they move FID and IS from fp32."""
    from evalfarm.metrics import inception_score

    fid32 = evalfarm_fid(tp.outputs[("evalfarm", w.a.label)], tp.outputs[("evalfarm", w.b.label)])
    is32 = inception_score(tp.outputs[("evalfarm", w.a.label)])[0]
    fp32_ips = tp.total_ips("evalfarm", w.sets)
    for precision in ("bf16", "fp16"):
        ex = evalfarm_extractor(weights, device, precision)
        evalfarm_featurize(w.warm_a, ex, device)
        (out_a, ta), (out_b, tb) = evalfarm_featurize(w.a, ex, device), evalfarm_featurize(w.b, ex, device)
        ips = report.figure(f"featurize.both.evalfarm_{precision}.images_per_s", (w.a.n + w.b.n) / (ta + tb), "images/s")
        report.figure(f"featurize.both.evalfarm_{precision}.speedup_over_fp32", ips / fp32_ips, "x")
        report.figure(f"metrics.evalfarm_{precision}.fid_rel_dev_vs_fp32", relative_difference(evalfarm_fid(out_a, out_b), fid32))
        report.figure(f"metrics.evalfarm_{precision}.is_mean_rel_dev_vs_fp32",
                      relative_difference(inception_score(out_a)[0], is32))


def configure_cuda() -> None:
    """The same numerics for every tool: evalfarm turns TF32 off and cuDNN autotuning on process-wide anyway."""
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.benchmark = True


def run(
    report: Report, *, root: Path, weights: Path, device: str, quick: bool,
    n_png: int | None = None, n_jpeg: int | None = None,
) -> Workload:
    # torch-fidelity asks for 4 DataLoader workers on 2 cores; that is its behaviour, measured as is.
    warnings.filterwarnings("ignore", message="This DataLoader will create")
    section_header("1. featurize: evalfarm vs torch-fidelity vs pytorch-fid (fp32, same weights, same images)")
    cuda = device == "cuda"
    if cuda:
        configure_cuda()
    w = make_workload(root / "images", quick, n_png, n_jpeg)
    from evalfarm.pipeline.featurize import default_num_workers

    report.note(f"set A: {w.a.n} PNG 32x32; set B: {w.b.n} JPEG 256x256; batch {BATCH_SIZE}; device {device}; "
                f"DataLoader workers: evalfarm {default_num_workers()} (default), torch-fidelity "
                f"{min(4, 2 * (os.cpu_count() or 1))} (its own), pytorch-fid {pytorch_fid_workers()} (its CLI default)")
    nets = {
        "evalfarm": evalfarm_extractor(weights, device),
        "torch_fidelity": torch_fidelity_extractor(weights, cuda),
        "pytorch_fid": pytorch_fid_model(weights, device),
    }
    warm_up(w, nets, weights, device, cuda)
    tp = measure_throughput(report, w, nets, weights, device)
    report_ratios(report, tp, w)
    net_ips = network_only(report, nets["evalfarm"], device)
    input_pipeline(report, root, w)
    report_ceiling(report, tp, w, device, net_ips)
    del nets
    settings = evalfarm_settings(root / "evalfarm-home", weights, device)
    ours, theirs = whole_runs(report, w, settings, weights, cuda)
    report_metrics(report, ours, theirs, tp, w)
    if cuda:
        lower_precisions(report, w, weights, device, tp)
    return w
