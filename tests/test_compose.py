"""Deployment files: docker-compose.yml, Dockerfile, README and .ci/run agree with each other and with the design.

Cheap checks only: no image is built and no container started. The YAML structure is checked when PyYAML is
installed and `docker compose config` when Docker Compose is; the text checks always run.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
SERVICES = ("redis", "postgres", "scheduler", "gpu-worker", "api", "flower")
REDIS_FLAGS = ("--appendonly yes", "--appendfsync everysec", "--maxmemory-policy noeviction")


def _compose_text() -> str:
    return COMPOSE.read_text()


def _words(command: object) -> str:
    return " ".join(command) if isinstance(command, list) else str(command)


def test_compose_text() -> None:
    text = _compose_text()
    for name in SERVICES:
        assert re.search(rf"^  {re.escape(name)}:\s*$", text, re.M), f"service {name} missing"
    flat = re.sub(r'[",\[\]]', " ", text)
    flat = re.sub(r"\s+", " ", flat)
    for flag in REDIS_FLAGS:
        assert flag in flat, flag
    assert "driver: nvidia" in text and "capabilities: [gpu]" in text
    assert "FLOWER_BASIC_AUTH: ${FLOWER_BASIC_AUTH:?" in text
    assert "EVALFARM_REDIS_URL: redis://redis:6379/0" in text
    assert "postgresql://evalfarm:${POSTGRES_PASSWORD:-evalfarm}@postgres:5432/evalfarm" in text


def test_compose_publishes_the_unauthenticated_ports_on_loopback_only() -> None:
    text = _compose_text()
    assert '"127.0.0.1:8080:8080"' in text  # the API
    assert '"127.0.0.1:5555:5555"' in text  # Flower
    assert not re.search(r'^\s*- "(8080|5555):', text, re.M)


def test_compose_structure() -> None:
    yaml = pytest.importorskip("yaml", reason="PyYAML is not installed; the text checks above still ran")
    doc = yaml.safe_load(_compose_text())
    services = doc["services"]
    assert set(SERVICES) <= set(services)

    redis, postgres = services["redis"], services["postgres"]
    assert redis["image"].startswith("redis:7")
    command = _words(redis["command"])
    for flag in REDIS_FLAGS:
        assert flag in command, flag
    assert "redis-cli" in _words(redis["healthcheck"]["test"])
    assert postgres["image"].startswith("postgres:16")
    assert postgres["environment"]["POSTGRES_DB"] == "evalfarm"
    assert "pg_isready" in _words(postgres["healthcheck"]["test"])
    assert redis["volumes"] and postgres["volumes"]

    for name in ("scheduler", "gpu-worker", "flower"):
        env = services[name]["environment"]
        assert env["EVALFARM_REDIS_URL"] == "redis://redis:6379/0"
        assert env["EVALFARM_DATABASE_URL"].startswith("postgresql://")
        assert env["EVALFARM_STORE"] == "/data/store"
    for name in ("scheduler", "gpu-worker"):
        deps = services[name]["depends_on"]
        assert deps["redis"]["condition"] == deps["postgres"]["condition"] == "service_healthy"

    assert _words(services["scheduler"]["command"]).split()[:3] == ["worker", "--queues", "cpu"]
    gpu = services["gpu-worker"]
    assert "--queues gpu" in _words(gpu["command"])
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["count"] == 1 and device["capabilities"] == ["gpu"]
    assert any(str(v).split(":")[1] == "/data/store" for v in gpu["volumes"])
    assert any(str(v).split(":")[0] == "store" for v in services["scheduler"]["volumes"])  # same store as workers

    api = services["api"]
    assert _words(api["command"]).split()[0] == "api"
    assert "/health" in _words(api["healthcheck"]["test"])
    for name in ("api", "scheduler", "gpu-worker"):  # the API checks the roots, and the workers again
        assert services[name]["environment"]["EVALFARM_SAMPLE_ROOTS"].endswith("/data/samples}")
        assert "./samples:/data/samples:ro" in services[name]["volumes"]  # one view of the samples' symlinks
        assert "EVALFARM_WEBHOOK_SECRET" in services[name]["environment"]

    flower = services["flower"]
    assert "flower" in _words(flower["command"])
    assert flower["environment"]["FLOWER_BASIC_AUTH"].startswith("${FLOWER_BASIC_AUTH:?")
    assert any("5555" in str(p) for p in flower["ports"])


def test_dockerfile() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim\b", text, re.M)
    assert "pip install ." in text
    assert re.search(r"^USER (?!root\b)\S+", text, re.M), "the image must run as a non-root user"
    assert "EVALFARM_STORE=/data/store" in text
    assert 'ENTRYPOINT ["evalfarm"]' in text


def _fenced_commands(markdown: str, heading: str) -> list[str]:
    section = re.search(rf"^## {heading}\s*$(.*?)(?=^## |\Z)", markdown, re.M | re.S)
    assert section, f"README has no '## {heading}' section"
    blocks = re.findall(r"```[a-z]*\n(.*?)```", section.group(1), re.S)
    return [line.strip() for block in blocks for line in block.splitlines() if line.strip()]


def test_ci_runs_the_readme_commands() -> None:
    readme = (ROOT / "README.md").read_text()
    install, test = _fenced_commands(readme, "Install"), _fenced_commands(readme, "Test")
    assert len(install) == 1 and len(test) == 1, (install, test)
    ci = ROOT / ".ci" / "run"
    script = ci.read_text()
    assert install[0] in script and test[0] in script
    assert os.access(ci, os.X_OK), ".ci/run must be executable"


def _compose_available() -> bool:
    if not shutil.which("docker"):
        return False
    try:
        return subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def test_docker_compose_config() -> None:
    if not _compose_available():
        pytest.skip("`docker compose version` does not work here (no Docker Compose v2 plugin)")
    env = {**os.environ, "FLOWER_BASIC_AUTH": "user:password"}
    proc = subprocess.run(
        ["docker", "compose", "-f", str(COMPOSE), "config", "-q"],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
