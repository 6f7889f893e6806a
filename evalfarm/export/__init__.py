"""Export a run's results where its training team already looks: TensorBoard, MLflow or W&B.

Every result goes under its training step, as `evalfarm/<torch-fidelity key>` (for example
`evalfarm/frechet_inception_distance`), so evalfarm's curves group together beside the training losses. One
module per backend (`tensorboard.py`, `mlflow.py`, `wandb.py`), each importing its library only when used;
this module parses targets and imports none of them.
"""

from __future__ import annotations

import importlib
import logging
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from evalfarm.errors import EvalfarmError

if TYPE_CHECKING:
    from evalfarm.runs import Point

log = logging.getLogger(__name__)

TARGET_FORMS = "tensorboard:DIR, mlflow:TRACKING_URI[#EXPERIMENT] or wandb:PROJECT[/RUN_ID]"
PREFIX = "evalfarm/"  #: metric names are the torch-fidelity keys under this prefix, in every backend
KINDS = ("tensorboard", "mlflow", "wandb")
#: what W&B accepts in a run id, and refuses in a project name
WANDB_RUN_ID = re.compile(r"[A-Za-z0-9_-]+")
WANDB_PROJECT_REFUSED = set("/\\#?%:")


@dataclass(frozen=True)
class Target:
    """A parsed `--to` value: the backend, where in it (DIR, TRACKING_URI or PROJECT), and the optional name
    after the separator (EXPERIMENT or RUN_ID; None means the backend's default)."""

    kind: str
    location: str
    name: str | None = None

    def __str__(self) -> str:
        sep = {"mlflow": "#", "wandb": "/"}.get(self.kind, "")
        return f"{self.kind}:{self.location}" + (f"{sep}{self.name}" if self.name is not None else "")


def parse_target(text: str) -> Target:
    """Check a target string without touching any backend; a bad one is an error naming the accepted forms."""
    kind, colon, rest = text.partition(":")
    kind = kind.strip().lower()
    if not colon or kind not in KINDS:
        raise _bad(text, f"unknown kind {kind!r}" if colon else "no ':' after the kind")
    if kind == "tensorboard":
        if not rest:
            raise _bad(text, "DIR is empty")
        if "://" in rest:
            raise _bad(text, "DIR must be a local directory")
        return Target(kind, rest)
    if kind == "mlflow":
        uri, hash_, experiment = rest.rpartition("#") if "#" in rest else (rest, "", "")
        if not uri:
            raise _bad(text, "TRACKING_URI is empty")
        if hash_ and not experiment:
            raise _bad(text, "EXPERIMENT after '#' is empty")
        return Target(kind, uri, experiment or None)
    project, slash, run_id = rest.partition("/")
    if not project:
        raise _bad(text, "PROJECT is empty")
    if WANDB_PROJECT_REFUSED & set(project):
        raise _bad(text, f"PROJECT may not contain any of {''.join(sorted(WANDB_PROJECT_REFUSED))}")
    if slash and not WANDB_RUN_ID.fullmatch(run_id):
        raise _bad(text, "RUN_ID must be letters, digits, '-' or '_'")
    return Target(kind, project, run_id or None)


def export_run(run: str, points: Sequence[Point], target: str | Target) -> int:
    """Write every result of `run` that has a step to `target`; return how many results were newly written.

    Results without a step are skipped with a warning: a step axis has no place for them, and inventing one
    (their order, their finish time) would draw a curve that is not the training's."""
    target = target if isinstance(target, Target) else parse_target(target)
    placed = [p for p in points if p.step is not None and p.metrics]
    unplaced = sum(p.step is None for p in points)
    if unplaced:
        log.warning("run %s: %d of %d results have no step and were not exported to %s (give --step when "
                    "submitting)", run, unplaced, len(points), target)
    if not placed:  # nothing to add: leave every backend as it is (no empty MLflow or W&B run)
        return 0
    ordered = sorted(placed, key=lambda p: (p.step, wall_time(p)))
    backend = importlib.import_module(f"evalfarm.export.{target.kind}")
    return backend.export(run, ordered, target)


def metric_name(key: str) -> str:
    """The exported name of a result: `evalfarm/frechet_inception_distance` for a torch-fidelity key on its default
    extractor, `evalfarm/dinov2-vit-l-14/frechet_inception_distance` on another (MLflow refuses `@` in names)."""
    name, _, extractor = key.partition("@")
    return PREFIX + (f"{extractor}/{name}" if extractor else name)


def wall_time(point: Point) -> float:
    """When the result was made (its finish time, in Unix seconds); now for a result without one."""
    return point.finished_at.timestamp() if point.finished_at is not None else time.time()


def missing(library: str, extra: str) -> EvalfarmError:
    """The error for a backend library that is not installed, naming the extra that brings it."""
    return EvalfarmError(f"exporting to {extra} needs {library}: pip install 'evalfarm[{extra}]'")


def _bad(text: str, why: str) -> EvalfarmError:
    return EvalfarmError(f"bad export target {text!r}: {why}; use {TARGET_FORMS}")


__all__ = ["PREFIX", "TARGET_FORMS", "Target", "export_run", "metric_name", "parse_target"]
