"""Webhooks: signed as GitHub signs them, sent only to allowed hosts, retried with backoff, then given up."""

from __future__ import annotations

import hashlib
import hmac
import json
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from evalfarm.config import EvalConfig
from evalfarm.db import Delivery, DeliveryState, Job, JobState, session_factory
from evalfarm.errors import InvalidField
from evalfarm.scheduler import records, webhooks
from evalfarm.scheduler.job import FARM

from .listener import Listener

SECRET = "s3cret"


def test_the_signature_is_hmac_sha256_of_the_raw_body():
    body = b'{"job_id": "j", "state": "succeeded"}'
    expected = hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    assert webhooks.sign(body, SECRET) == f"sha256={expected}"


@pytest.mark.parametrize("url,hosts", [
    ("http://hooks.example.org/x", ["hooks.example.org"]),
    ("https://Hooks.Example.org:8443/x", ["hooks.example.org:8443"]),
    ("http://127.0.0.1/x", ["127.0.0.1"]),
    ("http://127.0.0.1:9000/x", ["127.0.0.1:*"]),
    ("http://[::1]:9000/x", ["[::1]:9000"]),
])
def test_a_callback_on_an_allowed_host_is_accepted(url, hosts):
    webhooks.check_callback_url(url, hosts)


@pytest.mark.parametrize("url,hosts", [
    ("http://evil.example.org/x", ["hooks.example.org"]),
    ("http://hooks.example.org:9999/x", ["hooks.example.org:8443"]),
    ("http://127.0.0.1:6379/x", ["127.0.0.1"]),  # a bare host is its scheme's default port, not every service
    ("http://hooks.example.org.evil.net/x", ["hooks.example.org"]),
    ("http://hooks.example.org@evil.net/x", ["hooks.example.org"]),
    ("http://user:pw@hooks.example.org/x", ["hooks.example.org"]),
    ("file:///etc/passwd", ["hooks.example.org"]),
    ("gopher://hooks.example.org/x", ["hooks.example.org"]),
    ("http://hooks.example.org/x", []),
])
def test_any_other_callback_is_refused_naming_the_field(url, hosts):
    with pytest.raises(InvalidField) as refused:
        webhooks.check_callback_url(url, hosts)
    assert refused.value.field == "callback_url"


@pytest.fixture
def sessions(tmp_path: Path):
    return session_factory(f"sqlite:///{tmp_path / 'hooks.db'}")


def ended_job(sessions, url: str) -> str:
    """A farm job with a callback, cancelled: its end writes the delivery (the outbox)."""
    request = records.Submission("/data/x", None, EvalConfig(metrics=("is",)), run="r", step=7, callback_url=url)
    job_id = records.create_job(sessions, request, mode=FARM).job_id
    records.cancel_job(sessions, job_id)
    return job_id


def delivery_of(sessions, job_id: str) -> Delivery:
    from sqlalchemy import select

    with sessions() as s:
        return s.scalar(select(Delivery).where(Delivery.job_id == job_id))


def test_ending_a_job_with_a_callback_writes_one_delivery(sessions):
    job_id = ended_job(sessions, "http://127.0.0.1:1/hook")
    assert webhooks.due(sessions, job_id) == [delivery_of(sessions, job_id).id]
    assert not records.cancel_job(sessions, job_id)  # ended once, so delivered once
    assert len(webhooks.due(sessions, job_id)) == 1


def test_a_job_without_a_callback_writes_none(sessions):
    job_id = records.create_job(sessions, records.Submission("/data/x", None, EvalConfig(metrics=("is",))),
                                mode=FARM).job_id
    records.cancel_job(sessions, job_id)
    assert webhooks.due(sessions, job_id) == []


def test_a_delivery_posts_the_signed_end_of_the_job(sessions):
    with Listener(fail_first=0).running() as hook:
        job_id = ended_job(sessions, hook.url)
        (delivery_id,) = webhooks.due(sessions, job_id)
        assert webhooks.deliver(sessions, delivery_id, secret=SECRET, hosts=["127.0.0.1:*"]) is None
    (got,) = hook.received
    assert got.headers["X-Evalfarm-Delivery"] == delivery_id
    assert hmac.compare_digest(got.headers["X-Evalfarm-Signature"], webhooks.sign(got.body, SECRET))
    body = json.loads(got.body)
    assert datetime.fromisoformat(body.pop("sent_at")) <= records.utcnow()  # signed too: replays can be refused
    assert body == {"job_id": job_id, "state": "cancelled", "error": "cancelled by user", "run": "r", "step": 7}
    d = delivery_of(sessions, job_id)
    assert (d.state, d.attempts, d.last_status) == (DeliveryState.DELIVERED, 1, 200)


def test_a_failed_attempt_is_retried_after_the_backoff_and_a_duplicate_posts_nothing(sessions):
    with Listener(fail_first=1).running() as hook:
        (delivery_id,) = webhooks.due(sessions, ended_job(sessions, hook.url))
        assert webhooks.deliver(sessions, delivery_id, secret=SECRET, hosts=["127.0.0.1:*"]) == webhooks.BACKOFF_S[0]
        assert webhooks.deliver(sessions, delivery_id, secret=SECRET, hosts=["127.0.0.1:*"]) is None  # not due yet
        assert len(hook.received) == 1


def test_after_the_last_attempt_the_delivery_fails_and_is_recorded(sessions):
    with Listener(fail_first=99, fail_status=503).running() as hook:
        job_id = ended_job(sessions, hook.url)
        (delivery_id,) = webhooks.due(sessions, job_id)
        waits = []
        for _ in range(webhooks.MAX_ATTEMPTS):
            with sessions.begin() as s:  # skip the wait: the attempt is due now
                s.get(Delivery, delivery_id).next_at = records.utcnow()
            waits.append(webhooks.deliver(sessions, delivery_id, secret=SECRET, hosts=["127.0.0.1:*"]))
    assert waits == [*webhooks.BACKOFF_S, None]
    assert sum(webhooks.BACKOFF_S) == pytest.approx(60, abs=5)  # "for about a minute"
    d = delivery_of(sessions, job_id)
    assert (d.state, d.attempts, d.last_status) == (DeliveryState.FAILED, 5, 503)
    assert len(hook.received) == 5


def test_a_redirect_is_not_followed(sessions):
    with Listener(redirect=True).running() as hook:
        job_id = ended_job(sessions, hook.url)
        (delivery_id,) = webhooks.due(sessions, job_id)
        webhooks.deliver(sessions, delivery_id, secret=SECRET, hosts=["127.0.0.1:*"])
    assert len(hook.received) == 1
    assert delivery_of(sessions, job_id).last_status == 302


def test_a_worker_posts_nothing_to_a_host_its_settings_do_not_allow(sessions):
    with Listener(fail_first=0).running() as hook:
        job_id = ended_job(sessions, hook.url)  # a row written by other means than the API
        (delivery_id,) = webhooks.due(sessions, job_id)
        assert webhooks.deliver(sessions, delivery_id, secret=SECRET, hosts=["hooks.example.org"]) is None
    assert hook.received == []
    d = delivery_of(sessions, job_id)
    assert d.state == DeliveryState.FAILED and "not in EVALFARM_CALLBACK_HOSTS" in d.last_error


def test_a_failed_or_succeeded_job_writes_its_delivery_too(sessions):
    request = records.Submission("/data/x", None, EvalConfig(metrics=("is",)), callback_url="http://h/x")
    failed = records.create_job(sessions, request, mode=FARM).job_id
    assert records.fail_job(sessions, failed, "bad input")
    done = records.create_job(sessions, request, mode=FARM).job_id
    with sessions.begin() as s:  # as the shard that finished last leaves it
        s.get(Job, done).state = JobState.REDUCING
    assert records.finish_job(sessions, done, {}, {"ok": True})[0]
    assert len(webhooks.due(sessions, failed)) == len(webhooks.due(sessions, done)) == 1


def test_an_overdue_delivery_is_claimed_once_by_the_reconciler(sessions):
    job_id = ended_job(sessions, "http://127.0.0.1:1/hook")
    (delivery_id,) = webhooks.due(sessions, job_id)
    assert webhooks.overdue(sessions, grace_s=60) == []  # due a moment ago: its message is still on its way
    with sessions.begin() as s:
        s.get(Delivery, delivery_id).next_at = records.utcnow() - timedelta(minutes=5)
    assert webhooks.overdue(sessions, grace_s=60) == [delivery_id]
    assert webhooks.overdue(sessions, grace_s=60) == []  # sent once, not on every pass


def test_a_delivery_whose_last_attempt_was_lost_fails_instead_of_looping(sessions):
    job_id = ended_job(sessions, "http://127.0.0.1:1/hook")
    (delivery_id,) = webhooks.due(sessions, job_id)
    with sessions.begin() as s:  # five attempts started, the last one never recorded (its worker died)
        d = s.get(Delivery, delivery_id)
        d.attempts, d.next_at = webhooks.MAX_ATTEMPTS, records.utcnow() - timedelta(minutes=5)
    assert webhooks.deliver(sessions, delivery_id, secret=SECRET, hosts=["127.0.0.1:*"]) is None
    assert webhooks.overdue(sessions, grace_s=60) == []
    d = delivery_of(sessions, job_id)
    assert d.state == DeliveryState.FAILED and "lost" in d.last_error


def test_a_receiver_that_does_not_speak_http_is_a_failed_attempt(sessions):
    import socket
    import threading

    server = socket.create_server(("127.0.0.1", 0))

    def garbage() -> None:
        conn, _ = server.accept()
        conn.recv(65536)
        conn.sendall(b"not an HTTP status line\r\n\r\n")
        conn.close()

    threading.Thread(target=garbage, daemon=True).start()
    job_id = ended_job(sessions, f"http://127.0.0.1:{server.getsockname()[1]}/hook")
    (delivery_id,) = webhooks.due(sessions, job_id)
    assert webhooks.deliver(sessions, delivery_id, secret=SECRET, hosts=["127.0.0.1:*"]) == webhooks.BACKOFF_S[0]
    server.close()
    d = delivery_of(sessions, job_id)
    assert (d.state, d.attempts, d.last_status) == (DeliveryState.PENDING, 1, None)
    assert "BadStatusLine" in d.last_error


def test_the_status_shows_the_callback_without_its_query(sessions):
    url = "http://127.0.0.1:1/hook?token=receiver-secret"
    shown = webhooks.callback_status(sessions, ended_job(sessions, url), url)
    assert shown["url"] == "http://127.0.0.1:1/hook" and shown["state"] == "pending"


def test_a_receiver_that_trickles_its_answer_is_given_up_on_after_the_attempt_timeout(sessions, monkeypatch):
    import socket
    import threading
    import time

    monkeypatch.setattr(webhooks, "ATTEMPT_TIMEOUT_S", 1.0)
    server = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def trickle() -> None:  # one byte of a status line every 0.3 s: no single read ever times out
        conn, _ = server.accept()
        conn.recv(65536)
        for byte in b"HTTP/1.1 200 OK\r\n" * 10:
            if stop.wait(0.3):
                break
            conn.send(bytes([byte]))
        conn.close()

    threading.Thread(target=trickle, daemon=True).start()
    job_id = ended_job(sessions, f"http://127.0.0.1:{server.getsockname()[1]}/hook")
    (delivery_id,) = webhooks.due(sessions, job_id)
    t0 = time.monotonic()
    webhooks.deliver(sessions, delivery_id, secret=SECRET, hosts=["127.0.0.1:*"])
    assert time.monotonic() - t0 < 5
    stop.set()
    server.close()
    assert "no complete answer within 1 s" in delivery_of(sessions, job_id).last_error
