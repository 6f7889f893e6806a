"""The shape of the code: imports run one way, `sources → models → metrics → pipeline → scheduler → workers /
api / cli`, without cycles; and the modules a submitting process imports stay light."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import evalfarm

PACKAGE = Path(evalfarm.__file__).parent

#: each layer may import its own and lower layers only; `evalfarm/__init__.py` is the public facade above all
RANK = {
    "_version": 0, "states": 0, "config": 0, "settings": 0, "errors": 0, "keys": 0, "atomic": 0,
    "sources": 1, "models": 2, "metrics": 3, "db": 3, "pipeline": 4, "scheduler": 5,
    "workers": 6, "farm": 6, "client": 6, "runs": 6, "api": 7, "export": 7, "plot": 7, "watch": 7, "cli": 8,
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every evalfarm module `path` imports, at module level or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("evalfarm")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("evalfarm"):
            for a in node.names:  # `from evalfarm.x import y` may name a submodule y
                sub = f"{node.module}.{a.name}"
                found.add(sub if _exists(sub) else node.module)
    return found


def _exists(module: str) -> bool:
    rel = Path(*module.split(".")[1:])
    return (PACKAGE / rel).with_suffix(".py").exists() or (PACKAGE / rel / "__init__.py").exists()


def layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


GRAPH = {module_name(p): imports_of(p) for p in sorted(PACKAGE.rglob("*.py")) if "migrations" not in p.parts}


def test_no_import_runs_back_up_the_layers() -> None:
    upward = []
    for module, targets in GRAPH.items():
        source = layer(module)
        if source is None:  # the facade
            continue
        for target in targets:
            dest = layer(target)
            if dest is None or RANK[dest] > RANK[source]:
                upward.append(f"{module} -> {target}")
    assert upward == []


def test_the_layers_have_no_cycles() -> None:
    edges = {(layer(m), layer(t)) for m, ts in GRAPH.items() for t in ts if layer(m) and layer(t)}
    cycles = sorted({(a, b) for a, b in edges if a != b and (b, a) in edges})
    assert cycles == []


def test_the_modules_have_no_import_cycles() -> None:
    def reaches(start: str, goal: str) -> bool:
        seen, todo = set(), list(GRAPH.get(start, ()))
        while todo:
            m = todo.pop()
            if m == goal:
                return True
            if m not in seen:
                seen.add(m)
                todo.extend(GRAPH.get(m, ()))
        return False

    assert [m for m in GRAPH if reaches(m, m)] == []


LIGHT = ("torch", "celery", "sqlalchemy", "redis", "numpy", "fastapi", "pydantic")


@pytest.mark.parametrize("module,heavy", [
    ("evalfarm.config", LIGHT),
    ("evalfarm.client", LIGHT),  # what a training job imports to submit
    ("evalfarm.watch", LIGHT),  # the sidecar beside a training job: light until it evaluates here
    ("evalfarm.runs", LIGHT),
    ("evalfarm.settings", LIGHT),
    ("evalfarm.api.app", ("torch", "torchvision")),  # the service holds no network: it never featurizes
])
def test_importing_a_submitting_module_loads_no_heavy_dependency(module: str, heavy: tuple[str, ...]) -> None:
    code = f"import sys, {module}\nprint(sorted(m for m in {heavy!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_no_job_or_shard_state_is_spelled_as_a_string_outside_db() -> None:
    from evalfarm.db import JobState, ShardState

    states = {s.value for s in (*JobState, *ShardState)}
    spelled = []
    for path in PACKAGE.rglob("*.py"):
        if "db" in path.relative_to(PACKAGE).parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare):
                for side in (node.left, *node.comparators):
                    if isinstance(side, ast.Constant) and side.value in states:
                        spelled.append(f"{path.name}:{node.lineno}")
    assert spelled == []


def test_the_api_processes_share_a_socket_made_as_tcp() -> None:
    """asyncio sets TCP_NODELAY only on sockets made with IPPROTO_TCP; without it, every keep-alive answer of
    a multi-process API waited for a delayed ACK (see `evalfarm.api.serve`)."""
    import socket

    from evalfarm.api.serve import listening_socket

    with listening_socket("127.0.0.1", 0) as sock:
        assert (sock.family, sock.type, sock.proto) == (socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
