"""The light client of the farm's HTTP API: what a training job imports to submit and follow evaluations.

    >>> from evalfarm.client import Client
    >>> c = Client()  # EVALFARM_API_URL, EVALFARM_API_TOKEN
    >>> job = c.submit("/data/samples/run7/120000.npz", ref="cifar10-train", run="run7", step=120000,
    ...                idempotency_key="run7-120000")
    >>> c.wait(job)["frechet_inception_distance"]

It speaks HTTP with the standard library only: importing it loads none of torch, Celery, SQLAlchemy, Redis
or NumPy, and it needs no weights file and no database credentials. Its methods match `evalfarm.farm.Farm`,
which speaks to the database directly.
"""

from __future__ import annotations

import http.client
import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any
from urllib.parse import quote, urlencode

from evalfarm.config import EvalConfig
from evalfarm.errors import Conflict, EvalfarmError, JobError, JobNotFound, NotAllowed
from evalfarm.settings import get_settings
from evalfarm.states import JobState

DEFAULT_TIMEOUT_S = 30.0
RETRY_STATUSES = (502, 503, 504)  #: the API or its database restarting: `wait` keeps waiting through these


class ApiError(EvalfarmError):
    """The API refused the request; `status` is the HTTP status, the message its detail."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(f"HTTP {status}: {detail}" if status else detail)
        self.status, self.detail = status, detail


class Unreachable(ApiError):
    """No answer at all (`status` 0): the API is down, restarting, or not at this URL."""


class Unavailable(ApiError):
    """502-504: the API (or the database behind it) is restarting."""


class Forbidden(ApiError, NotAllowed):
    """401 (no valid token) or 403 (a scope the token lacks, a path outside the farm's sample roots, another
    submitter's job)."""


class NotFound(ApiError, JobNotFound):
    pass


class Conflicting(ApiError, Conflict):
    """409: an idempotency key reused with another body, or weights no worker holds."""


_ERRORS = {401: Forbidden, 403: Forbidden, 404: NotFound, 409: Conflicting, **dict.fromkeys(RETRY_STATUSES, Unavailable)}


class Client:
    def __init__(self, url: str | None = None, token: str | None = None, *, timeout: float = DEFAULT_TIMEOUT_S) -> None:
        settings = get_settings()
        self.url = (url or settings.api_url or "").rstrip("/")
        if not self.url:
            raise EvalfarmError("no API URL: pass Client(url=...) or set EVALFARM_API_URL (e.g. http://farm:8080)")
        if not self.url.startswith(("http://", "https://")):
            raise EvalfarmError(f"the API URL {self.url!r} must start with http:// or https:// (EVALFARM_API_URL)")
        self.token = token or settings.api_token
        self.timeout = timeout

    # -- the farm's verbs --------------------------------------------------------------------------------------------

    def submit(
        self,
        samples: str,
        ref: str | None = None,
        config: EvalConfig | None = None,
        *,
        run: str | None = None,
        step: int | None = None,
        tags: dict[str, Any] | None = None,
        weights_sha256: str | None = None,
        idempotency_key: str | None = None,
        callback_url: str | None = None,
        **config_fields: Any,
    ) -> str:
        """Submit a job and return its id; with `idempotency_key`, a retried submit returns the same id.
        `config_fields` are `EvalConfig` fields (`metrics`, `splits`, `kid_subset_size`, ...), as for
        `evalfarm.evaluate`."""
        body: dict[str, Any] = {"samples": samples, **_config_fields((config or EvalConfig()).with_(**config_fields))}
        optional = {"ref": ref, "run": run, "step": step, "tags": tags, "weights_sha256": weights_sha256,
                    "idempotency_key": idempotency_key, "callback_url": callback_url}
        body.update({k: v for k, v in optional.items() if v is not None})
        return self._request("POST", "/v1/jobs", body=body)["job_id"]

    def status(self, job_id: str) -> dict[str, Any]:
        return self._request("GET", f"/v1/jobs/{quote(job_id, safe='')}")

    def wait(self, job_id: str, timeout: float | None = None, poll_s: float = 2.0) -> dict[str, Any]:
        """The result document once the job succeeds; JobError if it failed or was cancelled. Waits through
        an API or database restart (no answer, or 502-504)."""

        def look() -> tuple[JobState, Any, str | None]:
            st = self.status(job_id)
            return JobState(st["state"]), st["result"], st["error"]

        return wait_for_end(job_id, look, (Unreachable, Unavailable), timeout=timeout, poll_s=poll_s)

    def cancel(self, job_id: str) -> bool:
        """True when this call cancelled it; False when it had ended already."""
        return self._request("POST", f"/v1/jobs/{quote(job_id, safe='')}/cancel")["cancelled"]

    def jobs(self, *, run: str | None = None, state: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
        return self._request("GET", "/v1/jobs", query={"run": run, "state": state, "limit": limit})

    def results(self, *, run: str | None = None, metric: str | None = None, limit: int = 50,
                offset: int = 0) -> list[dict[str, Any]]:
        """Succeeded evaluations, as `evalfarm results` lists them; `offset` pages through a long history."""
        return self._request("GET", "/v1/results", query={"run": run, "metric": metric, "limit": limit,
                                                          "offset": offset or None})

    def references(self) -> list[dict[str, Any]]:
        return self._request("GET", "/v1/references")

    # -- HTTP ----------------------------------------------------------------------------------------------------------

    def _request(self, method: str, path: str, *, body: dict | None = None, query: dict | None = None) -> Any:
        if query:
            path += "?" + urlencode({k: v for k, v in query.items() if v is not None})
        headers = {"Accept": "application/json", "User-Agent": "evalfarm-client"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        data = None
        if body is not None:
            data, headers["Content-Type"] = json.dumps(body).encode(), "application/json"
        request = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return json.loads(response.read() or b"null")
        except urllib.error.HTTPError as exc:
            detail = _detail(exc.read())
            if exc.code == 401 and not self.token:
                detail += " (this client sent none: set EVALFARM_API_TOKEN, or pass Client(token=...))"
            raise _ERRORS.get(exc.code, ApiError)(exc.code, detail) from None
        except (OSError, http.client.HTTPException) as exc:  # refused, reset, timed out, not HTTP
            reason = getattr(exc, "reason", exc)
            raise Unreachable(0, f"no answer from {self.url}: {reason}") from None


def wait_for_end(
    job_id: str,
    look: Callable[[], tuple[JobState, Any, str | None]],
    transient: tuple[type[BaseException], ...],
    *,
    timeout: float | None,
    poll_s: float,
) -> Any:
    """Poll `look` (state, result, error) until the job ends: its result, or JobError for a failure or a
    cancel; `transient` errors (an outage) are waited through; TimeoutError after `timeout` seconds."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        state = None
        try:
            state, result, error = look()
        except transient:
            pass
        if state == JobState.SUCCEEDED:
            return result
        if state is not None and state.final:
            raise JobError(f"job {job_id} {state}: {error}")
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} still {state or 'unreachable'} after {timeout} s")
        time.sleep(poll_s)


def _config_fields(config: EvalConfig) -> dict[str, Any]:
    fields = config.to_dict()
    fields.pop("extra", None)
    return fields


def _detail(raw: bytes) -> str:
    """The API's `detail`, flattened: a 422 lists each field with what is wrong with it."""
    try:
        detail = json.loads(raw)["detail"]
    except (ValueError, KeyError, TypeError):
        return raw.decode("utf-8", "replace")[:500]
    if isinstance(detail, list):
        return "; ".join(f"{'.'.join(str(p) for p in d.get('loc', ()))}: {d.get('msg')}" for d in detail)
    return str(detail)
