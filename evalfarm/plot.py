"""`evalfarm plot`: a metric against the training step, one line per run, as a PNG, SVG or PDF file.

IS and KID carry their spread over splits/subsets as a ± std band; FID has none. Uses matplotlib (the
`plot` extra) without a display.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from evalfarm.errors import EvalfarmError
from evalfarm.keys import INCEPTION, METRIC_FAMILIES, METRIC_LABELS
from evalfarm.runs import Point, series

FORMATS = (".png", ".svg", ".pdf")
DEFAULT_SIZE = (8.0, 4.5)  #: inches; at the default 150 dpi, 1200 x 675 pixels


def plot_runs(histories: Mapping[str, Sequence[Point]], family: str, out: Path, *, title: str | None = None,
              dpi: int = 150, extractor: str | None = None) -> int:
    """Draw `family` (is, fid, kid) of each run against its step into `out`; returns the points drawn.
    Results without a step, or without that metric, are left out."""
    if family not in METRIC_FAMILIES:
        raise EvalfarmError(f"unknown metric {family!r}; one of {', '.join(METRIC_FAMILIES)}")
    if out.suffix.lower() not in FORMATS:
        raise EvalfarmError(f"{out}: the plot is written as {', '.join(FORMATS)}, named by the file's extension")
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display: a training node or a CI runner
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise EvalfarmError("plots need matplotlib: pip install 'evalfarm[plot]'") from exc

    drawn = {run: series(points, family, extractor) for run, points in histories.items()}
    label = METRIC_LABELS[family] + (f" ({extractor})" if extractor and extractor != INCEPTION else "")
    if not any(drawn.values()):
        raise EvalfarmError(f"no result of {', '.join(map(repr, drawn))} has {label} at a step")
    fig, ax = plt.subplots(figsize=DEFAULT_SIZE, layout="constrained")
    try:
        for i, (run, s) in enumerate(drawn.items()):
            if not s:
                continue
            steps = [p[0] for p in s]
            values = [p[1] for p in s]
            # gids name the elements in an SVG: `run-0-line`, `run-0-band`, in the order the runs were given
            (line,) = ax.plot(steps, values, marker="o", markersize=4, linewidth=1.6, label=run, gid=f"run-{i}-line")
            if any(p[2] is not None for p in s):
                lo = [v - (sd or 0.0) for _, v, sd in s]
                hi = [v + (sd or 0.0) for _, v, sd in s]
                ax.fill_between(steps, lo, hi, color=line.get_color(), alpha=0.18, linewidth=0, gid=f"run-{i}-band")
        ax.set_xlabel("training step")
        ax.set_ylabel(label + (" (± std)" if METRIC_FAMILIES[family][1] else ""))
        ax.set_title(title or f"{label} against step")
        ax.grid(True, alpha=0.3)
        ax.legend(loc="best", fontsize="small")
        seeded = sum(not p.canonical_weights for points in histories.values() for p in points)
        if seeded:  # the picture may travel without its command line: say what its numbers are not
            fig.supxlabel(f"{seeded} result(s) from weights other than the canonical FID-Inception file: "
                          "not publishable values", fontsize="x-small", color="#b35900")
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=dpi)
    finally:
        plt.close(fig)
    return sum(len(s) for s in drawn.values())
