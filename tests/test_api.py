"""The farm as a service: a real uvicorn server of `evalfarm api`, real Redis and Postgres, a real worker.

Who may do what (tokens and scopes), what may be read (the sample roots), idempotent submits, signed
webhooks, the light client's numbers, and bad input that gets a clear 4xx while the server goes on serving.
"""

from __future__ import annotations

import hashlib
import hmac
import http.client
import json
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

import evalfarm
from evalfarm import keys
from evalfarm.client import Client
from evalfarm.config import EvalConfig
from evalfarm.errors import JobError
from evalfarm.farm import Farm
from evalfarm.models.weights import file_sha256
from evalfarm.scheduler import records
from evalfarm.scheduler.references import NamedReference
from evalfarm.settings import Settings
from evalfarm.workers.registry import held_weights

from .farm import DATABASE_URL, REDIS_URL, ApiServer, Worker, create_token, farm_env, require_services, reset_services
from .helpers import in_home, run_cli, wait_until, write_images
from .listener import Listener

pytestmark = [pytest.mark.farm, pytest.mark.service]

N_SAMPLES, N_REFERENCE = 20, 12
CONFIG = dict(kid_subset_size=8, kid_subsets=5, splits=4, shard_size=8)
SECRET = "a-webhook-secret-for-tests"
ROUTES = [("POST", "/v1/jobs"), ("GET", "/v1/jobs"), ("GET", "/v1/jobs/00000000-0000-0000-0000-000000000000"),
          ("POST", "/v1/jobs/00000000-0000-0000-0000-000000000000/cancel"), ("GET", "/v1/results"),
          ("GET", "/v1/references")]


@dataclass
class Service:
    url: str
    env: dict[str, str]
    root: Path
    roots: Path
    samples: Path
    reference: Path
    outside: Path
    tokens: dict[str, str]
    farm: Farm
    hook: Listener
    api: ApiServer

    def client(self, who: str = "alice") -> Client:
        return Client(self.url, self.tokens[who])

    def job_count(self) -> int:
        return len(self.farm.jobs(limit=1000))




@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory, weights_path: Path):
    require_services()
    reset_services()
    root = tmp_path_factory.mktemp("service")
    roots = root / "roots"
    samples = write_images(roots / "samples", N_SAMPLES, 32, seed=21, brightness=1.0)
    reference = write_images(roots / "reference", N_REFERENCE, 32, seed=22, brightness=0.6)
    outside = write_images(root / "outside", 4, 32, seed=23, brightness=1.0)
    (roots / "escape").symlink_to(outside, target_is_directory=True)
    mixed = write_images(roots / "mixed", 4, 32, seed=24, brightness=1.0)
    (mixed / "0009.png").symlink_to(outside / "0000.png")
    with Listener(fail_first=1).running() as hook:
        env = {
            **farm_env(root, DATABASE_URL, REDIS_URL, weights_path),
            "EVALFARM_SAMPLE_ROOTS": str(roots),
            "EVALFARM_CALLBACK_HOSTS": f"127.0.0.1:{hook.port}",
            "EVALFARM_WEBHOOK_SECRET": SECRET,
        }
        tokens = {name: create_token(env, name, scopes) for name, scopes in
                  (("admin", "admin"), ("alice", "submit"), ("bob", "submit"), ("reader", "read"))}
        api = ApiServer(env, root / "api.log").wait_ready()
        worker = Worker(env, root / "worker.log").wait_ready()
        farm = Farm(Settings(database_url=DATABASE_URL, redis_url=REDIS_URL, store=str(root / "store")))
        try:
            yield Service(api.url, env, root, roots, samples, reference, outside, tokens, farm, hook, api)
        finally:
            api.stop()
            worker.stop()
            redis.Redis.from_url(REDIS_URL).flushdb()


@pytest.fixture(scope="module")
def embedded_result(service: Service, weights_path: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    with in_home(tmp_path_factory.mktemp("embedded-home")):
        return evalfarm.evaluate(str(service.samples), str(service.reference), weights=str(weights_path),
                                 device="cpu", cache=False, **{**CONFIG, "shard_size": 1000})


def call(service: Service, method: str, path: str, body: object = None, *, who: str | None = None,
         raw: bytes | None = None, headers: dict[str, str] | None = None) -> tuple[int, object]:
    """One request as curl would send it; (status, decoded JSON body)."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    h = {"Content-Type": "application/json", **(headers or {})}
    if who is not None:
        h["Authorization"] = f"Bearer {service.tokens.get(who, who)}"
    req = urllib.request.Request(service.url + path, data=data, method=method, headers=h)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def missing(service: Service, name: str) -> str:
    """A path inside the roots that holds nothing: a job on it fails at planning, cheaply."""
    return str(service.roots / f"missing-{name}.npz")


# -- who -----------------------------------------------------------------------------------------------------------


def test_health_needs_no_token(service):
    assert call(service, "GET", "/health") == (200, {"status": "ok", "version": evalfarm.__version__})


@pytest.mark.parametrize("method,path", ROUTES)
def test_every_route_without_a_token_is_401(service, method, path):
    status, body = call(service, method, path, {"samples": missing(service, "401")} if method == "POST" else None)
    assert status == 401 and "Bearer" in body["detail"]


def test_an_unknown_or_revoked_token_is_401(service):
    temp = create_token(service.env, "temp", "read")
    assert call(service, "GET", "/v1/jobs", who=temp)[0] == 200
    assert run_cli("token", "revoke", "temp", env=service.env).returncode == 0
    assert call(service, "GET", "/v1/jobs", who=temp) == (401, {"detail": "invalid or revoked token"})
    assert call(service, "GET", "/v1/jobs", who="evf_" + "x" * 43)[0] == 401


def test_a_read_token_reads_but_cannot_submit(service):
    before = service.job_count()
    status, body = call(service, "POST", "/v1/jobs", {"samples": str(service.samples)}, who="reader")
    assert status == 403 and "'submit' scope" in body["detail"]
    assert service.job_count() == before
    assert call(service, "GET", "/v1/jobs", who="reader")[0] == 200


def test_a_submit_token_cancels_only_its_own_jobs_and_admin_any(service):
    live = EvalConfig(metrics=("is",), splits=2, batch_size=2, shard_size=2)  # many small shards: still running
    alices = service.client("alice").submit(str(service.samples), config=live)
    bobs = service.client("bob").submit(str(service.samples), config=live)
    status, body = call(service, "POST", f"/v1/jobs/{alices}/cancel", who="bob")
    assert status == 403 and "submitted by 'alice'" in body["detail"]
    assert call(service, "POST", f"/v1/jobs/{alices}/cancel", who="alice") == (
        200, {"job_id": alices, "cancelled": True, "state": "cancelled"})
    assert call(service, "POST", f"/v1/jobs/{bobs}/cancel", who="admin")[1]["cancelled"] is True
    assert call(service, "POST", f"/v1/jobs/{bobs}/cancel", who="admin")[1]["cancelled"] is False  # ended
    assert service.farm.owner(alices) == "alice"


# -- what may be read ----------------------------------------------------------------------------------------------


def escapes(service: Service) -> list[str]:
    return [
        str(service.outside),  # outside every root
        f"{service.roots}/samples/../../outside",  # `..` out of the root
        str(service.roots / "escape"),  # a symlink out of the root
        f"file://{service.outside}",
        "file:///etc/passwd",
        "http://127.0.0.1:1/samples.npz",
        "memory://samples.npz",
    ]


@pytest.mark.parametrize("field", ["samples", "ref"])
def test_paths_outside_the_sample_roots_are_403_and_make_no_job(service, field):
    before = service.job_count()
    for uri in escapes(service):
        body = {"samples": str(service.samples), "ref": uri} if field == "ref" else {"samples": uri, "metrics": "is"}
        status, answer = call(service, "POST", "/v1/jobs", body, who="alice")
        assert status == 403, uri
        assert "EVALFARM_SAMPLE_ROOTS" in answer["detail"], uri
    assert service.job_count() == before


def test_a_relative_path_is_refused_as_samples_and_is_no_reference_name_as_ref(service):
    before = service.job_count()
    status, body = call(service, "POST", "/v1/jobs", {"samples": "samples", "metrics": "is"}, who="alice")
    assert status == 403 and "give an absolute path or a URL" in body["detail"]
    status, body = call(service, "POST", "/v1/jobs", {"samples": str(service.samples), "ref": "../outside"},
                        who="alice")
    assert status == 422 and body["detail"][0]["loc"] == ["body", "ref"]
    assert service.job_count() == before


def test_without_sample_roots_the_api_refuses_every_path(service):
    env = {k: v for k, v in service.env.items() if k != "EVALFARM_SAMPLE_ROOTS"}
    api = ApiServer(env, service.root / "api-no-roots.log").wait_ready()
    try:
        before = service.job_count()
        blank = Service(**{**service.__dict__, "url": api.url})
        status, body = call(blank, "POST", "/v1/jobs", {"samples": str(service.samples), "metrics": "is"}, who="alice")
        assert status == 403 and "reads no sample paths until EVALFARM_SAMPLE_ROOTS" in body["detail"]
        assert service.job_count() == before
    finally:
        api.stop()


def test_a_named_reference_is_taken_by_name_and_an_unknown_name_is_422(service):
    records.register_reference(service.farm.ctx.sessions, NamedReference(
        "cifar-like", "/elsewhere/cifar", "0" * 64, "0" * 64, "tf", 12, "refs/none.npz"))
    body = {"samples": missing(service, "named"), "metrics": "fid", "ref": "cifar-like"}
    assert call(service, "POST", "/v1/jobs", body, who="alice")[0] == 201
    status, answer = call(service, "POST", "/v1/jobs", {**body, "ref": "no-such-name"}, who="alice")
    assert status == 422 and answer["detail"][0]["loc"] == ["body", "ref"]
    assert "no named reference 'no-such-name'" in answer["detail"][0]["msg"]


def test_the_worker_refuses_a_row_outside_its_roots_whoever_wrote_it(service):
    job_id = service.farm.submit(str(service.outside), None, EvalConfig(metrics=("is",), splits=2))
    with pytest.raises(JobError, match="outside the sample roots"):
        service.farm.wait(job_id, timeout=120)


def test_a_folder_that_links_outside_the_roots_fails_naming_the_link(service):
    job_id = service.client().submit(str(service.roots / "mixed"), config=EvalConfig(metrics=("is",), splits=2))
    with pytest.raises(JobError, match="0009.png links to a file outside the sample roots"):
        service.client().wait(job_id, timeout=120, poll_s=0.5)
    assert service.farm.status(job_id)["shards_total"] == 0  # refused at planning: nothing was featurized


# -- idempotency ---------------------------------------------------------------------------------------------------


def test_the_same_idempotency_key_returns_the_same_job(service):
    body = {"samples": missing(service, "idem"), "metrics": "is", "idempotency_key": "run7-step-1000"}
    first_status, first = call(service, "POST", "/v1/jobs", body, who="alice")
    before = service.job_count()
    again_status, again = call(service, "POST", "/v1/jobs", {**body, "splits": 10}, who="alice")  # the default
    assert (first_status, first["created"]) == (201, True)
    assert (again_status, again["created"], again["job_id"]) == (200, False, first["job_id"])
    assert service.job_count() == before


def test_the_same_key_with_another_body_is_409(service):
    body = {"samples": missing(service, "idem-409"), "metrics": "is", "idempotency_key": "k-409"}
    assert call(service, "POST", "/v1/jobs", body, who="alice")[0] == 201
    before = service.job_count()
    status, answer = call(service, "POST", "/v1/jobs", {**body, "splits": 5}, who="alice")
    assert status == 409 and "k-409" in answer["detail"]
    assert service.job_count() == before


def test_idempotency_keys_belong_to_their_token(service):
    body = {"samples": missing(service, "idem-token"), "metrics": "is", "idempotency_key": "shared-key"}
    a = call(service, "POST", "/v1/jobs", body, who="alice")[1]["job_id"]
    b = call(service, "POST", "/v1/jobs", body, who="bob")[1]["job_id"]
    assert a != b


def test_the_cli_submits_through_the_api_when_its_url_is_set(service, tmp_path):
    env = {k: v for k, v in service.env.items() if k not in ("EVALFARM_DATABASE_URL", "EVALFARM_REDIS_URL")}
    env.update(EVALFARM_API_URL=service.url, EVALFARM_API_TOKEN=service.tokens["alice"])
    args = ("submit", missing(service, "cli"), "--metrics", "is", "--idempotency-key", "cli-key")
    first, second = run_cli(*args, env=env), run_cli(*args, env=env)
    assert first.returncode == 0, first.stderr
    job_id = first.stdout.strip().splitlines()[-1]
    assert second.stdout.strip().splitlines()[-1] == job_id
    assert service.farm.owner(job_id) == "alice"
    status = run_cli("status", job_id, env=env)
    assert status.returncode == 0 and job_id in status.stdout
    other_body = run_cli(*args, "--splits", "5", env=env)
    assert other_body.returncode == 1 and "HTTP 409" in other_body.stderr and "cli-key" in other_body.stderr
    refused = run_cli("submit", str(service.outside), "--metrics", "is", env=env)
    assert refused.returncode == 1 and "outside the sample roots" in refused.stderr
    unreachable = run_cli("status", job_id, env={**env, "EVALFARM_API_URL": "http://127.0.0.1:1"})
    assert unreachable.returncode == 1 and "no answer from http://127.0.0.1:1" in unreachable.stderr
    assert "Traceback" not in refused.stderr + other_body.stderr + unreachable.stderr


# -- weights, callbacks --------------------------------------------------------------------------------------------


def test_weights_no_worker_holds_are_409(service, weights_path):
    wait_until(lambda: held_weights(service.farm.ctx.partials.redis), 30, "the worker to announce its weights")
    body = {"samples": missing(service, "weights"), "metrics": "is", "weights_sha256": "0" * 64}
    before = service.job_count()
    status, answer = call(service, "POST", "/v1/jobs", body, who="alice")
    assert status == 409 and "no worker of this farm holds" in answer["detail"]
    assert service.job_count() == before
    held = {**body, "weights_sha256": file_sha256(weights_path)}
    assert call(service, "POST", "/v1/jobs", held, who="alice")[0] == 201


def test_a_callback_on_a_host_nobody_allowed_is_422_naming_the_field(service):
    before = service.job_count()
    body = {"samples": missing(service, "cb"), "metrics": "is", "callback_url": "http://127.0.0.2:9/hook"}
    status, answer = call(service, "POST", "/v1/jobs", body, who="alice")
    assert status == 422
    assert answer["detail"][0]["loc"] == ["body", "callback_url"]
    assert "EVALFARM_CALLBACK_HOSTS" in answer["detail"][0]["msg"]
    assert service.job_count() == before


def test_each_ended_job_gets_one_signed_webhook_after_a_first_attempt_that_got_500(service):
    client = service.client()
    done = client.submit(str(service.samples), config=EvalConfig(metrics=("is",), splits=2, shard_size=10),
                         run="hooked", step=100, callback_url=service.hook.url)
    cancelled = client.submit(missing(service, "hook"), config=EvalConfig(metrics=("is",)),
                              callback_url=service.hook.url)
    client.cancel(cancelled)
    result = client.wait(done, timeout=300, poll_s=0.5)
    wait_until(lambda: len(service.hook.delivered()) >= 2, 90, "two delivered webhooks")
    by_job = {}
    for got in service.hook.received:
        assert got.path == "/hook"
        assert hmac.compare_digest(got.headers["X-Evalfarm-Signature"],
                                   "sha256=" + hmac.new(SECRET.encode(), got.body, hashlib.sha256).hexdigest())
        body = json.loads(got.body)
        by_job.setdefault(body["job_id"], []).append((got.answered, got.headers["X-Evalfarm-Delivery"], body))
    assert set(by_job) == {done, cancelled}
    for job_id, attempts in by_job.items():
        assert [a[0] for a in attempts] == [500, 200], job_id  # one failure, then exactly one delivery
        assert len({a[1] for a in attempts}) == 1  # the same delivery id on both attempts
    ok = by_job[done][-1][2]
    assert (ok["state"], ok["run"], ok["step"]) == ("succeeded", "hooked", 100)
    assert ok["result"][keys.KEY_IS_MEAN] == result[keys.KEY_IS_MEAN]
    assert by_job[cancelled][-1][2]["state"] == "cancelled"
    callback = client.status(done)["callback"]
    assert (callback["state"], callback["attempts"], callback["last_status"]) == ("delivered", 2, 200)


# -- the light client ----------------------------------------------------------------------------------------------


def test_submit_and_wait_through_the_light_client_give_the_embedded_numbers(service, embedded_result):
    client = service.client()
    job_id = client.submit(str(service.samples), str(service.reference), cache=False, **CONFIG,
                           run="light", step=5, tags={"lr": "2e-4"})  # EvalConfig fields as keywords
    result = client.wait(job_id, timeout=300, poll_s=0.5)
    for key in keys.METRIC_KEYS:
        assert result[key] == pytest.approx(embedded_result[key], rel=1e-6, abs=1e-12), key
    (row,) = client.results(run="light")
    assert row["job_id"] == job_id and row["step"] == 5
    assert [j["job_id"] for j in client.jobs(run="light", state="succeeded")] == [job_id]


# -- bad input -----------------------------------------------------------------------------------------------------


def test_malformed_json_is_422(service):
    status, body = call(service, "POST", "/v1/jobs", raw=b'{"samples": ', who="alice")
    assert status == 422 and body["detail"][0]["type"] == "json_invalid"


def test_wrong_types_and_unknown_fields_are_422_naming_each(service):
    status, body = call(service, "POST", "/v1/jobs", {"samples": 3, "splits": "10", "metrics": ["fid", "nope"],
                                                      "bogus": 1}, who="alice")
    assert status == 422
    named = {tuple(d["loc"][1:]) for d in body["detail"]}
    assert {("samples",), ("splits",), ("metrics", 1), ("bogus",)} <= named


@pytest.mark.parametrize("field,value", [("samples", "/x\x00.npz"), ("run", "a\x00b"), ("idempotency_key", "k\n"),
                                         ("tags", {"k": "v\x00"})])
def test_control_characters_are_422_naming_the_field(service, field, value):
    body = {"samples": missing(service, "nul"), "metrics": "is", field: value}
    status, answer = call(service, "POST", "/v1/jobs", body, who="alice")
    assert status == 422 and answer["detail"][0]["loc"] == ["body", field]


def test_extractors_travel_with_the_job_and_an_impossible_combination_is_422(service):
    body = {"samples": missing(service, "dino"), "ref": missing(service, "dino-ref"), "metrics": "fid,prc",
            "extractors": "dinov2-vit-l-14,clip-vit-l-14"}
    status, created = call(service, "POST", "/v1/jobs", body, who="alice")
    assert status == 201, created
    config = records.get_job(service.farm.ctx.sessions, created["job_id"]).config.to_dict()
    assert config["extractors"] == ["dinov2-vit-l-14", "clip-vit-l-14"] and config["metrics"] == ["fid", "prc"]
    status, answer = call(service, "POST", "/v1/jobs", {**body, "metrics": "is,fid"}, who="alice")
    assert status == 422 and "Inception Score is defined on inception-v3-compat" in json.dumps(answer)


def test_a_seed_numpy_cannot_take_is_422(service):
    for seed in (-1, 2**32):
        status, answer = call(service, "POST", "/v1/jobs", {"samples": missing(service, "seed"), "metrics": "is",
                                                            "seed": seed}, who="alice")
        assert status == 422 and answer["detail"][0]["loc"] == ["body", "seed"]


def test_a_20_mb_body_is_413(service):
    big = b'{"samples": "' + b"x" * (20 << 20) + b'"}'
    assert call(service, "POST", "/v1/jobs", raw=big, who="alice")[0] == 413


def test_a_chunked_body_over_the_bound_is_413(service):
    conn = http.client.HTTPConnection("127.0.0.1", service.api.port, timeout=30)
    conn.putrequest("POST", "/v1/jobs")
    conn.putheader("Authorization", f"Bearer {service.tokens['alice']}")
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Transfer-Encoding", "chunked")
    conn.endheaders()
    chunk = b"x" * (1 << 20)
    try:
        for _ in range(4):
            conn.send(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        conn.send(b"0\r\n\r\n")
    except (BrokenPipeError, ConnectionResetError):
        pass  # the server answered and closed before the rest was sent
    assert conn.getresponse().status == 413
    conn.close()


def test_unknown_and_malformed_job_ids_are_404_and_422(service):
    assert call(service, "GET", "/v1/jobs/00000000-0000-0000-0000-000000000000", who="reader")[0] == 404
    assert call(service, "POST", "/v1/jobs/00000000-0000-0000-0000-000000000000/cancel", who="admin")[0] == 404
    assert call(service, "GET", "/v1/jobs/not-a-job", who="reader")[0] == 422
    assert call(service, "GET", "/v1/jobs?limit=0", who="reader")[0] == 422
    assert call(service, "GET", "/v1/jobs?state=exploded", who="reader")[0] == 422
    status, body = call(service, "GET", "/v1/results?metric=fidd", who="reader")
    assert status == 422 and body["detail"][0]["loc"] == ["query", "metric"]


def test_after_bad_input_the_server_still_serves(service):
    call(service, "POST", "/v1/jobs", raw=b"\xff\xfe not json", who="alice")
    call(service, "POST", "/v1/jobs", raw=b'{"samples": "' + b"x" * (20 << 20) + b'"}', who="alice")
    assert service.api.alive()
    assert call(service, "GET", "/health")[0] == 200
    assert call(service, "POST", "/v1/jobs", {"samples": missing(service, "after"), "metrics": "is"},
                who="alice")[0] == 201


def test_the_openapi_document_lists_the_versioned_routes(service):
    status, doc = call(service, "GET", "/openapi.json")
    assert status == 200
    assert {"/v1/jobs", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/cancel", "/v1/results", "/v1/references",
            "/health"} <= set(doc["paths"])
    assert "JobRequest" in doc["components"]["schemas"]


def test_the_docs_page_needs_nothing_from_the_internet(service):
    with urllib.request.urlopen(service.url + "/docs", timeout=10) as r:
        page = r.read().decode()
    assets = [a for a in ("swagger-ui-bundle.js", "swagger-ui.css") if f"/docs-assets/{a}" in page]
    assert assets == ["swagger-ui-bundle.js", "swagger-ui.css"]
    assert "cdn." not in page
    for asset in assets:
        with urllib.request.urlopen(f"{service.url}/docs-assets/{asset}", timeout=10) as r:
            assert r.status == 200 and len(r.read()) > 10_000


# -- the training loop's sidecar -------------------------------------------------------------------------------------


def test_a_watcher_that_lost_its_state_submits_no_set_twice(service, tmp_path):
    """`evalfarm watch` through the API: killed after submitting, its state file lost, then run again with a
    new set: the same idempotency keys return the first jobs, and the new set gets the one new job."""
    import os
    import signal
    import subprocess

    from .helpers import EVALFARM

    root = service.roots / "watched"
    for step in (1000, 2000):
        (write_images(root / f"step-{step}", 8, 32, seed=step, brightness=1.0) / "DONE").touch()
    env = {**service.env, "EVALFARM_API_URL": service.url, "EVALFARM_API_TOKEN": service.tokens["alice"]}
    args = [*EVALFARM, "watch", str(root), "--run", "watched", "--ref", str(service.reference), "--every", "0.5",
            "--kid-subset-size", "8", "--kid-subsets", "5", "--splits", "4", "--shard-size", "8"]
    state = root / ".evalfarm-watch-watched.json"

    def submitted() -> dict[str, str]:
        try:
            sets = json.loads(state.read_text())["sets"]
        except (FileNotFoundError, ValueError):
            return {}
        return {name: rec["job_id"] for name, rec in sets.items() if rec["job_id"]}

    with open(tmp_path / "watch.log", "wb") as log:
        first = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_until(lambda: len(submitted()) == 2, 60, "both sets submitted")
        finally:
            os.killpg(first.pid, signal.SIGKILL)
            first.wait(10)
    first_jobs = submitted()
    state.unlink()  # the worst case: everything the watcher remembered is gone
    (write_images(root / "step-3000", 8, 32, seed=3000, brightness=1.0) / "DONE").touch()

    again = subprocess.run([*args, "--once"], env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    jobs = service.farm.jobs(run="watched")
    assert sorted(j["step"] for j in jobs) == [1000, 2000, 3000]
    assert {j["state"] for j in jobs} == {"succeeded"}
    assert {k: v for k, v in submitted().items() if k != "step-3000"} == first_jobs
