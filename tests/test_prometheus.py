"""`/metrics` of a real `evalfarm api` over real Postgres and Redis: what Prometheus scrapes, read from the
database and the broker at scrape time (never from counters inside the API process)."""

from __future__ import annotations

import http.client
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import pytest
import redis
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import update

from evalfarm.api.prometheus import queue_keys
from evalfarm.client import Client
from evalfarm.db import Job, JobState
from evalfarm.db.models import utcnow
from evalfarm.farm import Farm
from evalfarm.settings import Settings

from .farm import DATABASE_URL, REDIS_URL, ApiServer, Worker, create_token, farm_env, require_services, reset_services
from .helpers import write_images

pytestmark = [pytest.mark.farm, pytest.mark.service]

CONFIG = dict(kid_subset_size=6, kid_subsets=4, splits=2, shard_size=4)
STATES = {s.value for s in JobState}


@dataclass
class Scraped:
    env: dict[str, str]
    root: Path
    api: ApiServer
    tokens: dict[str, str]
    farm: Farm
    worker: Worker | None = field(default=None)

    def start_worker(self) -> None:
        if self.worker is None:
            self.worker = Worker(self.env, self.root / "worker.log").wait_ready()

    def stop_worker(self) -> None:
        """No worker consumes the queues (a test that counts messages on them, or holds a lease still)."""
        if self.worker is not None:
            self.worker.stop()
            self.worker = None




@pytest.fixture(scope="module")
def scraped(tmp_path_factory: pytest.TempPathFactory, weights_path: Path):
    require_services()
    reset_services()
    root = tmp_path_factory.mktemp("prometheus")
    env = {**farm_env(root, DATABASE_URL, REDIS_URL, weights_path), "EVALFARM_SAMPLE_ROOTS": str(root / "roots")}
    tokens = {name: create_token(env, name, scopes) for name, scopes in (("prometheus", "read"), ("trainer", "submit"))}
    api = ApiServer(env, root / "api.log").wait_ready()
    s = Scraped(env, root, api, tokens, Farm(Settings(database_url=DATABASE_URL, redis_url=REDIS_URL,
                                                       store=str(root / "store"))))
    try:
        yield s
    finally:
        api.stop()
        s.stop_worker()
        redis.Redis.from_url(REDIS_URL).flushdb()


def get(s: Scraped, token: str | None) -> tuple[int, str, str]:
    conn = http.client.HTTPConnection("127.0.0.1", s.api.port, timeout=30)
    try:
        conn.request("GET", "/metrics", headers={"Authorization": f"Bearer {token}"} if token else {})
        r = conn.getresponse()
        return r.status, r.getheader("content-type") or "", r.read().decode()
    finally:
        conn.close()


def scrape(s: Scraped) -> dict[str, dict[tuple, float]]:
    """sample name (`evalfarm_shards_done_total`, ...) -> {labels: value}, as Prometheus would read it."""
    status, _, text = get(s, s.tokens["prometheus"])
    assert status == 200, text
    samples: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(text):
        for x in family.samples:
            samples.setdefault(x.name, {})[tuple(sorted(x.labels.items()))] = x.value
    return samples


def one(metrics: dict[str, dict[tuple, float]], name: str, **labels: str) -> float:
    return metrics[name][tuple(sorted(labels.items()))]


def test_metrics_without_a_valid_token_are_401(scraped):
    assert get(scraped, None)[0] == 401
    assert get(scraped, "evf_" + "x" * 43)[0] == 401


def test_metrics_parse_with_help_text_and_every_job_state(scraped):
    status, content_type, text = get(scraped, scraped.tokens["prometheus"])
    assert status == 200 and content_type == CONTENT_TYPE_LATEST
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert set(families) == {"evalfarm_jobs", "evalfarm_shards_done", "evalfarm_shards_failed",
                             "evalfarm_images_featurized", "evalfarm_queue_depth", "evalfarm_oldest_lease_age_seconds"}
    assert all(f.documentation for f in families.values())
    assert {f.name: f.type for f in families.values()}["evalfarm_images_featurized"] == "counter"
    assert {x.labels["state"] for x in families["evalfarm_jobs"].samples} == STATES
    assert {x.labels["queue"] for x in families["evalfarm_queue_depth"].samples} == {"gpu", "cpu"}


def test_queue_depth_counts_every_priority_list_of_each_queue(scraped):
    scraped.stop_worker()
    before = scrape(scraped)
    r = redis.Redis.from_url(REDIS_URL)
    gpu, cpu = queue_keys("gpu"), queue_keys("cpu")
    assert gpu[0] == "gpu" and gpu[1] == "gpu\x06\x163"  # kombu's names: the queue, then one list per priority
    pushed = {gpu[0]: 2, gpu[1]: 1, gpu[3]: 1, cpu[2]: 3}
    try:
        for key, n in pushed.items():
            r.rpush(key, *[b'{"not": "a task"}'] * n)
        after = scrape(scraped)
    finally:
        for key, n in pushed.items():
            for _ in range(n):
                r.rpop(key)
    for queue, added in (("gpu", 4), ("cpu", 3)):
        assert one(after, "evalfarm_queue_depth", queue=queue) - one(before, "evalfarm_queue_depth", queue=queue) == added


def test_the_oldest_lease_age_is_the_oldest_live_heartbeat_and_0_without_one(scraped, tmp_path):
    scraped.stop_worker()  # no reconciler takes the lease back while the test holds it
    assert one(scrape(scraped), "evalfarm_oldest_lease_age_seconds") == 0
    job_id = scraped.farm.submit(str(tmp_path / "never-read.npz"), metrics=("is",))
    with scraped.farm.ctx.sessions.begin() as s:
        s.execute(update(Job).where(Job.id == job_id)
                  .values(state=JobState.PLANNING, heartbeat_at=utcnow() - timedelta(seconds=120)))
    try:
        age = one(scrape(scraped), "evalfarm_oldest_lease_age_seconds")
        assert 120 <= age < 150
    finally:
        scraped.farm.cancel(job_id)
    assert one(scrape(scraped), "evalfarm_oldest_lease_age_seconds") == 0


def test_a_finished_job_adds_its_shards_and_images_and_one_succeeded_job(scraped):
    scraped.start_worker()
    roots = scraped.root / "roots"
    samples = write_images(roots / "samples", 10, 32, seed=51, brightness=1.0)
    reference = write_images(roots / "reference", 8, 32, seed=52, brightness=0.6)
    before = scrape(scraped)
    client = Client(scraped.api.url, scraped.tokens["trainer"])
    job_id = client.submit(str(samples), str(reference), run="prom", step=1, **CONFIG)
    client.wait(job_id, timeout=300, poll_s=0.5)
    status = client.status(job_id)
    after = scrape(scraped)
    assert status["shards_done"] == status["shards_total"] == 5  # 10 samples and 8 reference images in 4s
    assert one(after, "evalfarm_shards_done_total") - one(before, "evalfarm_shards_done_total") == 5
    assert one(after, "evalfarm_images_featurized_total") - one(before, "evalfarm_images_featurized_total") == 18
    assert one(after, "evalfarm_jobs", state="succeeded") - one(before, "evalfarm_jobs", state="succeeded") == 1
    assert one(after, "evalfarm_shards_failed_total") == one(before, "evalfarm_shards_failed_total")
