"""A small JSON HTTP API for training infra that cannot run Python: one routing table, thin handlers.

    POST /jobs                 {"samples": ..., "ref": ..., "metrics": "is,fid", "run": ..., "step": ..., ...}
    GET  /jobs/<id>            status (state, shards, ETA, failures, result when done)
    POST /jobs/<id>/cancel
    GET  /results?run=&metric=&limit=
    GET  /health

It has no authentication of its own: put it behind the proxy or network policy that guards your cluster.
"""

from __future__ import annotations

import json
import re
from dataclasses import fields
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

from evalfarm.client import Client
from evalfarm.config import EvalConfig, parse_metrics
from evalfarm.errors import EvalfarmError, JobError

_CONFIG_FIELDS = {f.name for f in fields(EvalConfig)} - {"metrics", "extra"}


def submit_job(client: Client, body: dict[str, Any], _: dict) -> tuple[int, dict]:
    if "samples" not in body:
        return HTTPStatus.BAD_REQUEST, {"error": "'samples' is required"}
    try:
        cfg = {k: v for k, v in body.items() if k in _CONFIG_FIELDS}
        if "metrics" in body:
            m = body["metrics"]
            cfg["metrics"] = parse_metrics(m if isinstance(m, str) else ",".join(m))
        config = EvalConfig(**cfg)
    except (TypeError, ValueError) as exc:
        return HTTPStatus.BAD_REQUEST, {"error": str(exc)}
    job_id = client.submit(body["samples"], body.get("ref"), config, run=body.get("run"), step=body.get("step"),
                           tags=body.get("tags"))
    return HTTPStatus.ACCEPTED, {"job_id": job_id}


def job_status(client: Client, _: dict, params: dict) -> tuple[int, dict]:
    return HTTPStatus.OK, client.status(params["job_id"])


def cancel(client: Client, _: dict, params: dict) -> tuple[int, dict]:
    return HTTPStatus.OK, {"job_id": params["job_id"], "cancelled": client.cancel(params["job_id"])}


def results(client: Client, _: dict, params: dict) -> tuple[int, Any]:
    q = params["query"]
    return HTTPStatus.OK, client.results(run=q.get("run"), metric=q.get("metric"), limit=int(q.get("limit", 50)))


def health(client: Client, _: dict, __: dict) -> tuple[int, dict]:
    return HTTPStatus.OK, {"ok": True}


ROUTES = [
    ("POST", re.compile(r"^/jobs$"), submit_job),
    ("GET", re.compile(r"^/jobs/(?P<job_id>[0-9a-f-]{36})$"), job_status),
    ("POST", re.compile(r"^/jobs/(?P<job_id>[0-9a-f-]{36})/cancel$"), cancel),
    ("GET", re.compile(r"^/results$"), results),
    ("GET", re.compile(r"^/health$"), health),
]


def make_handler(client: Client) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def _dispatch(self, method: str) -> None:
            url = urlparse(self.path)
            for m, pattern, fn in ROUTES:
                match = pattern.match(url.path)
                if m == method and match:
                    try:
                        length = int(self.headers.get("Content-Length") or 0)
                        body = json.loads(self.rfile.read(length) or b"{}") if length else {}
                        params = {**match.groupdict(), "query": {k: v[-1] for k, v in parse_qs(url.query).items()}}
                        status, payload = fn(client, body, params)
                    except json.JSONDecodeError as exc:
                        status, payload = HTTPStatus.BAD_REQUEST, {"error": f"invalid JSON: {exc}"}
                    except JobError as exc:
                        status, payload = HTTPStatus.NOT_FOUND, {"error": str(exc)}
                    except EvalfarmError as exc:
                        status, payload = HTTPStatus.UNPROCESSABLE_ENTITY, {"error": str(exc)}
                    return self._reply(status, payload)
            self._reply(HTTPStatus.NOT_FOUND, {"error": f"no route {method} {url.path}"})

        def _reply(self, status: int, payload: Any) -> None:
            data = json.dumps(payload, default=str).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802
            self._dispatch("GET")

        def do_POST(self) -> None:  # noqa: N802
            self._dispatch("POST")

        def log_message(self, fmt: str, *args: Any) -> None:  # quieter than stderr per request
            pass

    return Handler


def make_server(host: str = "127.0.0.1", port: int = 8080, client: Client | None = None) -> ThreadingHTTPServer:
    return ThreadingHTTPServer((host, port), make_handler(client or Client()))
