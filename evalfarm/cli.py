"""`evalfarm` command line: a thin click layer over the Python API. Flags mirror `EvalConfig` fields."""

from __future__ import annotations

import csv
import functools
import io
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from evalfarm import keys
from evalfarm.config import (
    DEFAULT_SEED,
    DEFAULT_SHARD_SIZE,
    PRC_BLOCK,
    PRC_NEIGHBORHOOD,
    EvalConfig,
    default_metrics,
    parse_extractors,
    parse_metrics,
)
from evalfarm.errors import EvalfarmError
from evalfarm.export import TARGET_FORMS as EXPORT_TARGETS
from evalfarm.settings import get_settings

SEEDED_WEIGHTS_WARNING = (
    "WARNING: these weights are not the canonical FID-Inception file (sha256 {sha}…). The numbers below are "
    "only comparable to numbers computed with the same file; they are not FID/IS/KID values you can publish."
)


def _errors(fn: Callable) -> Callable:
    """Print evalfarm's own errors as one clear line (no traceback) and exit 1."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except EvalfarmError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(1)

    return wrapper


def metric_options(fn: Callable) -> Callable:
    """The flags that define how metrics are computed, shared by `eval` and `submit`."""
    d = EvalConfig()
    options = [
        click.option("--metrics", default=None,
                     help="Comma-separated subset of is,fid,kid,prc (prc: precision, recall and F-score). "
                          "[default: is,fid,kid; fid,kid when --extractor leaves out Inception]"),
        click.option("--extractor", "extractors", default=None, metavar="NAME[,NAME...]",
                     help="Feature extractors for FID, KID and PRC, the first reported under torch-fidelity's keys: "
                          f"{', '.join(keys.EXTRACTOR_NAMES)} (default: {keys.INCEPTION}, and {keys.VGG16} for prc)."),
        click.option("--splits", type=int, default=d.splits, show_default=True, help="Inception Score splits."),
        click.option("--kid-subsets", type=int, default=d.kid_subsets, show_default=True),
        click.option("--kid-subset-size", type=int, default=d.kid_subset_size, show_default=True),
        click.option("--kid-shrink", is_flag=True, help="Shrink the KID subset to the smaller set's size if needed."),
        click.option("--seed", type=int, default=DEFAULT_SEED, show_default=True, help="torch-fidelity's rng_seed."),
        click.option("--resize", type=click.Choice(["tf", "clean"]), default="tf", show_default=True,
                     help="tf: TF1 bilinear (torch-fidelity, original TF code); clean: PIL bicubic (clean-fid)."),
        click.option("--batch-size", type=int, default=d.batch_size, show_default=True),
        click.option("--shard-size", type=int, default=DEFAULT_SHARD_SIZE, show_default=True,
                     help="Samples per shard; results do not depend on it."),
        click.option("--precision", type=click.Choice(["fp32", "bf16", "fp16"]), default="fp32", show_default=True,
                     help="Lower precision is faster on GPUs but moves the numbers; fp32 matches the reference."),
        click.option("--no-cache", is_flag=True, help="Neither reuse nor store cached reference statistics."),
        click.option("--prc-neighborhood", type=int, default=PRC_NEIGHBORHOOD, show_default=True,
                     help="Precision/recall: a sample's radius reaches its k-th nearest neighbour."),
        click.option("--prc-tile", type=int, default=PRC_BLOCK, show_default=True,
                     help="Precision/recall: rows and columns of one distance tile (one task; a multiple of "
                          "--prc-block). Results do not depend on it."),
        click.option("--prc-block", type=int, default=PRC_BLOCK, show_default=True,
                     help="Precision/recall: the distance block; torch-fidelity's own at 10000 (bit-exact), "
                          "another one moves distances by float32 rounding."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def config_from_flags(kw: dict[str, Any]) -> EvalConfig:
    try:
        extractors = parse_extractors(kw.pop("extractors") or "")
        metrics = kw.pop("metrics")
        if metrics is None:  # IS exists on Inception alone: not asked for by default when Inception is not used
            metrics = ",".join(default_metrics(extractors))
        return EvalConfig(
            metrics=parse_metrics(metrics),
            splits=kw.pop("splits"),
            kid_subsets=kw.pop("kid_subsets"),
            kid_subset_size=kw.pop("kid_subset_size"),
            kid_shrink=kw.pop("kid_shrink"),
            seed=kw.pop("seed"),
            resize=kw.pop("resize"),
            batch_size=kw.pop("batch_size"),
            shard_size=kw.pop("shard_size"),
            precision=kw.pop("precision"),
            cache=not kw.pop("no_cache"),
            extractors=extractors,
            prc_neighborhood=kw.pop("prc_neighborhood"),
            prc_tile=kw.pop("prc_tile"),
            prc_block=kw.pop("prc_block"),
        )
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc


def extractor_weights_option(fn: Callable) -> Callable:
    return click.option(
        "--extractor-weights", "extractor_weights", multiple=True, metavar="[NAME=]PATH",
        help="Local weight file of an extractor other than Inception (env EVALFARM_WEIGHTS_<NAME>, e.g. "
             "EVALFARM_WEIGHTS_DINOV2_VIT_L_14). NAME= may be left out when one such extractor is used. Repeatable.",
    )(fn)


def parse_extractor_weights(values: tuple[str, ...], config: EvalConfig) -> dict[str, str]:
    """NAME=PATH pairs; a bare PATH belongs to the one extractor other than Inception the job uses."""
    others = [e for e in config.featurizers if e != keys.INCEPTION]
    out: dict[str, str] = {}
    for value in values:
        name, sep, path = value.partition("=")
        if sep and name in keys.EXTRACTOR_NAMES:
            out[name] = path
        elif len(others) == 1:
            out[others[0]] = value
        else:
            raise click.BadParameter(
                f"--extractor-weights {value!r}: say which extractor it is for (NAME=PATH); this job uses "
                f"{', '.join(others) or 'no extractor other than Inception (use --weights for it)'}"
            )
    unused = [n for n in out if n not in config.featurizers]
    if unused:
        raise click.BadParameter(f"--extractor-weights for {', '.join(unused)}, which this job does not use")
    return out


def parse_tags(tags: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for t in tags:
        k, sep, v = t.partition("=")
        if not sep or not k:
            raise click.BadParameter(f"--tag takes KEY=VALUE, got {t!r}")
        out[k] = v
    return out


_ROWS = (  # label on Inception, label on other extractors, value key, std key
    ("Inception Score", "Inception Score", keys.KEY_IS_MEAN, keys.KEY_IS_STD),
    ("FID", "FD", keys.KEY_FID, None),
    ("KID", "KD", keys.KEY_KID_MEAN, keys.KEY_KID_STD),
    ("Precision", "Precision", keys.KEY_PRECISION, None),
    ("Recall", "Recall", keys.KEY_RECALL, None),
    ("F-score", "F-score", keys.KEY_F_SCORE, None),
)


def format_result(result: dict[str, Any]) -> str:
    extractors = result.get("extractors") or {
        keys.INCEPTION: {"weights_sha256": result.get("weights_sha256"),
                         "weights_canonical": result.get("weights_canonical", True), "metrics": result}
    }
    lines = []
    for name, info in extractors.items():
        if info.get("weights_canonical") is False:
            if name == keys.INCEPTION:
                lines.append(SEEDED_WEIGHTS_WARNING.format(sha=(info.get("weights_sha256") or "")[:12]))
            else:
                lines.append(f"WARNING: these {name} weights are not its published file (sha256 "
                             f"{(info.get('weights_sha256') or '')[:12]}…); the numbers are not publishable.")
    for name, info in extractors.items():
        values = info.get("metrics") or {}
        if len(extractors) > 1 and values:
            lines.append(f"  {name}")
        for inception_label, label, mean_key, std_key in _ROWS:
            if mean_key in values:
                shown = inception_label if name == keys.INCEPTION else label
                value = f"{values[mean_key]:.6g}" + (f" ± {values[std_key]:.4g}" if std_key else "")
                lines.append(f"  {shown:<16} {value}")
    lines.append(f"  {'samples':<16} {result.get('n_samples')}   reference: {result.get('n_reference')}")
    ips = result.get("images_per_second")
    lines.append(
        f"  {'featurized':<16} {result.get('images_featurized')} images"
        + (f" at {ips:.1f} images/s" if ips else " (reference statistics reused)")
    )
    held = ", ".join(f"{n} {(i.get('weights_sha256') or '')[:16]}…" if len(extractors) > 1
                     else f"{(i.get('weights_sha256') or '')[:16]}…" for n, i in extractors.items())
    lines.append(f"  {'resize':<16} {result.get('resize')}   weights sha256 {held}")
    lines.append(f"  {'job':<16} {result.get('job_id')}")
    return "\n".join(lines)


def farm_client() -> Any:
    """The light HTTP client when EVALFARM_API_URL is set, else the farm's database and broker directly."""
    if get_settings().api_url:
        from evalfarm.client import Client

        return Client()
    from evalfarm.farm import Farm

    return Farm()


def submitted_path(uri: str) -> str:
    """A relative local path means the user's working directory, not the farm's: make it absolute."""
    from evalfarm.sources.base import is_url

    return uri if is_url(uri) or os.path.isabs(uri) or not os.path.exists(uri) else os.path.abspath(uri)


def write_json(path: str, result: dict[str, Any]) -> None:
    with click.open_file(path, "w") as f:
        json.dump(result, f, indent=2, sort_keys=True)
        f.write("\n")


@click.group()
@click.version_option(package_name="evalfarm")
def main() -> None:
    """evalfarm: IS, FID and KID for large sample sets, on one machine or a Celery farm."""


@main.command("eval")
@click.argument("samples")
@click.option("--ref", help="Reference: a sample set, a named reference, or a pytorch-fid mu/sigma .npz.")
@metric_options
@click.option("--weights", envvar="EVALFARM_WEIGHTS", help="Local Inception weight file (env EVALFARM_WEIGHTS).")
@extractor_weights_option
@click.option("--device", default=None, help="cpu, cuda, cuda:N or auto (default: EVALFARM_DEVICE or auto).")
@click.option("--loader-workers", type=int, default=None, help="Decoding processes (default: EVALFARM_LOADER_WORKERS, else cores - 1, at most 8).")
@click.option("--json", "json_path", help="Write the result document to this file ('-' for stdout).")
@click.option("--run", help="Run name to file the result under.")
@click.option("--step", type=int, help="Training step / checkpoint of these samples.")
@click.option("--tag", "tags", multiple=True, help="KEY=VALUE, repeatable.")
@click.option("--export", "exports", multiple=True, metavar="TARGET",
              help=f"Then export the run to {EXPORT_TARGETS} (needs --run). Repeatable.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@_errors
def eval_cmd(samples: str, ref: str | None, weights: str | None, extractor_weights: tuple[str, ...],
             device: str | None, loader_workers: int | None, json_path: str | None, run: str | None,
             step: int | None, tags: tuple[str, ...], exports: tuple[str, ...], quiet: bool, **kw: Any) -> None:
    """Evaluate SAMPLES on this machine (no servers needed); stores the result in the local database."""
    from evalfarm.scheduler.embedded import run_embedded

    config = config_from_flags(kw)
    check_exports(exports, run)
    result = run_embedded(
        samples, ref, config, weights=weights, extractor_weights=parse_extractor_weights(extractor_weights, config),
        device=device, run=run, step=step, tags=parse_tags(tags),
        progress=not quiet, num_workers=loader_workers,
    )
    click.echo(format_result(result), err=json_path == "-")
    if json_path:
        write_json(json_path, result)
    if exports:
        from evalfarm.runs import DatabaseResults, run_history

        export_history(run, exports, run_history(run, DatabaseResults()))


@main.command("results")
@click.option("--run", help="Only this run.")
@click.option("--metric", default=None, help="is, fid, kid or a full result key: show one column, sorted by step.")
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json"]), default="table", show_default=True)
@click.option("--limit", type=int, default=None, help="At most this many rows (default: a run's whole history; "
              "without --run, the 50 latest).")
@_errors
def results_cmd(run: str | None, metric: str | None, fmt: str, limit: int | None) -> None:
    """List finished jobs and their metrics: from the farm's API (EVALFARM_API_URL), else the results
    database (EVALFARM_DATABASE_URL, or this machine's)."""
    from evalfarm.runs import all_results, results_source

    source = results_source()
    if run and limit is None:
        rows = all_results(source, run, metric)
    else:
        rows = source.results(run=run, metric=metric, limit=50 if limit is None else limit)
    if fmt == "json":
        click.echo(json.dumps(rows, indent=2, default=str))
        return
    columns = ["job_id", "finished_at", "run", "step", *sorted({k for r in rows for k in r["metrics"]}), "samples"]
    flat = [{**{k: r.get(k) for k in columns}, **r["metrics"]} for r in rows]
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        w.writerows(flat)
        click.echo(buf.getvalue(), nl=False)
        return
    if not flat:
        click.echo("no results")
        return
    def cell(v: Any) -> str:
        return f"{v:.6g}" if isinstance(v, float) else ("" if v is None else str(v)[:36])
    widths = {c: max(len(c), *(len(cell(r.get(c))) for r in flat)) for c in columns}
    click.echo("  ".join(c.ljust(widths[c]) for c in columns))
    for r in flat:
        click.echo("  ".join(cell(r.get(c)).ljust(widths[c]) for c in columns))
    from evalfarm.keys import is_canonical_inception

    seeded = sum(not is_canonical_inception(r.get("weights_sha256")) for r in rows)
    if seeded:
        click.echo(f"note: {seeded} of these results come from weights other than the canonical FID-Inception "
                   "file: they are not publishable FID/IS/KID values", err=True)


@main.command("watch")
@click.argument("directory", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--run", required=True, help="The run its results are filed under.")
@click.option("--ref", help="Reference: a named reference, a sample set, or a pytorch-fid mu/sigma .npz.")
@click.option("--pattern", default="*", show_default=True, help="Which names under DIRECTORY are sample sets (glob).")
@click.option("--every", "every_s", type=float, default=60.0, show_default=True, help="Seconds between polls.")
@click.option("--step-regex", help="Where the step is in a set's name without its extension (its first group); "
              "default: the number after a step word (step, iter, it, ckpt, kimg), else the name's only number.")
@click.option("--once", is_flag=True, help="Evaluate what is there now, wait for it to end, and exit.")
@click.option("--state", "state_path", type=click.Path(dir_okay=False, path_type=Path),
              help="State file (default: DIRECTORY/.evalfarm-watch-RUN.json).")
@click.option("--export", "exports", multiple=True, metavar="TARGET",
              help=f"After each result, export the run to {EXPORT_TARGETS}. Repeatable.")
@click.option("--retry-failed", is_flag=True, help="Evaluate again the sets whose job failed (after fixing the cause).")
@click.option("--farm/--embedded", "on_farm", default=None,
              help="Submit to the farm, or evaluate here (default: the farm when EVALFARM_API_URL is set).")
@metric_options
@click.option("--weights", envvar="EVALFARM_WEIGHTS", help="Local Inception weight file, embedded (env EVALFARM_WEIGHTS).")
@extractor_weights_option
@click.option("--device", default=None, help="Embedded: cpu, cuda, cuda:N or auto.")
@click.option("--tag", "tags", multiple=True, help="KEY=VALUE, repeatable.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@_errors
def watch_cmd(directory: Path, run: str, ref: str | None, pattern: str, every_s: float, step_regex: str | None,
              once: bool, state_path: Path | None, exports: tuple[str, ...], retry_failed: bool, on_farm: bool | None,
              weights: str | None, extractor_weights: tuple[str, ...], device: str | None, tags: tuple[str, ...],
              quiet: bool, **kw: Any) -> None:
    """Evaluate each new complete sample set under DIRECTORY once, as a sidecar of a training job.

    A set (a folder, .npz/.npy, or a tar/zip archive) is complete when NAME.DONE (or DONE inside a set
    folder) exists, or when it did not change between two polls. Its step comes from its name
    (samples_120000.npz, step-120000/). What was submitted is remembered in the state file and by
    idempotency keys, so a restarted watcher never submits a set twice.
    """
    from evalfarm.watch import EmbeddedBackend, FarmBackend, Watcher, WatchOptions

    config = config_from_flags(kw)
    if config.needs_reference and ref is None:
        raise click.UsageError("--ref is required for FID, KID and PRC (or pass --metrics is)")
    if every_s <= 0:
        raise click.BadParameter("--every must be positive")
    check_exports(exports, run)
    on_farm = bool(get_settings().api_url) if on_farm is None else on_farm
    paths = parse_extractor_weights(extractor_weights, config)
    backend = FarmBackend(farm_client()) if on_farm else EmbeddedBackend(weights=weights, extractor_weights=paths,
                                                                         device=device, progress=not quiet)
    opts = WatchOptions(
        root=directory.resolve(), run=run, ref=ref and (submitted_path(ref) if on_farm else ref), config=config,
        pattern=pattern, every_s=every_s, step_regex=step_regex, state_path=state_path, tags=parse_tags(tags),
        exports=exports, retry_failed=retry_failed,
    )
    stopping = _stop_on_signals()
    where = "on the farm" if on_farm else "here"
    click.echo(f"watching {opts.root} for run {run}, every {every_s:g} s, evaluating {where}; "
               f"state in {opts.state_file}", err=True)
    sys.exit(Watcher(opts, backend, _log).run(once=once, stop=stopping))


def _log(line: str) -> None:
    import time

    click.echo(f"{time.strftime('%H:%M:%S')} {line}", err=True)


def _stop_on_signals() -> Callable[[], bool]:
    """SIGTERM and SIGINT end the watch after the current step (its state is saved as it goes)."""
    import signal

    stop = {"asked": False}

    def ask(signum: int, _frame: object) -> None:
        if stop["asked"]:  # a second signal: stop now
            raise KeyboardInterrupt
        stop["asked"] = True
        _log(f"{signal.Signals(signum).name}: stopping after the current set")

    signal.signal(signal.SIGTERM, ask)
    signal.signal(signal.SIGINT, ask)
    return lambda: stop["asked"]


@main.command("export")
@click.option("--run", required=True, help="The run whose results are written.")
@click.option("--to", "targets", multiple=True, required=True, metavar="TARGET",
              help=f"Where to: {EXPORT_TARGETS}. Repeatable.")
@_errors
def export_cmd(run: str, targets: tuple[str, ...]) -> None:
    """Write every result of a run under its training step, where people already look: TensorBoard, MLflow
    or W&B. Exporting again adds only what is new (TensorBoard's file is written anew, sorted by step)."""
    from evalfarm.runs import require_history, results_source

    check_exports(targets, run)  # every target checked before anything is read or written
    export_history(run, targets, require_history(run, results_source()), err=False)


@main.command("plot")
@click.option("--run", "runs", multiple=True, required=True, help="A run to draw; repeat to compare runs.")
@click.option("--metric", type=click.Choice(list(keys.METRIC_FAMILIES)), default="fid", show_default=True)
@click.option("--extractor", type=click.Choice(list(keys.EXTRACTOR_NAMES)), default=None,
              help=f"The metric on this extractor's features (default: {keys.INCEPTION}).")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="The file to write: .png, .svg or .pdf.")
@click.option("--title", help="The plot's title (default: the metric against step).")
@click.option("--dpi", type=click.IntRange(30, 600), default=150, show_default=True)
@_errors
def plot_cmd(runs: tuple[str, ...], metric: str, extractor: str | None, output: Path, title: str | None,
             dpi: int) -> None:
    """Plot a metric against the training step, one line per run (± std bands for IS and KID), from the
    farm's API (EVALFARM_API_URL) or the results database."""
    from evalfarm.plot import plot_runs
    from evalfarm.runs import require_history, results_source

    source = results_source()
    histories = {run: require_history(run, source) for run in dict.fromkeys(runs)}
    drawn = plot_runs(histories, metric, output, title=title, dpi=dpi, extractor=extractor)
    on = f" on {extractor}" if extractor else ""
    click.echo(f"{output}: {keys.METRIC_LABELS[metric]}{on} of {', '.join(histories)}, {drawn} points")


@main.group("ref")
def ref_group() -> None:
    """Named reference statistics, reused by name without featurizing again."""


@ref_group.command("create")
@click.argument("name")
@click.argument("samples")
@click.option("--resize", type=click.Choice(["tf", "clean"]), default="tf", show_default=True)
@click.option("--batch-size", type=int, default=64, show_default=True)
@click.option("--shard-size", type=int, default=DEFAULT_SHARD_SIZE, show_default=True)
@click.option("--extractor", "extractors", default=None, metavar="NAME[,NAME...]",
              help=f"Extractors to store statistics of (default: {keys.INCEPTION}); evaluations against this "
                   "reference may use any of them.")
@click.option("--weights", envvar="EVALFARM_WEIGHTS", help="Local weight file, for --local (the farm uses its workers' weights).")
@extractor_weights_option
@click.option("--device", default=None)
@click.option("--quiet", is_flag=True)
@click.option("--local/--farm", "local", default=None,
              help="Where to featurize (default: the farm when EVALFARM_DATABASE_URL is set, else here).")
@_errors
def ref_create(name: str, samples: str, resize: str, batch_size: int, shard_size: int, extractors: str | None,
               weights: str | None, extractor_weights: tuple[str, ...], device: str | None, quiet: bool,
               local: bool | None) -> None:
    """Featurize SAMPLES once and register the statistics as NAME."""
    from evalfarm.scheduler.embedded import run_embedded

    try:
        config = EvalConfig(metrics=(), resize=resize, batch_size=batch_size, shard_size=shard_size,
                            extractors=parse_extractors(extractors or ""))
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc
    if local is False or (local is None and get_settings().database_url):
        from evalfarm.farm import Farm

        farm = Farm()
        job_id = farm.submit(submitted_path(samples), None, config, kind=keys.JOB_REFERENCE, reference_name=name)
        click.echo(f"creating reference {name} on the farm: job {job_id}", err=True)
        result = farm.wait(job_id)
        click.echo(f"reference {name}: {result['n_samples']} images, resize {resize}")
        return
    result = run_embedded(samples, None, config, weights=weights,
                          extractor_weights=parse_extractor_weights(extractor_weights, config), device=device,
                          kind=keys.JOB_REFERENCE, reference_name=name, progress=not quiet)
    held = ", ".join(f"{e} (weights {v['weights_sha256'][:16]}…)" for e, v in result["extractors"].items())
    click.echo(f"reference {name}: {result['n_samples']} images, resize {resize}, {held}")


@ref_group.command("list")
@_errors
def ref_list() -> None:
    """List named references (the farm's through its API when EVALFARM_API_URL is set)."""
    if get_settings().api_url:
        refs = farm_client().references()
    else:
        from evalfarm.db import session_factory
        from evalfarm.scheduler.queries import list_references

        refs = list_references(session_factory(get_settings().db_url))
    for r in refs:  # a reference of Inception alone shows its hash as it always did; others name each extractor
        extractors = r.get("extractors") or {keys.INCEPTION: r["weights_sha256"]}
        held = (r["weights_sha256"][:16] if list(extractors) == [keys.INCEPTION]
                else ",".join(f"{e}:{sha[:16]}" for e, sha in extractors.items()))
        click.echo(f"{r['name']}\t{r['n']}\t{r['resize']}\t{held}\t{r['uri']}")


# ---------------------------------------------------------------- the farm


@main.command("worker")
@click.option("--queues", default="gpu,cpu", show_default=True, help="gpu: featurization; cpu: planning, reducing.")
@click.option("--device", default=None, help="auto (one process per GPU), cuda, cpu. Default: EVALFARM_DEVICE or auto.")
@click.option("--concurrency", "-c", type=int, default=None, help="Processes (default: number of GPUs, or 1).")
@click.option("--loader-workers", type=int, default=None,
              help="Decode processes per worker process. Default: EVALFARM_LOADER_WORKERS, else the spare cores "
                   "shared out among the worker processes.")
@click.option("--loglevel", default="info", show_default=True)
def worker_cmd(queues: str, device: str | None, concurrency: int | None, loader_workers: int | None,
               loglevel: str) -> None:
    """Run a farm worker on the broker at EVALFARM_REDIS_URL."""

    from evalfarm.pipeline.featurize import default_num_workers

    if device:
        os.environ["EVALFARM_DEVICE"] = device
    if concurrency is None:
        concurrency = _gpu_count() if (device or get_settings().device) in ("auto", "cuda") else 1
    concurrency = max(1, concurrency)
    if loader_workers is None:
        loader_workers = get_settings().loader_workers or default_num_workers(concurrency)
    os.environ["EVALFARM_LOADER_WORKERS"] = str(loader_workers)  # the pool's children read their settings
    if not get_settings().sample_roots:
        click.echo("warning: EVALFARM_SAMPLE_ROOTS is not set: this worker reads any path of a job submitted "
                   "straight to the database, and refuses every job submitted through the API", err=True)
    from evalfarm.workers.app import app

    app.worker_main([
        "worker", "-Q", queues, "-c", str(concurrency), "--pool", "prefork", "-E",
        "-n", f"evalfarm-{os.getpid()}@%h", "--loglevel", loglevel,
    ])


def _gpu_count() -> int:
    # Ask nvidia-smi rather than torch: initialising CUDA in the parent before the pool forks breaks the children.
    import shutil
    import subprocess

    if not shutil.which("nvidia-smi"):
        return 1
    out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True).stdout
    return max(1, sum(line.startswith("GPU ") for line in out.splitlines()))


LOOPBACK = ("127.0.0.1", "localhost", "::1")


@main.command("flower", context_settings={"ignore_unknown_options": True})
@click.option("--address", default="127.0.0.1", show_default=True,
              help="Interface to bind. Any other than loopback needs --basic-auth (or FLOWER_BASIC_AUTH) or --no-auth.")
@click.option("--port", type=int, default=5555, show_default=True)
@click.option("--basic-auth", envvar="FLOWER_BASIC_AUTH", metavar="USER:PASSWORD[,...]",
              help="HTTP basic auth (env FLOWER_BASIC_AUTH; passed to Flower by environment, not on its command line).")
@click.option("--no-auth", is_flag=True, help="Serve a non-loopback address without auth (behind your own proxy).")
@click.argument("flower_args", nargs=-1, type=click.UNPROCESSED)
def flower_cmd(address: str, port: int, basic_auth: str | None, no_auth: bool, flower_args: tuple[str, ...]) -> None:
    """Flower, the live view of workers and tasks (same as `celery -A evalfarm.workers.app flower`).

    It shows task arguments (job ids) and can revoke tasks, so it binds loopback unless told otherwise, and
    refuses to serve another address without authentication unless --no-auth says so.
    """

    if address not in LOOPBACK and not basic_auth and not no_auth:
        raise click.UsageError(
            f"refusing to serve Flower on {address} without authentication: pass --basic-auth USER:PASSWORD "
            "(or set FLOWER_BASIC_AUTH), or --no-auth if a proxy in front of it authenticates."
        )
    if basic_auth:
        os.environ["FLOWER_BASIC_AUTH"] = basic_auth
    os.execvp(sys.executable, [sys.executable, "-m", "celery", "-A", "evalfarm.workers.app:app", "flower",
                               f"--address={address}", f"--port={port}", *flower_args])


@main.command("submit")
@click.argument("samples")
@click.option("--ref", help="Reference: a named reference, a sample set, or a pytorch-fid mu/sigma .npz.")
@metric_options
@click.option("--weights-sha256", help="Require the farm to hold the weights with this SHA-256 (default: the job is "
              "pinned to whatever weights the farm's workers hold).")
@click.option("--run", help="Run name.")
@click.option("--step", type=int, help="Training step / checkpoint.")
@click.option("--tag", "tags", multiple=True, help="KEY=VALUE, repeatable.")
@click.option("--idempotency-key", help="Submitting again with this key returns the same job instead of a new one.")
@click.option("--callback-url", help="POSTed a signed JSON body when the job ends (its host must be in the farm's "
              "EVALFARM_CALLBACK_HOSTS).")
@_errors
def submit_cmd(samples: str, ref: str | None, weights_sha256: str | None, run: str | None, step: int | None,
               tags: tuple[str, ...], idempotency_key: str | None, callback_url: str | None, **kw: Any) -> None:
    """Submit a job to the farm (its API when EVALFARM_API_URL is set); prints the job id as the last line."""
    job_id = farm_client().submit(
        submitted_path(samples), ref and submitted_path(ref), config_from_flags(kw), run=run, step=step, tags=parse_tags(tags),
        weights_sha256=weights_sha256, idempotency_key=idempotency_key, callback_url=callback_url,
    )
    click.echo(f"submitted {samples}" + (f" against {ref}" if ref else ""))
    click.echo(job_id)


@main.command("status")
@click.argument("job_id")
@click.option("--json", "as_json", is_flag=True)
@_errors
def status_cmd(job_id: str, as_json: bool) -> None:
    """State, shards done/total, speed, ETA and failures of a job."""
    st = farm_client().status(job_id)
    if as_json:
        click.echo(json.dumps(st, indent=2, default=str))
        return
    click.echo(f"job {st['job_id']}: {st['state']}")
    click.echo(f"  shards {st['shards_done']}/{st['shards_total']}, images {st['images_done']}/{st['images_total']}")
    if st["images_per_second_per_worker"]:
        click.echo(f"  {st['images_per_second_per_worker']:.1f} images/s per worker"
                   + (f", ETA {st['eta_seconds']:.0f} s" if st["eta_seconds"] is not None else ""))
    for f in st["failures"]:
        click.echo(f"  {f['side']}/{f['shard']} (attempts {f['attempts']}): {f['error']}")
    if st["error"]:
        click.echo(f"  error: {st['error']}")
    if st.get("callback"):
        cb = st["callback"]
        click.echo(f"  callback {cb['url']}: {cb['state']}, {cb['attempts']} attempts"
                   + (f", last HTTP {cb['last_status']}" if cb.get("last_status") else ""))


@main.command("wait")
@click.argument("job_id")
@click.option("--json", "json_path", help="Write the result document here ('-' for stdout).")
@click.option("--timeout", type=float, default=None, help="Seconds; exit 2 if the job is still going.")
@click.option("--export", "exports", multiple=True, metavar="TARGET",
              help=f"Once it succeeded, export the job's run to {EXPORT_TARGETS}. Repeatable.")
@_errors
def wait_cmd(job_id: str, json_path: str | None, timeout: float | None, exports: tuple[str, ...]) -> None:
    """Block until the job ends; exit 1 if it failed or was cancelled."""
    check_exports(exports, "the job's run")
    farm = farm_client()
    try:
        result = farm.wait(job_id, timeout=timeout)
    except TimeoutError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    click.echo(format_result(result), err=json_path == "-")
    if json_path:
        write_json(json_path, result)
    if exports:
        if not result.get("run"):
            raise EvalfarmError(f"job {job_id} has no run: results are exported by run (submit it with --run)")
        from evalfarm.runs import run_history

        export_history(result["run"], exports, run_history(result["run"], farm))


def check_exports(exports: tuple[str, ...], run: str | None) -> None:
    """Every export target valid, and a run to export, before any work starts."""
    if not exports:
        return
    if not run:
        raise click.UsageError("--export writes a run's results by step: give the run (--run)")
    from evalfarm.export import parse_target

    for target in exports:
        parse_target(target)


def export_history(run: str, exports: tuple[str, ...], points: list[Any], *, err: bool = True) -> None:
    """Write the run's results (`evalfarm.runs.Point`s) to each target; stdout may hold a result document."""
    from evalfarm.export import export_run

    for target in exports:
        written = export_run(run, points, target)
        click.echo(f"run {run}: {written} of {len(points)} results written to {target}", err=err)


@main.command("api")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, default=8080, show_default=True)
@click.option("--workers", type=int, default=1, show_default=True, help="Server processes.")
@click.option("--log-level", default="info", show_default=True)
@_errors
def api_cmd(host: str, port: int, workers: int, log_level: str) -> None:
    """Serve the farm's HTTP API (OpenAPI at /openapi.json, docs at /docs) for training infra.

    Every route but /health needs a token (`evalfarm token create`); submitted paths must lie inside
    EVALFARM_SAMPLE_ROOTS, and webhooks go only to EVALFARM_CALLBACK_HOSTS.
    """
    from evalfarm.api.serve import serve

    settings = get_settings()
    if not settings.database_url:
        raise EvalfarmError("the API serves the farm: set EVALFARM_DATABASE_URL (and EVALFARM_REDIS_URL)")
    if not settings.sample_roots:
        click.echo("warning: EVALFARM_SAMPLE_ROOTS is not set: every submission of a path will be refused",
                   err=True)
    from evalfarm.workers.outages import is_outage

    try:  # here, once: a clear line rather than each server process's traceback, and the schema up to date
        _farm_sessions()
    except Exception as exc:
        if not is_outage(exc):
            raise
        raise EvalfarmError(f"cannot reach the farm's database (EVALFARM_DATABASE_URL): "
                            f"{str(exc).splitlines()[0][:300]}") from exc
    serve(host, port, workers=workers, log_level=log_level)


@main.group("token")
def token_group() -> None:
    """API tokens (stored as hashes in the farm's database, EVALFARM_DATABASE_URL)."""


def _farm_sessions() -> Any:
    """Sessions on the farm's database (migrated to the latest schema), for the commands that need it."""
    from evalfarm.db import session_factory

    settings = get_settings()
    if not settings.database_url:
        raise EvalfarmError("tokens live in the farm's database: set EVALFARM_DATABASE_URL")
    return session_factory(settings.db_url)


@token_group.command("create")
@click.argument("name")
@click.option("--scopes", default="read,submit", show_default=True, help="Comma-separated: read, submit, admin.")
@_errors
def token_create(name: str, scopes: str) -> None:
    """Create a token; prints it as the last line (it is shown only this once)."""
    from evalfarm.scheduler.tokens import create_token, parse_scopes

    token = create_token(_farm_sessions(), name, parse_scopes(scopes))
    click.echo(f"token {name} ({scopes}); keep it secret, it is not shown again:", err=True)
    click.echo(token)


@token_group.command("list")
@_errors
def token_list() -> None:
    """Tokens by name, with scopes and when they were created, last used and revoked."""
    from evalfarm.scheduler.tokens import list_tokens

    for t in list_tokens(_farm_sessions()):
        when = {k: (t[k].isoformat(timespec="seconds") if t[k] else "-") for k in ("created_at", "last_used_at")}
        state = f"revoked {t['revoked_at'].isoformat(timespec='seconds')}" if t["revoked_at"] else "active"
        click.echo(f"{t['name']}\t{t['scopes']}\t{state}\tcreated {when['created_at']}\tlast used {when['last_used_at']}")


@token_group.command("revoke")
@click.argument("name")
@_errors
def token_revoke(name: str) -> None:
    """Revoke a token: its requests are refused from now on."""
    from evalfarm.scheduler.tokens import revoke_token

    if not revoke_token(_farm_sessions(), name):
        raise EvalfarmError(f"no active token named {name!r}")
    click.echo(f"token {name} revoked")


@main.command("cancel")
@click.argument("job_id")
@_errors
def cancel_cmd(job_id: str) -> None:
    """Cancel a job: queued shards are skipped, running shards stop at their next batch."""
    click.echo(f"job {job_id}: " + ("cancelled" if farm_client().cancel(job_id) else "already finished"))


if __name__ == "__main__":
    main()
