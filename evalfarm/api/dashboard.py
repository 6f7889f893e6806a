"""The results dashboard: server-rendered pages under `/ui` for people, next to the JSON API for programs.

Runs and their curves (FID, IS and KID against step), runs compared on shared charts, live and ended jobs,
and one job's settings, inputs and outcome. Pages are Jinja2 templates shipped in the package
(autoescaped), styled by one small stylesheet in the package, with charts drawn on the server as inline SVG
(`api.svg`): no JavaScript at all, nothing fetched from the internet, and a Content-Security-Policy that
allows nothing but this server's stylesheet. Every page needs a login with a `read` token (`api.login`) and
only reads: no page changes the farm.
"""

from __future__ import annotations

import math
import uuid
from datetime import datetime, timezone
from typing import Any
from urllib.parse import quote

from fastapi import Depends, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape
from markupsafe import Markup

from evalfarm._version import __version__
from evalfarm.api import login
from evalfarm.api.svg import Series, colour, line_chart
from evalfarm.errors import JobNotFound
from evalfarm.farm import Farm
from evalfarm.keys import (
    INCEPTION,
    KEY_F_SCORE,
    KEY_PRECISION,
    KEY_RECALL,
    METRIC_FAMILIES,
    METRIC_LABELS,
    VGG16,
    split_qualified,
)
from evalfarm.runs import Point, run_history, series
from evalfarm.scheduler import queries
from evalfarm.scheduler.tokens import Principal

#: the order charts and columns appear in: FID first, the number most runs are judged by
FAMILIES = tuple(sorted(METRIC_FAMILIES, key=("fid", "is", "kid").index))
MAX_COMPARED = 10  #: runs on one compare page: one colour each, none repeated
ENDED_SHOWN = 30  #: recently ended jobs on the jobs page
REFRESH_S = 10  #: pages of live jobs reload themselves this often (a meta refresh: no script)
STATIC_PATH = "/ui/static"

#: every page: no script, no frame, no other origin; styles from our stylesheet only (chart colours are SVG
#: presentation attributes, which CSP does not govern); nothing cached, since pages show a token's view
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
                               "frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


def farm(request: Request) -> Farm:
    return request.app.state.farm


# -- login -----------------------------------------------------------------------------------------------------------


def login_form(request: Request, next: str | None = None) -> Response:
    """The login form: one field for a token with the `read` scope (`evalfarm token create NAME --scopes read`)."""
    return render(request, "login.html", None, next=login.safe_next(next), error=None)


async def log_in(request: Request) -> Response:
    """Check the posted token; 303 to the page asked for with the cookie set, or the form again with 401."""
    if login.cross_site(request):
        return error_page(request, 403, "Refused", "A login posted from another site is refused.")
    fields = await login.form_fields(request)
    next_path = login.safe_next(fields.get("next"))
    token = fields.get("token", "")
    if await login.log_in(request, token) is None:
        return render(request, "login.html", None, next=next_path, status=401,
                      error="That token is not valid here: unknown, revoked, or able to do more than read. Log in "
                            "with a token that only reads: evalfarm token create NAME --scopes read")
    response = RedirectResponse(next_path, status_code=303)
    login.set_login_cookie(response, request, token)
    return response


def log_out(request: Request) -> Response:
    """Forget the cookie; 303 to the login form."""
    if login.cross_site(request):
        return error_page(request, 403, "Refused", "A logout posted from another site is refused.")
    response = RedirectResponse(login.LOGIN_PATH, status_code=303)
    login.clear_login_cookie(response, request)
    return response


# -- pages -----------------------------------------------------------------------------------------------------------


def runs_page(request: Request, who: Principal = Depends(login.viewer), f: Farm = Depends(farm)) -> Response:
    """Every run: its number of results, last step and the values there; links to its page and to compare."""
    runs = queries.list_runs(f.ctx.sessions)
    return render(request, "runs.html", who, runs=runs, families=FAMILIES)


def run_page(run: str, request: Request, who: Principal = Depends(login.viewer),
             f: Farm = Depends(farm)) -> Response:
    """One run: FID, IS and KID against step (± std bands where the metric has a std), and the values by step."""
    points = run_history(run, f)
    if not points:
        return error_page(request, 404, "No such run",
                          f"Run {run!r} has no succeeded evaluation.", who=who)
    charts = [_chart([Series(run, series(points, family))], family) for family in FAMILIES]
    for extractor in other_extractors(points):  # a DINOv2 or CLIP Fréchet distance gets a chart of its own
        for family in FAMILIES:
            drawn = series(points, family, extractor)
            if drawn:
                charts.append(_chart([Series(run, drawn)], family, extractor))
    unplotted = sum(p.step is None for p in points)
    seeded = sum(not p.canonical_weights for p in points)
    return render(request, "run.html", who, run=run, points=points, charts=charts, families=FAMILIES,
                  unplotted=unplotted, seeded=seeded)


def compare_page(request: Request, run: list[str] = Query([]), metric: str | None = None,
                 who: Principal = Depends(login.viewer), f: Farm = Depends(farm)) -> Response:
    """Several runs on the same charts, one colour (and legend entry) per run; one metric, or all three."""
    runs = list(dict.fromkeys(r for r in run if r))
    if metric and metric not in METRIC_FAMILIES:
        return error_page(request, 422, "Unknown metric",
                          f"metric must be one of {', '.join(FAMILIES)}, not {metric!r}.", who=who)
    if len(runs) > MAX_COMPARED:
        return error_page(request, 422, "Too many runs",
                          f"Compare at most {MAX_COMPARED} runs at once ({len(runs)} were chosen).", who=who)
    histories = {r: run_history(r, f) for r in runs}
    families = (metric,) if metric else FAMILIES
    legend = [{"run": r, "colour": colour(i), "results": len(histories[r])} for i, r in enumerate(runs)]
    charts = [
        _chart([Series(r, series(histories[r], family), colour(i)) for i, r in enumerate(runs)], family)
        for family in families
    ]
    seeded = sum(not p.canonical_weights for points in histories.values() for p in points)
    return render(request, "compare.html", who, runs=runs, metric=metric, legend=legend, charts=charts,
                  families=FAMILIES, seeded=seeded)


def jobs_page(request: Request, who: Principal = Depends(login.viewer), f: Farm = Depends(farm)) -> Response:
    """Live jobs with their progress, speed, ETA and failures; and the jobs that ended last."""
    live = queries.live_jobs(f.ctx.sessions)
    ended = queries.ended_jobs(f.ctx.sessions, limit=ENDED_SHOWN)
    return render(request, "jobs.html", who, live=live, ended=ended, refresh=REFRESH_S)


def job_page(job_id: str, request: Request, who: Principal = Depends(login.viewer),
             f: Farm = Depends(farm)) -> Response:
    """One job: state, settings, samples and reference (URIs, content hashes), weights, shards, webhook, and
    its result or error."""
    try:
        job = queries.job_detail(f.ctx.sessions, str(uuid.UUID(job_id)))
    except (ValueError, JobNotFound):
        return error_page(request, 404, "No such job", f"There is no job {job_id!r}.", who=who)
    live = job["state"] in {s.value for s in queries.LIVE_STATES}
    result = job["result"] or {}
    return render(request, "job.html", who, job=job, metrics=result_rows(result),
                  refresh=REFRESH_S if live else None)


_PRC_ROWS = (("precision", KEY_PRECISION, "Precision"), ("recall", KEY_RECALL, "Recall"),
             ("f_score", KEY_F_SCORE, "F-score"))


def result_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """A finished job's values, each labelled with its extractor where that is not the metric's default one
    (a DINOv2 Fréchet distance is not an FID)."""
    by_extractor = result.get("extractors") or {INCEPTION: {"metrics": result}}
    rows = []
    for extractor, info in by_extractor.items():
        values = info.get("metrics") or {}
        for family in FAMILIES:
            key, std_key = METRIC_FAMILIES[family]
            if key in values:
                label = METRIC_LABELS[family] if extractor == INCEPTION else f"{METRIC_LABELS[family]} on {extractor}"
                rows.append({"family": family, "label": label, "value": values[key],
                             "std": values.get(std_key) if std_key else None})
        for family, key, name in _PRC_ROWS:
            if key in values:
                rows.append({"family": family, "label": name if extractor == VGG16 else f"{name} on {extractor}",
                             "value": values[key], "std": None})
    return rows


# -- rendering -------------------------------------------------------------------------------------------------------


def render(request: Request, template: str, who: Principal | None, *, status: int = 200, **context: Any) -> Response:
    html = TEMPLATES.get_template(template).render(who=who, version=__version__, static=STATIC_PATH,
                                                   path=request.url.path, labels=METRIC_LABELS,
                                                   families_keys=METRIC_FAMILIES, **context)
    return HTMLResponse(html, status_code=status, headers=PAGE_HEADERS)


def error_page(request: Request, status: int, title: str, message: str, *, who: Principal | None = None,
               headers: dict[str, str] | None = None) -> Response:
    response = render(request, "error.html", who, status=status, title=title, message=message)
    response.headers.update(headers or {})
    return response


def is_page(request: Request) -> bool:
    """Whether the request is for a dashboard page (answered in HTML) rather than the API (JSON)."""
    return request.url.path == "/ui" or request.url.path.startswith("/ui/")


def unavailable(request: Request) -> Response:
    """The page shown while the database or broker is unreachable: a 503 that says to retry, no traceback."""
    return error_page(request, 503, "The farm is unreachable",
                      "The farm's database or broker does not answer right now. This page will work again "
                      "once it is back: reload in a few seconds.", headers={"Retry-After": "5"})


def _chart(series: list[Series], family: str, extractor: str | None = None) -> dict[str, Any]:
    label = METRIC_LABELS[family] + (f" on {extractor}" if extractor else "")
    return {"family": family, "id": family + (f"-{extractor}" if extractor else ""), "label": label,
            "svg": Markup(line_chart(series, metric=family, label=label))}


def other_extractors(points: list[Point]) -> list[str]:
    """The extractors other than Inception that a run's results hold values of, in the order first seen."""
    found = (split_qualified(name)[1] for p in points for name in p.metrics if "@" in name)
    return [e for e in dict.fromkeys(found) if e != INCEPTION]


# -- template filters ------------------------------------------------------------------------------------------------


def _num(v: Any, digits: int = 4) -> str:
    if v is None:
        return "–"
    try:
        x = float(v)
    except (TypeError, ValueError):
        return str(v)
    if not math.isfinite(x):
        return str(x)
    text = f"{x:#.{digits}g}"  # '#': as many significant digits in every row (170.0 beside 160.8, not 170)
    return text[:-1] if text.endswith(".") else text


def _when(t: Any) -> str:
    """A time as UTC to the second (`2025-01-31 12:00:00Z`); text times (from JSON) shown as they are."""
    if t is None:
        return "–"
    if isinstance(t, datetime):
        t = t if t.tzinfo else t.replace(tzinfo=timezone.utc)
        return t.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")
    return str(t)


def _duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "–"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    return f"{s // 3600}h {s % 3600 // 60:02d}m"


def _short(digest: str | None, n: int = 12) -> str:
    return "–" if not digest else (digest[:n] + "…" if len(digest) > n else digest)


def _urlpart(text: Any) -> str:
    """One path segment: a run name with '/', '?' or '#' stays one segment of the link."""
    return quote(str(text), safe="")


def _compare_url(runs: list[str], metric: str | None = None) -> str:
    query = "&".join(f"run={quote(r, safe='')}" for r in runs)
    return f"/ui/compare?{query}" + (f"&metric={quote(metric, safe='')}" if metric else "")


TEMPLATES = Environment(
    loader=PackageLoader("evalfarm.api", "templates"),
    autoescape=select_autoescape(default=True, default_for_string=True),
    undefined=StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)
TEMPLATES.filters.update(num=_num, when=_when, duration=_duration, short=_short, urlpart=_urlpart)
TEMPLATES.globals.update(compare_url=_compare_url)
