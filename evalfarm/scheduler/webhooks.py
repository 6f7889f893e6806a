"""Signed webhooks: a job's end, posted to the URL its submitter gave, only on hosts the farm allows.

The delivery row is written in the transaction that ends the job (`records._ended`, an outbox), so that a
crash between the end and the post loses nothing; a Celery task on the `cpu` queue then makes the attempts.
The body is signed as GitHub signs its webhooks: `X-Evalfarm-Signature: sha256=HMAC-SHA256(secret, body)`,
and `X-Evalfarm-Delivery` names the delivery, the same on every attempt, so a receiver can drop repeats.
Delivery is at least once: an attempt whose answer was lost is made again.
"""

from __future__ import annotations

import hashlib
import hmac
import http.client
import json
import threading
import urllib.error
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from sqlalchemy import select, update

from evalfarm.db import Delivery, DeliveryState, Job, JobState
from evalfarm.db.models import utcnow
from evalfarm.errors import InvalidField
from evalfarm.scheduler.records import Sessions

MAX_ATTEMPTS = 5
BACKOFF_S = (4.0, 8.0, 16.0, 32.0)  #: waits after attempts 1-4: five attempts over about a minute
ATTEMPT_TIMEOUT_S = 10.0  #: a receiver that does not answer in this long counts as a failed attempt
ATTEMPT_LEASE_S = ATTEMPT_TIMEOUT_S + 20  #: an attempt not recorded by then is presumed lost with its worker
EARLY_S = 2.0  #: a retry may start this much before its due time (clocks of two hosts, timer jitter)
SIGNATURE_HEADER, DELIVERY_HEADER = "X-Evalfarm-Signature", "X-Evalfarm-Delivery"
HOSTS_VARIABLE = "EVALFARM_CALLBACK_HOSTS"


def check_callback_url(url: str, hosts: Iterable[str]) -> None:
    """InvalidField unless `url` is http(s) on a host of EVALFARM_CALLBACK_HOSTS: `host` allows the scheme's
    default port only, `host:port` that port, `host:*` any port (a bare host is no licence to reach every
    service on it)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidField("callback_url", f"{url!r} must be an http:// or https:// URL")
    if parts.username is not None or parts.password is not None:
        raise InvalidField("callback_url", "may not carry credentials; the signature authenticates the farm")
    try:
        port = parts.port or _DEFAULT_PORTS[parts.scheme]
    except ValueError as exc:
        raise InvalidField("callback_url", f"{url!r} has an invalid port") from exc
    host, default = parts.hostname.lower(), port == _DEFAULT_PORTS[parts.scheme]
    for allowed in hosts:
        name, allowed_port = _split_host(allowed)
        if name == host and (allowed_port in ("*", str(port)) or (allowed_port is None and default)):
            return
    listed = ",".join(hosts) or "(empty)"
    raise InvalidField(
        "callback_url",
        f"host {host}:{port} is not in {HOSTS_VARIABLE} ({listed}); the farm posts only where its operator allowed",
    )


_DEFAULT_PORTS = {"http": 80, "https": 443}


def _split_host(entry: str) -> tuple[str, str | None]:
    """`host`, `host:port`, `host:*`, `[v6]:port` or a bare IPv6 address, as (host, port or None)."""
    entry = entry.strip().lower()
    if entry.startswith("["):
        host, _, rest = entry[1:].partition("]")
        return host, rest[1:] if rest.startswith(":") else None
    if entry.count(":") == 1:
        host, port = entry.split(":")
        return host, port
    return entry, None


def sign(body: bytes, secret: str) -> str:
    """The signature header's value; a receiver recomputes it and compares with `hmac.compare_digest`."""
    return "sha256=" + hmac.new(secret.encode("utf-8"), body, hashlib.sha256).hexdigest()


def payload(job: Job) -> dict[str, Any]:
    """The body: the job's end, and when this attempt was made (inside the signature, so that a receiver
    can refuse an old body replayed at it)."""
    body: dict[str, Any] = {"job_id": job.id, "state": job.state.value, "run": job.run, "step": job.step,
                            "sent_at": utcnow().isoformat()}
    if job.state == JobState.SUCCEEDED:
        body["result"] = job.result
    else:
        body["error"] = job.error
    return body


# -- records -------------------------------------------------------------------------------------------------------


def due(sessions: Sessions, job_id: str) -> list[str]:
    """Deliveries of the job not yet tried: the task that ended the job sends them right away."""
    with sessions() as s:
        return list(s.scalars(select(Delivery.id).where(
            Delivery.job_id == job_id, Delivery.state == DeliveryState.PENDING, Delivery.attempts == 0)))


def overdue(sessions: Sessions, grace_s: float) -> list[str]:
    """Pending deliveries whose attempt has been due for longer than `grace_s` (its message or its worker was
    lost), made due now so that the next pass does not send them again; a delivery whose last attempt was
    lost fails instead."""
    now = utcnow()
    late = (Delivery.state == DeliveryState.PENDING) & (Delivery.next_at < now - timedelta(seconds=grace_s))
    with sessions.begin() as s:
        s.execute(update(Delivery).where(late, Delivery.attempts >= MAX_ATTEMPTS).values(
            state=DeliveryState.FAILED, last_error="the last attempt was lost with its worker"))
        return list(s.scalars(update(Delivery).where(late).values(next_at=now).returning(Delivery.id)))


@dataclass(frozen=True)
class Attempt:
    delivery_id: str
    number: int
    url: str
    body: bytes


def start_attempt(sessions: Sessions, delivery_id: str) -> Attempt | None:
    """Claim the next attempt (its lease until `ATTEMPT_LEASE_S`); None when it is not due, being made by
    another worker, or the delivery is over. A duplicate message therefore posts nothing."""
    now = utcnow()
    with sessions.begin() as s:
        claimed = s.execute(
            update(Delivery)
            .where(Delivery.id == delivery_id, Delivery.state == DeliveryState.PENDING,
                   Delivery.attempts < MAX_ATTEMPTS, Delivery.next_at <= now + timedelta(seconds=EARLY_S))
            .values(attempts=Delivery.attempts + 1, next_at=now + timedelta(seconds=ATTEMPT_LEASE_S))
        ).rowcount == 1
        if not claimed:
            return None
        d = s.get(Delivery, delivery_id)
        job = s.get(Job, d.job_id)
        body = json.dumps(payload(job), sort_keys=True, default=str).encode("utf-8")
        return Attempt(d.id, d.attempts, d.url, body)


def record_attempt(
    sessions: Sessions, attempt: Attempt, status: int | None, error: str | None, *, give_up: bool = False
) -> float | None:
    """Record what the attempt got; returns the seconds until the next one, or None when the delivery is over
    (delivered, or failed after MAX_ATTEMPTS, or at once with `give_up`)."""
    ok = status is not None and 200 <= status < 300
    final = ok or give_up or attempt.number >= MAX_ATTEMPTS
    wait = None if final else BACKOFF_S[min(attempt.number, len(BACKOFF_S)) - 1]
    now = utcnow()
    values: dict[str, Any] = {"last_status": status, "last_error": None if ok else error}
    if ok:
        values.update(state=DeliveryState.DELIVERED, delivered_at=now)
    elif final:
        values.update(state=DeliveryState.FAILED)
    else:
        values.update(next_at=now + timedelta(seconds=wait))
    with sessions.begin() as s:
        s.execute(update(Delivery).where(Delivery.id == attempt.delivery_id, Delivery.attempts == attempt.number,
                                         Delivery.state == DeliveryState.PENDING).values(**values))
    return wait


def callback_status(sessions: Sessions, job_id: str, callback_url: str | None) -> dict[str, Any] | None:
    """What a job's status shows of its webhook: None without a callback URL. Every reader sees the status,
    so the URL is shown without its query, where receivers tend to keep a secret of their own."""
    if not callback_url:
        return None
    url = urlunsplit(urlsplit(callback_url)._replace(query="", fragment=""))
    with sessions() as s:
        d = s.scalar(select(Delivery).where(Delivery.job_id == job_id))
    if d is None:
        return {"url": url, "state": "awaiting the job's end", "attempts": 0, "last_status": None}
    return {"url": url, "state": d.state.value, "attempts": d.attempts, "last_status": d.last_status,
            "last_error": d.last_error, "delivery_id": d.id}


# -- the attempt -----------------------------------------------------------------------------------------------------


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """A redirect would send the body to a host nobody allowed: it counts as a failed attempt instead."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


_OPENER = urllib.request.build_opener(_NoRedirects)


def post(attempt: Attempt, secret: str) -> tuple[int | None, str | None]:
    """POST the signed body; (HTTP status, None) or (status or None, what went wrong). The whole attempt
    has ATTEMPT_TIMEOUT_S: a receiver that trickles its answer holds no worker longer (urllib's timeout
    counts per socket operation, so the attempt runs in a thread that is given up on)."""
    outcome: list[tuple[int | None, str | None]] = []
    thread = threading.Thread(target=lambda: outcome.append(_post(attempt, secret)), daemon=True,
                              name=f"webhook-{attempt.delivery_id}")
    thread.start()
    thread.join(ATTEMPT_TIMEOUT_S + 1)
    return outcome[0] if outcome else (None, f"no complete answer within {ATTEMPT_TIMEOUT_S:.0f} s")


def _post(attempt: Attempt, secret: str) -> tuple[int | None, str | None]:
    request = urllib.request.Request(attempt.url, data=attempt.body, method="POST", headers={
        "Content-Type": "application/json",
        "User-Agent": "evalfarm-webhook",
        SIGNATURE_HEADER: sign(attempt.body, secret),
        DELIVERY_HEADER: attempt.delivery_id,
    })
    try:
        with _OPENER.open(request, timeout=ATTEMPT_TIMEOUT_S) as response:
            return response.status, None
    except urllib.error.HTTPError as exc:
        return exc.code, f"HTTP {exc.code}"
    except (OSError, ValueError, http.client.HTTPException) as exc:  # refused, reset, timed out, not HTTP
        return None, f"{type(exc).__name__}: {exc}"[:300]


def deliver(sessions: Sessions, delivery_id: str, *, secret: str | None, hosts: Iterable[str]) -> float | None:
    """Make the delivery's next attempt; returns the seconds until the one after, or None when none follows."""
    attempt = start_attempt(sessions, delivery_id)
    if attempt is None:
        return None
    try:  # the worker checks the host again: a row written by other means posts nowhere nobody allowed
        check_callback_url(attempt.url, tuple(hosts))
    except InvalidField as exc:
        return record_attempt(sessions, attempt, None, str(exc), give_up=True)
    if not secret:
        return record_attempt(sessions, attempt, None, "EVALFARM_WEBHOOK_SECRET is not set on the workers")
    status, error = post(attempt, secret)
    return record_attempt(sessions, attempt, status, error)
