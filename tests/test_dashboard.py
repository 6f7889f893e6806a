"""The results dashboard, in a real headless Chromium against a real `evalfarm api`, worker, Postgres and Redis.

Three evaluations of one run (submitted out of order) and one of a second run whose name is an HTML
injection; then what a person sees: the login, the curves (every point where the stored result says), the
values by step, runs compared, jobs and one job's settings and hashes. Plain HTTP checks the cookie's
properties, open redirects, escaping and the outage page. The chart function alone: tests/test_svg.py.
"""

from __future__ import annotations

import http.client
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlencode, urlsplit, urlunsplit

import pytest
import redis

from evalfarm.client import Client
from evalfarm.config import EvalConfig
from evalfarm.db import session_factory
from evalfarm.keys import METRIC_FAMILIES
from evalfarm.scheduler import records
from evalfarm.scheduler.job import FARM

from .farm import (
    DATABASE_URL,
    REDIS_URL,
    ApiServer,
    TcpProxy,
    Worker,
    create_token,
    farm_env,
    require_services,
    reset_services,
)
from .helpers import run_cli, write_images

pytestmark = [pytest.mark.farm, pytest.mark.service]

RUN = "dash"
OTHER = 'b<script>alert("x")</script>'  #: the second run: compared, and escaped on every page
TAG = '<img src=x onerror="alert(1)">'
STEPS = (3000, 1000, 2000)  #: submitted in this order; every page shows them by step
N_SAMPLES, N_REFERENCE = 10, 12
CONFIG = dict(kid_subset_size=6, kid_subsets=4, splits=2, shard_size=8)
COOKIE = "evalfarm_token"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
CHROMEDRIVER = shutil.which("chromedriver") or ("/usr/bin/chromedriver" if os.path.exists("/usr/bin/chromedriver")
                                                else None)


@dataclass
class Dash:
    url: str
    env: dict[str, str]
    api: ApiServer
    tokens: dict[str, str]
    jobs: dict[int, str]  #: step -> job id, run RUN
    other_job: str
    reader: Client




@pytest.fixture(scope="module")
def dash(tmp_path_factory: pytest.TempPathFactory, weights_path: Path):
    require_services()
    reset_services()
    root = tmp_path_factory.mktemp("dashboard")
    roots = root / "roots"
    reference = write_images(roots / "reference", N_REFERENCE, 32, seed=40, brightness=0.6)
    env = {**farm_env(root, DATABASE_URL, REDIS_URL, weights_path), "EVALFARM_SAMPLE_ROOTS": str(roots)}
    tokens = {name: create_token(env, name, scopes) for name, scopes in (("reader", "read"), ("trainer", "submit"))}
    api = ApiServer(env, root / "api.log").wait_ready()
    worker = Worker(env, root / "worker.log").wait_ready()
    try:
        trainer = Client(api.url, tokens["trainer"])
        jobs = {}
        for i, step in enumerate(STEPS):
            samples = write_images(roots / f"{RUN}-{step}", N_SAMPLES, 32, seed=41 + i, brightness=0.8 + 0.1 * i)
            jobs[step] = trainer.submit(str(samples), str(reference), run=RUN, step=step, tags={"lr": "2e-4"},
                                        **CONFIG)
        samples = write_images(roots / "other", N_SAMPLES, 32, seed=45, brightness=0.5)
        other_job = trainer.submit(str(samples), str(reference), run=OTHER, step=1000, tags={"note": TAG}, **CONFIG)
        for job_id in (*jobs.values(), other_job):
            trainer.wait(job_id, timeout=300, poll_s=0.5)
        yield Dash(api.url, env, api, tokens, jobs, other_job, Client(api.url, tokens["reader"]))
    finally:
        api.stop()
        worker.stop()
        redis.Redis.from_url(REDIS_URL).flushdb()


# -- plain HTTP ----------------------------------------------------------------------------------------------------


@dataclass
class Answer:
    status: int
    location: str | None
    cookies: list[str]
    headers: http.client.HTTPMessage
    text: str


def fetch(dash: Dash, path: str, *, method: str = "GET", form: dict[str, str] | None = None,
          token: str | None = None, headers: dict[str, str] | None = None, port: int | None = None) -> Answer:
    """One request, redirects not followed; `token` is sent as the login cookie."""
    conn = http.client.HTTPConnection("127.0.0.1", port or dash.api.port, timeout=30)
    h = dict(headers or {})
    body = None
    if form is not None:
        body, h["Content-Type"] = urlencode(form), "application/x-www-form-urlencoded"
    if token is not None:
        h["Cookie"] = f"{COOKIE}={token}"
    try:
        conn.request(method, path, body=body, headers=h)
        r = conn.getresponse()
        return Answer(r.status, r.getheader("location"), r.headers.get_all("set-cookie") or [], r.headers,
                      r.read().decode())
    finally:
        conn.close()


def pages(dash: Dash) -> list[str]:
    return ["/ui", f"/ui/runs/{RUN}", f"/ui/runs/{quote(OTHER, safe='')}",
            f"/ui/compare?run={RUN}&run={quote(OTHER, safe='')}", "/ui/jobs", f"/ui/jobs/{dash.other_job}"]


def test_every_page_without_a_cookie_redirects_to_the_login_form_and_back(dash):
    for path in pages(dash):
        answer = fetch(dash, path)
        assert answer.status == 303, path
        assert answer.location == ("/ui/login" if path == "/ui" else f"/ui/login?next={quote(path, safe='/')}")
        assert answer.cookies == []


def test_the_read_token_gets_an_httponly_strict_cookie_for_the_whole_site(dash):
    answer = fetch(dash, "/ui/login", method="POST", form={"token": dash.tokens["reader"], "next": "/ui/jobs"})
    assert (answer.status, answer.location) == (303, "/ui/jobs")
    (cookie,) = answer.cookies
    attributes = {a.strip().split("=")[0].lower() for a in cookie.split(";")[1:]}
    assert cookie.startswith(f"{COOKIE}={dash.tokens['reader']};")
    assert {"httponly", "path", "samesite", "max-age"} <= attributes and "secure" not in attributes
    assert "SameSite=strict" in cookie and "Path=/;" in cookie + ";"
    assert fetch(dash, "/ui/jobs", token=dash.tokens["reader"]).status == 200


def test_a_login_that_came_over_https_gets_a_secure_cookie(dash):
    # behind a TLS proxy on the same host: uvicorn takes the scheme from X-Forwarded-Proto of 127.0.0.1
    answer = fetch(dash, "/ui/login", method="POST", form={"token": dash.tokens["reader"]},
                   headers={"X-Forwarded-Proto": "https"})
    (cookie,) = answer.cookies
    assert "secure" in {a.strip().lower() for a in cookie.split(";")}


def test_a_wrong_token_gets_the_form_again_with_401_and_no_cookie(dash):
    answer = fetch(dash, "/ui/login", method="POST", form={"token": "evf_" + "x" * 43, "next": f"/ui/runs/{RUN}"})
    assert answer.status == 401 and answer.cookies == []
    assert "not valid" in answer.text and f'value="/ui/runs/{RUN}"' in answer.text


def test_a_token_that_can_do_more_than_read_cannot_log_in(dash):
    answer = fetch(dash, "/ui/login", method="POST", form={"token": dash.tokens["trainer"]})
    assert answer.status == 401 and answer.cookies == []
    assert "--scopes read" in answer.text
    assert fetch(dash, "/ui", token=dash.tokens["trainer"]).status == 303  # nor open a page as a cookie


def test_a_revoked_token_cannot_log_in_and_its_cookie_stops_working(dash):
    temp = create_token(dash.env, "temp-reader", "read")
    assert fetch(dash, "/ui", token=temp).status == 200
    assert run_cli("token", "revoke", "temp-reader", env=dash.env).returncode == 0
    answer = fetch(dash, "/ui", token=temp)
    assert answer.status == 303 and answer.location == "/ui/login"
    assert any(c.startswith(f'{COOKIE}="";') or c.startswith(f"{COOKIE}=;") for c in answer.cookies)  # dropped
    answer = fetch(dash, "/ui/login", method="POST", form={"token": temp})
    assert answer.status == 401 and answer.cookies == []


@pytest.mark.parametrize("target", ["https://evil.example/", "//evil.example/ui", "/\\evil.example", "/ui@evil.example",
                                    "javascript:alert(1)", "/uievil", " /ui"])
def test_next_leads_only_to_a_dashboard_page(dash, target):
    answer = fetch(dash, "/ui/login", method="POST", form={"token": dash.tokens["reader"], "next": target})
    assert (answer.status, answer.location) == (303, "/ui")
    assert "evil" not in fetch(dash, f"/ui/login?next={quote(target, safe='')}").text


def test_the_cookie_does_not_open_the_json_api_or_the_metrics(dash):
    for path in ("/v1/jobs", "/v1/results", "/metrics"):
        assert fetch(dash, path, token=dash.tokens["reader"]).status == 401, path


def test_logout_removes_the_cookie(dash):
    answer = fetch(dash, "/ui/logout", method="POST", token=dash.tokens["reader"])
    assert (answer.status, answer.location) == (303, "/ui/login")
    (cookie,) = answer.cookies
    assert "max-age=0" in cookie.lower() and "httponly" in cookie.lower()


def test_a_login_or_logout_posted_from_another_site_is_refused(dash):
    cross = {"Sec-Fetch-Site": "cross-site"}
    answer = fetch(dash, "/ui/login", method="POST", form={"token": dash.tokens["reader"]}, headers=cross)
    assert answer.status == 403 and answer.cookies == []
    assert fetch(dash, "/ui/logout", method="POST", headers=cross).status == 403


def test_run_names_and_tags_are_escaped_on_every_page(dash):
    for path in pages(dash):
        answer = fetch(dash, path, token=dash.tokens["reader"])
        assert answer.status == 200, path
        assert "<script" not in answer.text and "<img" not in answer.text, path
    assert "b&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;" in fetch(dash, "/ui", token=dash.tokens["reader"]).text
    job_page = fetch(dash, f"/ui/jobs/{dash.other_job}", token=dash.tokens["reader"]).text
    assert "&lt;img src=x onerror=" in job_page


def test_pages_allow_no_script_and_are_not_cached(dash):
    answer = fetch(dash, f"/ui/runs/{RUN}", token=dash.tokens["reader"])
    policy = answer.headers["content-security-policy"]
    assert "default-src 'none'" in policy and "script-src" not in policy and "frame-ancestors 'none'" in policy
    assert answer.headers["cache-control"] == "no-store"
    assert fetch(dash, "/ui/static/style.css").status == 200  # the one thing a page loads: no token needed


def test_a_live_job_is_listed_with_its_progress_until_it_ends(dash):
    sessions = session_factory(DATABASE_URL)
    # a row alone, its plan never sent: it stays queued while the page is read (the reconciler sends it later)
    live = records.create_job(sessions, records.Submission("/nowhere/live.npz", None, EvalConfig(metrics=("is",)),
                                                           run="live-run", step=7), mode=FARM, submitted_by="test")
    try:
        page = fetch(dash, "/ui/jobs", token=dash.tokens["reader"]).text
        row = page.split(f'<tr data-job="{live.job_id}">', 1)[1].split("</tr>", 1)[0]
        assert page.index('class="jobs live"') < page.index(live.job_id) < page.index('class="jobs ended"')
        assert ">queued<" in row and ">live-run<" in row and ">0/0<" in row
    finally:
        records.cancel_job(sessions, live.job_id)
    page = fetch(dash, "/ui/jobs", token=dash.tokens["reader"]).text
    assert page.index('class="jobs ended"') < page.index(live.job_id)


def test_an_unknown_run_or_job_is_a_404_page(dash):
    for path in ("/ui/runs/no-such-run", "/ui/jobs/00000000-0000-0000-0000-000000000000", "/ui/jobs/not-a-uuid"):
        answer = fetch(dash, path, token=dash.tokens["reader"])
        assert answer.status == 404 and answer.headers["content-type"].startswith("text/html"), path


def test_a_database_outage_is_a_503_page_not_a_traceback(dash, tmp_path):
    db = urlsplit(DATABASE_URL)
    proxy = TcpProxy(db.port or 5432, db.hostname or "127.0.0.1")
    user = db.netloc.rsplit("@", 1)[0] + "@" if "@" in db.netloc else ""
    through = urlunsplit(db._replace(netloc=f"{user}127.0.0.1:{proxy.port}"))
    api = ApiServer({**dash.env, "EVALFARM_DATABASE_URL": through}, tmp_path / "api.log").wait_ready()
    try:
        assert fetch(dash, f"/ui/runs/{RUN}", token=dash.tokens["reader"], port=api.port).status == 200
        proxy.close()
        answer = fetch(dash, f"/ui/runs/{RUN}", token=dash.tokens["reader"], port=api.port)
        assert answer.status == 503 and answer.headers["content-type"].startswith("text/html")
        assert "unreachable" in answer.text and "Traceback" not in answer.text
        assert answer.headers["retry-after"] == "5"
    finally:
        proxy.close()
        api.stop()


# -- in the browser ------------------------------------------------------------------------------------------------


def require_browser() -> None:
    """Skip without Chromium and its driver locally; fail under CI, where the dashboard must be exercised."""
    if CHROMIUM and CHROMEDRIVER:
        return
    msg = f"headless Chromium unavailable (chromium: {CHROMIUM}, chromedriver: {CHROMEDRIVER})"
    if os.environ.get("CI"):
        pytest.fail(msg)
    pytest.skip(msg)


@pytest.fixture(scope="module")
def browser(dash):
    require_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1300,1000",
                "--hide-scrollbars"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def submit_login(browser, token: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    field = browser.find_element(By.ID, "token")
    field.clear()
    field.send_keys(token)
    browser.find_element(By.ID, "login").click()
    WebDriverWait(browser, 30).until(
        lambda d: "/ui/login" not in d.current_url or d.find_elements(By.CSS_SELECTOR, "p.error"))


def logged_out(browser, dash: Dash) -> None:
    browser.get(dash.url + "/health")
    browser.delete_all_cookies()


@pytest.fixture
def page(browser, dash):
    """The browser, logged in with the read token."""
    from selenium.webdriver.common.by import By

    logged_out(browser, dash)
    browser.get(dash.url + "/ui/login")
    submit_login(browser, dash.tokens["reader"])
    assert browser.find_elements(By.CSS_SELECTOR, "p.error") == []
    return browser


def test_the_browser_is_sent_to_the_login_form_refused_a_wrong_token_and_let_in_with_the_read_token(browser, dash):
    from selenium.webdriver.common.by import By

    logged_out(browser, dash)
    browser.get(f"{dash.url}/ui/runs/{RUN}")
    assert browser.current_url == f"{dash.url}/ui/login?next=/ui/runs/{RUN}"
    submit_login(browser, "evf_not-a-token")
    assert "not valid" in browser.find_element(By.CSS_SELECTOR, "p.error").text
    assert browser.get_cookie(COOKIE) is None
    submit_login(browser, dash.tokens["reader"])
    assert browser.current_url == f"{dash.url}/ui/runs/{RUN}"
    cookie = browser.get_cookie(COOKIE)
    assert cookie["httpOnly"] is True and cookie["sameSite"] == "Strict" and cookie["path"] == "/"
    assert browser.execute_script("return document.cookie") == ""  # invisible to scripts


def stored(dash: Dash, run: str = RUN) -> dict[int, dict[str, float]]:
    """The run's results as the API returns them: step -> metrics."""
    return {r["step"]: r["metrics"] for r in dash.reader.results(run=run)}


def test_the_run_page_plots_every_result_where_the_database_has_it(page, dash):
    from selenium.webdriver.common.by import By

    page.get(f"{dash.url}/ui/runs/{RUN}")
    results = stored(dash)
    assert sorted(results) == sorted(STEPS)
    for family, (key, _) in METRIC_FAMILIES.items():
        points = page.find_elements(By.CSS_SELECTOR, f'svg[data-metric="{family}"] circle.point')
        assert len(points) == len(STEPS), family
        plotted = {int(p.get_attribute("data-step")): float(p.get_attribute("data-value")) for p in points}
        assert plotted == {step: metrics[key] for step, metrics in results.items()}, family
    first = page.find_element(By.CSS_SELECTOR, 'svg[data-metric="fid"] circle.point[data-step="1000"] title')
    assert first.get_attribute("textContent").startswith(f"{RUN} · step 1000 · FID ")


def test_the_run_page_draws_std_bands_for_is_and_kid(page, dash):
    from selenium.webdriver.common.by import By

    page.get(f"{dash.url}/ui/runs/{RUN}")
    bands = {f: len(page.find_elements(By.CSS_SELECTOR, f'svg[data-metric="{f}"] path.band')) for f in METRIC_FAMILIES}
    assert bands == {"is": 1, "fid": 0, "kid": 1}
    ticks = page.find_elements(By.CSS_SELECTOR, 'svg[data-metric="fid"] text.tick.x')
    assert [t.text for t in ticks if t.text in ("1000", "2000", "3000")] == ["1000", "2000", "3000"]


def test_results_from_seeded_weights_are_marked_as_not_publishable(page, dash):
    from selenium.webdriver.common.by import By

    page.get(f"{dash.url}/ui/runs/{RUN}")
    warning = page.find_element(By.ID, "weights-warning").text
    assert warning.startswith(f"{len(STEPS)} of these results come from weights other than the canonical")


def test_the_values_table_lists_the_results_by_step_with_their_jobs(page, dash):
    from selenium.webdriver.common.by import By

    page.get(f"{dash.url}/ui/runs/{RUN}")
    rows = page.find_elements(By.CSS_SELECTOR, "table.values tbody tr")
    results = stored(dash)
    assert [int(r.get_attribute("data-step")) for r in rows] == sorted(STEPS)
    for row in rows:
        step = int(row.get_attribute("data-step"))
        for family, (key, _) in METRIC_FAMILIES.items():
            cell = row.find_element(By.CSS_SELECTOR, f"td.{family}")
            assert float(cell.get_attribute("data-value")) == results[step][key]
            assert cell.text.startswith(f"{results[step][key]:#.4g}".rstrip("."))
        link = row.find_element(By.CSS_SELECTOR, "a.job").get_attribute("href")
        assert link == f"{dash.url}/ui/jobs/{dash.jobs[step]}"


def test_the_compare_page_draws_one_coloured_series_per_run(page, dash):
    from selenium.webdriver.common.by import By

    page.get(f"{dash.url}/ui/compare?run={RUN}&run={quote(OTHER, safe='')}")
    legend = [li.get_attribute("data-run") for li in page.find_elements(By.CSS_SELECTOR, "ul.legend li")]
    assert legend == [RUN, OTHER]
    for family in METRIC_FAMILIES:
        series = page.find_elements(By.CSS_SELECTOR, f'svg[data-metric="{family}"] g.series')
        assert [s.get_attribute("data-run") for s in series] == [RUN, OTHER]
        counts = [len(s.find_elements(By.CSS_SELECTOR, "circle.point")) for s in series]
        colours = {s.find_element(By.CSS_SELECTOR, "circle.point").get_attribute("fill") for s in series}
        assert counts == [len(STEPS), 1] and len(colours) == 2
    page.get(f"{dash.url}/ui/compare?run={RUN}&run={quote(OTHER, safe='')}&metric=fid")
    assert [c.get_attribute("data-metric") for c in page.find_elements(By.CSS_SELECTOR, "svg.chart")] == ["fid"]


def test_the_jobs_page_lists_the_ended_jobs(page, dash):
    from selenium.webdriver.common.by import By

    page.get(f"{dash.url}/ui/jobs")
    ended = {r.get_attribute("data-job") for r in page.find_elements(By.CSS_SELECTOR, "table.ended tbody tr")}
    assert {*dash.jobs.values(), dash.other_job} <= ended
    assert page.find_elements(By.CSS_SELECTOR, "table.live") == []  # nothing is live any more


def test_a_job_page_shows_its_settings_hashes_and_weights(page, dash):
    from selenium.webdriver.common.by import By

    job_id = dash.jobs[2000]
    result = dash.reader.status(job_id)["result"]
    page.get(f"{dash.url}/ui/jobs/{job_id}")
    assert page.find_element(By.CSS_SELECTOR, "h1 .state").text == "succeeded"
    settings = {r.get_attribute("data-setting"): r.find_element(By.TAG_NAME, "td").text
                for r in page.find_elements(By.CSS_SELECTOR, "table.settings tr")}
    assert {k: settings[k] for k in CONFIG} == {k: str(v) for k, v in CONFIG.items()}
    assert settings["metrics"] == "is, fid, kid"
    assert page.find_element(By.ID, "samples-sha256").text == result["samples_sha256"]
    assert page.find_element(By.ID, "reference-sha256").text == result["reference_sha256"]
    assert page.find_element(By.ID, "weights-sha256").text == result["weights_sha256"]
    assert page.find_element(By.ID, "samples-uri").text == result["samples"]
    assert float(page.find_element(By.CSS_SELECTOR, "table.result td.fid").get_attribute("data-value")) == \
        result["frechet_inception_distance"]


def test_a_run_named_like_markup_reads_as_its_name(page, dash):
    from selenium.webdriver.common.by import By

    page.get(f"{dash.url}/ui/runs/{quote(OTHER, safe='')}")
    assert page.find_element(By.CSS_SELECTOR, "h1 .run").text == OTHER
    assert page.find_element(By.CSS_SELECTOR, "circle.point").get_attribute("data-run") == OTHER


def test_a_screenshot_of_the_run_page(page, dash, tmp_path):
    page.get(f"{dash.url}/ui/runs/{RUN}")
    shot = tmp_path / "dashboard-run.png"
    assert page.save_screenshot(str(shot))
    data = shot.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 20_000
    if os.environ.get("EVALFARM_DASHBOARD_SCREENSHOT"):  # to refresh docs/dashboard-run.png
        shutil.copyfile(shot, os.environ["EVALFARM_DASHBOARD_SCREENSHOT"])
