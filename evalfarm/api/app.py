"""The farm's HTTP service: versioned JSON routes over `evalfarm.farm.Farm`, one routing table below.

    uvicorn --factory evalfarm.api.app:create_app      (or `evalfarm api --host H --port P`)

Every route that reads or changes the farm's data (`/v1/...`, `/metrics`) needs a bearer token (`api.auth`);
the dashboard's pages (`/ui...`, `api.dashboard`) need a login with a `read` token, kept in a cookie that
admits to the pages only (`api.login`). `/health` and the API's own description (`/openapi.json`, `/docs`,
`/redoc` and their assets) need none: they hold no data, and a browser opening `/docs` cannot send a token
before it has the page. What the farm may read is `EVALFARM_SAMPLE_ROOTS` and nothing else: with it unset,
no path is accepted (the CLI's embedded `eval`, on the user's own machine, is not bound by it). Errors are
JSON `{"detail": ...}`: 401/403 for who, 403 for what may be read, 404 for an unknown job, 409 for a
conflict, 413 for a body over the bound, 422 for a field (named), 503 while the database or broker is
unreachable (for a page, an HTML page that says so).
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI, HTTPException, Query, Request, Response
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline
from pydantic import BaseModel

from evalfarm._version import __version__
from evalfarm.api import dashboard
from evalfarm.api.auth import require
from evalfarm.api.limits import MAX_BODY_BYTES, BodyLimit
from evalfarm.api.login import LoginRequired, redirect_to_login
from evalfarm.api.prometheus import metrics
from evalfarm.api.schemas import CancelOutcome, Health, JobCreated, JobRequest
from evalfarm.db import JobState
from evalfarm.errors import Conflict, EvalfarmError, InvalidField, JobNotFound, NotAllowed
from evalfarm.farm import Farm
from evalfarm.scheduler.queries import MAX_LIMIT
from evalfarm.scheduler.tokens import ADMIN, READ, SUBMIT, Principal
from evalfarm.settings import Settings, get_settings
from evalfarm.sources import SampleRoots
from evalfarm.sources.base import is_url
from evalfarm.workers.outages import outage_types

log = logging.getLogger(__name__)

Limit = Query(50, ge=1, le=MAX_LIMIT)
DOCS_ASSETS = "/docs-assets"


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.farm = Farm(settings)  # per server process, after any fork: its own engine and Redis client
        app.state.roots = SampleRoots.parse(settings.sample_roots)  # empty: every path is refused
        yield

    app = FastAPIOffline(  # /docs and /redoc from assets in the package: they work on air-gapped clusters
        title="evalfarm", version=__version__, lifespan=lifespan, static_url=DOCS_ASSETS,
        description="IS, FID and KID of generative image models, on a farm of GPU workers.",
    )
    app.add_middleware(BodyLimit, max_bytes=MAX_BODY_BYTES)
    for path, method, endpoint, status in ROUTES:
        app.add_api_route(path, endpoint, methods=[method], status_code=status, **_described(path))
    for path, method, endpoint in PAGES:
        app.add_api_route(path, endpoint, methods=[method], response_class=HTMLResponse, include_in_schema=False)
    app.mount(dashboard.STATIC_PATH, StaticFiles(packages=[("evalfarm.api", "static")]), name="ui-static")
    for error, handler in ERROR_HANDLERS.items():
        app.add_exception_handler(error, handler)
    return app


def farm(request: Request) -> Farm:
    return request.app.state.farm


# -- routes ----------------------------------------------------------------------------------------------------------


def health() -> Health:
    """Whether this process serves; the one route without a token."""
    return Health(version=__version__)


def submit_job(body: JobRequest, request: Request, response: Response,
               who: Principal = Depends(require(SUBMIT)), f: Farm = Depends(farm)) -> JobCreated:
    """Submit a job (201); with an `idempotency_key`, a repeat of the same request returns the same job (200)."""
    roots: SampleRoots = request.app.state.roots
    roots.check(body.samples, "samples", require_absolute=True)
    if body.ref is not None and not f.is_named_reference(body.ref):
        if not is_url(body.ref) and not os.path.isabs(body.ref):
            raise InvalidField("ref", f"no named reference {body.ref!r} (GET /v1/references lists them; "
                                      "`evalfarm ref create` makes one), and not an absolute path or a URL")
        roots.check(body.ref, "ref", require_absolute=True)
    try:
        config = body.config()
    except ValueError as exc:
        raise InvalidField("body", str(exc)) from exc
    submitted = f.create(
        body.samples, body.ref, config, run=body.run, step=body.step, tags=body.tags,
        weights_sha256=body.weights_sha256, submitted_by=who.name, callback_url=body.callback_url,
        idempotency_key=body.idempotency_key,
    )
    response.status_code = 201 if submitted.created else 200
    response.headers["Location"] = f"/v1/jobs/{submitted.job_id}"
    return JobCreated(job_id=submitted.job_id, created=submitted.created, state=f.state(submitted.job_id))


def list_jobs(run: str | None = None, state: JobState | None = None, limit: int = Limit,
              _: Principal = Depends(require(READ)), f: Farm = Depends(farm)) -> list[dict[str, Any]]:
    """Jobs, newest first (without shards and results: `GET /v1/jobs/{id}` has them)."""
    return f.jobs(run=run, state=state.value if state else None, limit=limit)


def job_status(job_id: uuid.UUID, _: Principal = Depends(require(READ)), f: Farm = Depends(farm)) -> dict[str, Any]:
    """State, shards done/total, speed, ETA, failures, the webhook's delivery, and the result once there."""
    return f.status(str(job_id))


def cancel_job(job_id: uuid.UUID, who: Principal = Depends(require(SUBMIT)), f: Farm = Depends(farm)) -> CancelOutcome:
    """Cancel a job: a `submit` token its own jobs only, an `admin` token any."""
    owner = f.owner(str(job_id))
    if owner != who.name and not who.allows(ADMIN):
        raise HTTPException(403, f"job {job_id} was submitted by {owner!r}; token {who.name!r} may cancel only "
                                 "its own jobs (an admin token may cancel any)")
    cancelled = f.cancel(str(job_id))
    return CancelOutcome(job_id=str(job_id), cancelled=cancelled, state=f.state(str(job_id)))


def list_results(run: str | None = None, metric: str | None = None, limit: int = Limit,
                 offset: int = Query(0, ge=0), _: Principal = Depends(require(READ)),
                 f: Farm = Depends(farm)) -> list[dict[str, Any]]:
    """Succeeded evaluations; with a run, ordered by step; `offset` pages through a long history."""
    return f.results(run=run, metric=metric, limit=limit, offset=offset)


def list_references(_: Principal = Depends(require(READ)), f: Farm = Depends(farm)) -> list[dict[str, Any]]:
    """Named references, usable as `ref` by name."""
    return f.references()


class ErrorDetail(BaseModel):
    detail: str


#: what the OpenAPI document says each route may answer besides success (422 is FastAPI's own)
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorDetail, "description": "No valid bearer token."},
    403: {"model": ErrorDetail, "description": "The token lacks the scope, a path lies outside "
                                               "EVALFARM_SAMPLE_ROOTS, or the job is another submitter's."},
    404: {"model": ErrorDetail, "description": "No such job."},
    409: {"model": ErrorDetail, "description": "An idempotency key reused with another body, or weights no "
                                               "worker holds."},
    413: {"model": ErrorDetail, "description": "A body over 1 MiB."},
    503: {"model": ErrorDetail, "description": "The farm's database or broker is unreachable: retry."},
}


def _described(path: str) -> dict[str, Any]:
    """What the OpenAPI document says a route answers besides success, and in what type."""
    if path == "/health":
        return {"responses": {}}
    if path == "/metrics":  # Prometheus's text format; its errors are JSON like every route's
        errors = {code: {"description": ERROR_RESPONSES[code]["description"],
                         "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorDetail"}}}}
                  for code in (401, 403, 503)}
        return {"responses": errors, "response_class": PlainTextResponse}
    return {"responses": ERROR_RESPONSES}


#: (path, method, endpoint, success status): the whole API
ROUTES = [
    ("/health", "GET", health, 200),
    ("/v1/jobs", "POST", submit_job, 201),
    ("/v1/jobs", "GET", list_jobs, 200),
    ("/v1/jobs/{job_id}", "GET", job_status, 200),
    ("/v1/jobs/{job_id}/cancel", "POST", cancel_job, 200),
    ("/v1/results", "GET", list_results, 200),
    ("/v1/references", "GET", list_references, 200),
    ("/metrics", "GET", metrics, 200),
]

#: (path, method, endpoint): the dashboard's HTML pages, out of the OpenAPI document; its stylesheet is
#: served from the package under dashboard.STATIC_PATH
PAGES = [
    ("/ui", "GET", dashboard.runs_page),
    ("/ui/login", "GET", dashboard.login_form),
    ("/ui/login", "POST", dashboard.log_in),
    ("/ui/logout", "POST", dashboard.log_out),
    ("/ui/runs/{run:path}", "GET", dashboard.run_page),
    ("/ui/compare", "GET", dashboard.compare_page),
    ("/ui/jobs", "GET", dashboard.jobs_page),
    ("/ui/jobs/{job_id}", "GET", dashboard.job_page),
]


# -- errors ----------------------------------------------------------------------------------------------------------


def _invalid_field(_: Request, exc: InvalidField) -> JSONResponse:
    """The shape of FastAPI's own 422s, so that clients read one format: the field, and what is wrong."""
    loc = [exc.where] if exc.field == exc.where else [exc.where, exc.field]
    return JSONResponse({"detail": [{"type": "value_error", "loc": loc, "msg": exc.message}]}, status_code=422)


def _detail(status: int) -> Any:
    def handler(_: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=status)

    return handler


def _unavailable(request: Request, exc: Exception) -> Response:
    log.warning("farm unreachable: %s", exc)
    if dashboard.is_page(request):
        return dashboard.unavailable(request)
    return JSONResponse({"detail": f"the farm's database or broker is unreachable ({type(exc).__name__}); retry"},
                        status_code=503, headers={"Retry-After": "5"})


ERROR_HANDLERS: dict[type[Exception], Any] = {
    InvalidField: _invalid_field,
    JobNotFound: _detail(404),
    NotAllowed: _detail(403),
    Conflict: _detail(409),
    EvalfarmError: _detail(422),
    LoginRequired: redirect_to_login,
    **dict.fromkeys(outage_types(), _unavailable),
}

__all__ = ["PAGES", "ROUTES", "create_app"]
