"""Charts as inline SVG, drawn on the server by one pure function: series in, SVG text out.

The dashboard's pages therefore need no JavaScript plotting library (nothing to ship, nothing to fetch
at run time, nothing for a Content-Security-Policy to allow). Every plotted point is a
`<circle class="point" data-run data-step data-value>` with a `<title>` tooltip, and a metric's ± std is a
`<path class="band">`, so that tests and scrapers can read a chart back. Non-finite values are never
drawn, and every string that came from a user (run names) is escaped. Colours are presentation
attributes rather than `style`, which a strict Content-Security-Policy would block.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape

#: matplotlib's tab10: distinct hues that stay distinguishable for most colour-blind readers
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf")

WIDTH, HEIGHT = 440, 280  #: the viewBox; the page's CSS scales the chart to its column
_LEFT, _RIGHT, _TOP, _BOTTOM = 62, 14, 12, 42  #: room for the y tick labels and the axis labels
_TICKS = 5  #: about this many ticks per axis
_MARGIN = 0.05  #: of the data's span, left free at either end of an axis
_HUGE = 1e300  #: beyond this a value is not drawn: the scale arithmetic would overflow (and NaN fails `<`)
_BAND_HALF_WIDTH = 4  #: a lone point's ± std is drawn as a bar this many pixels either side


@dataclass(frozen=True)
class Series:
    """One line: a run's name, its (step, value, std or None) points in any order, and its colour."""

    name: str
    points: Sequence[tuple[float, float, float | None]]
    colour: str = PALETTE[0]


def colour(i: int) -> str:
    """The i-th series' colour (the palette repeats after ten)."""
    return PALETTE[i % len(PALETTE)]


def line_chart(series: Sequence[Series], *, metric: str, label: str, width: int = WIDTH, height: int = HEIGHT) -> str:
    """An SVG chart of `label` (e.g. "FID") against step: one line per series, its points, ± std bands where
    there are stds, and axes with ticks. `metric` (e.g. "fid") is written as the chart's data-metric."""
    clean = [(s, _finite(s.points)) for s in series]
    plotted = [pts for _, pts in clean if pts]
    head = (f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" data-metric="{_a(metric)}" role="img" '
            f'viewBox="0 0 {width} {height}" preserveAspectRatio="xMidYMid meet">'
            f"<title>{_t(label)} against step</title>")
    x0, x1, y0, y1 = _LEFT, width - _RIGHT, _TOP, height - _BOTTOM
    frame = f'<rect class="plot" x="{x0}" y="{y0}" width="{x1 - x0}" height="{y1 - y0}" fill="#ffffff" stroke="#cccccc"/>'
    if not plotted:
        return (head + frame + f'<text class="empty" x="{(x0 + x1) / 2:g}" y="{(y0 + y1) / 2:g}" text-anchor="middle" '
                f'fill="#777777" font-size="13">no results</text></svg>')

    steps = [p[0] for pts in plotted for p in pts]
    lows = [p[1] - (p[2] or 0.0) for pts in plotted for p in pts]
    highs = [p[1] + (p[2] or 0.0) for pts in plotted for p in pts]
    xticks, (xlo, xhi) = _axis(min(steps), max(steps))
    yticks, (ylo, yhi) = _axis(min(lows), max(highs))

    def sx(v: float) -> float:
        return x0 + (v - xlo) / (xhi - xlo) * (x1 - x0)

    def sy(v: float) -> float:
        return y1 - (v - ylo) / (yhi - ylo) * (y1 - y0)

    parts = [head, frame]
    xstep, ystep = _spacing(xticks), _spacing(yticks)
    for t in yticks:
        y = sy(t)
        parts.append(f'<line class="grid" x1="{x0}" x2="{x1}" y1="{y:.1f}" y2="{y:.1f}" stroke="#eeeeee"/>'
                     f'<text class="tick y" x="{x0 - 6}" y="{y + 4:.1f}" text-anchor="end" font-size="12" '
                     f'fill="#444444">{_tick_label(t, ystep)}</text>')
    for t in xticks:
        x = sx(t)
        parts.append(f'<line class="tick" x1="{x:.1f}" x2="{x:.1f}" y1="{y1}" y2="{y1 + 5}" stroke="#888888"/>'
                     f'<text class="tick x" x="{x:.1f}" y="{y1 + 18}" text-anchor="middle" font-size="12" '
                     f'fill="#444444">{_tick_label(t, xstep)}</text>')
    parts.append(f'<line class="axis" x1="{x0}" x2="{x1}" y1="{y1}" y2="{y1}" stroke="#888888"/>'
                 f'<line class="axis" x1="{x0}" x2="{x0}" y1="{y0}" y2="{y1}" stroke="#888888"/>'
                 f'<text class="axis-label" x="{(x0 + x1) / 2:g}" y="{height - 6}" text-anchor="middle" '
                 f'font-size="13" fill="#222222">step</text>'
                 f'<text class="axis-label" transform="translate(14 {(y0 + y1) / 2:g}) rotate(-90)" '
                 f'text-anchor="middle" font-size="13" fill="#222222">{_t(label)}</text>')

    for s, pts in clean:
        if not pts:
            continue
        parts.append(f'<g class="series" data-run="{_a(s.name)}">')
        banded = [p for p in pts if p[2] is not None]
        if len(banded) == 1:
            step, value, std = banded[0]
            x, top, bottom = sx(step), sy(value + std), sy(value - std)
            parts.append(f'<path class="band" d="M{x - _BAND_HALF_WIDTH:.1f} {top:.1f}H{x + _BAND_HALF_WIDTH:.1f}'
                         f'V{bottom:.1f}H{x - _BAND_HALF_WIDTH:.1f}Z" fill="{_a(s.colour)}" fill-opacity="0.2" '
                         f'stroke="{_a(s.colour)}" stroke-opacity="0.5"/>')
        elif banded:
            upper = [f"{sx(p[0]):.1f} {sy(p[1] + p[2]):.1f}" for p in banded]
            lower = [f"{sx(p[0]):.1f} {sy(p[1] - p[2]):.1f}" for p in reversed(banded)]
            parts.append(f'<path class="band" d="M{"L".join(upper + lower)}Z" fill="{_a(s.colour)}" '
                         f'fill-opacity="0.18" stroke="none"/>')
        if len(pts) > 1:
            line = "L".join(f"{sx(p[0]):.1f} {sy(p[1]):.1f}" for p in pts)
            parts.append(f'<path class="line" d="M{line}" fill="none" stroke="{_a(s.colour)}" stroke-width="2"/>')
        for step, value, std in pts:
            tip = f"{s.name} · step {_number(step)} · {label} {value:.4g}" + (f" ± {std:.2g}" if std is not None else "")
            parts.append(f'<circle class="point" data-run="{_a(s.name)}" data-step="{_number(step)}" '
                         f'data-value="{value!r}" cx="{sx(step):.1f}" cy="{sy(value):.1f}" r="4" '
                         f'fill="{_a(s.colour)}" stroke="#ffffff" stroke-width="1"><title>{_t(tip)}</title></circle>')
        parts.append("</g>")
    parts.append("</svg>")
    return "".join(parts)


def _finite(points: Sequence[tuple[float, float, float | None]]) -> list[tuple[float, float, float | None]]:
    """The drawable points sorted by step: a point without a finite step or value is dropped; a std that is
    not a finite non-negative number is dropped (the point stays)."""
    kept = []
    for step, value, std in points:
        if step is None or value is None or not (abs(step) < _HUGE and abs(value) < _HUGE):
            continue
        if std is not None and not (math.isfinite(std) and std >= 0):
            std = None
        kept.append((float(step), float(value), None if std is None else float(std)))
    return sorted(kept, key=lambda p: p[0])


def _axis(lo: float, hi: float) -> tuple[list[float], tuple[float, float]]:
    """The domain shown for data in [lo, hi] (a margin either side, so that no point sits on an axis; a single
    value gets room around it) and the round ticks inside it."""
    if hi - lo <= abs(hi) * 1e-12:
        pad = abs(lo) * 0.1 or 1.0
    else:
        pad = (hi - lo) * _MARGIN
    lo, hi = lo - pad, hi + pad
    step = _nice_step((hi - lo) / _TICKS)
    ticks = [_clean(i * step) for i in range(math.ceil(lo / step), math.floor(hi / step) + 1)]
    return ticks, (lo, hi)


def _nice_step(raw: float) -> float:
    magnitude = 10 ** math.floor(math.log10(raw))
    for m in (1, 2, 2.5, 5):
        if raw <= m * magnitude:
            return m * magnitude
    return 10 * magnitude


def _clean(v: float) -> float:
    """Floating-point noise off a tick (0.30000000000000004 → 0.3, -0.0 → 0.0)."""
    v = float(f"{v:.12g}")
    return 0.0 if v == 0 else v


def _spacing(ticks: list[float]) -> float:
    return ticks[1] - ticks[0] if len(ticks) > 1 else 1.0


def _tick_label(v: float, spacing: float) -> str:
    """A tick's label with as many decimals as the spacing needs; large steps in k/M, tiny values in e-notation."""
    if v == 0:
        return "0"
    a = abs(v)
    if a >= 1e6 and spacing >= 1e5:
        return f"{v / 1e6:g}M"
    if a >= 1e4 and spacing >= 1e3:
        return f"{v / 1e3:g}k"
    if a < 1e-3 or a >= 1e7:
        return f"{v:.3g}"
    exponent = math.floor(math.log10(spacing))
    quarter = abs(spacing / 10**exponent - 2.5) < 1e-9  # 0.25, 2.5, 25: one more digit than the exponent says
    decimals = max(0, -exponent + quarter)
    return f"{v:.{decimals}f}"


def _number(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else repr(float(v))


def _a(text: str) -> str:
    """Escaped for an attribute value (quotes included)."""
    return escape(str(text), quote=True)


def _t(text: str) -> str:
    """Escaped for element text."""
    return escape(str(text), quote=False)
