"""What a watcher sees in a training job's sample directory: the sample sets, their steps, and whether each
is complete yet.

A set is complete when a `DONE` marker sits with it (`NAME.DONE` beside it, or `DONE` inside a set folder),
or when its signature (bytes, files, newest modification) is the same on two polls in a row: a writer
that is still appending changes it between polls.
"""

from __future__ import annotations

import fnmatch
import os
import re
from dataclasses import dataclass
from pathlib import Path

from evalfarm.errors import EvalfarmError

SET_SUFFIXES = (".npz", ".npy", ".tar", ".tar.gz", ".tgz", ".zip")  #: files that are sample sets; folders always are
DONE_MARKER = "DONE"
#: a number right after a word that names a step (`step-1000`, `iter_20000`, `it5000`, `ckpt-3`, `kimg1200`)
_KEYWORD_NUMBER = re.compile(r"(?<![a-z])(?:step|iter|iteration|it|ckpt|checkpoint|kimg)[-_.]?(\d+)", re.IGNORECASE)
_NUMBER = re.compile(r"\d+")


@dataclass(frozen=True)
class SampleSet:
    """One candidate set: its name under the watched directory, its path and its step."""

    name: str
    path: Path
    step: int

    def signature(self) -> list[int]:
        """[bytes, files, newest mtime in ns] now; looked at only for sets not started yet (a folder of 50k
        images costs 50k stats)."""
        return list(signature(self.path))

    def done_marker(self) -> bool:
        return has_done_marker(self.path)


def step_parser(step_regex: str | None) -> re.Pattern[str] | None:
    """The user's pattern for a set's step (its first group, else the whole match); None for the default."""
    if step_regex is None:
        return None
    try:
        return re.compile(step_regex)
    except re.error as exc:
        raise EvalfarmError(f"--step-regex {step_regex!r} is not a regular expression: {exc}") from exc


def parse_step(name: str, pattern: re.Pattern[str] | None) -> int | None:
    """A set's step from its name, or None when the name does not say it unambiguously. By default: the
    number after a step word (`step-1000-ema0.9999` → 1000), else the name's only number
    (`samples_120000.npz`); `samples_120000_64x64.npz` holds three numbers and no step word, so it needs
    --step-regex rather than a guess."""
    stem = name[: -len(suffix)] if (suffix := _set_suffix(name)) else name
    if pattern is not None:
        match = pattern.search(stem)
        text = (match.group(1) if pattern.groups else match.group(0)) if match else None
        return int(text) if text and text.isdigit() else None
    keyword = _KEYWORD_NUMBER.findall(stem)
    numbers = keyword or _NUMBER.findall(stem)
    return int(numbers[0]) if len(set(numbers)) == 1 else None


def _set_suffix(name: str) -> str | None:
    lower = name.lower()
    return next((s for s in SET_SUFFIXES if lower.endswith(s)), None)


def signature(path: Path) -> tuple[int, int, int]:
    """(bytes, files, newest mtime in ns) of a file or of a folder's visible files, recursively."""
    if path.is_file():
        st = path.stat()
        return st.st_size, 1, st.st_mtime_ns
    size = files = newest = 0
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for f in filenames:
            if f.startswith("."):
                continue
            try:
                st = os.stat(os.path.join(dirpath, f))
            except FileNotFoundError:  # removed while we walked: the set is still changing
                continue
            size, files, newest = size + st.st_size, files + 1, max(newest, st.st_mtime_ns)
    return size, files, newest


def has_done_marker(path: Path) -> bool:
    beside = [path.with_name(path.name + "." + DONE_MARKER), path.with_name(path.name + "." + DONE_MARKER.lower())]
    return any(p.is_file() for p in beside) or (path.is_dir() and (path / DONE_MARKER).is_file())


def discover(root: Path, pattern: str, steps: re.Pattern[str] | None) -> tuple[list[SampleSet], dict[str, str]]:
    """The sample sets directly under `root` whose names match `pattern`, by step; and the names left out,
    with why: no step in the name, or a step that another set has too (two sets of one step would put two
    points at one step of every plot and export)."""
    if not root.is_dir():
        raise EvalfarmError(f"{root} is not a directory: watch the folder the training job writes its samples to")
    by_step: dict[int, list[SampleSet]] = {}
    skipped: dict[str, str] = {}
    for entry in sorted(root.iterdir()):
        name = entry.name
        if name.startswith(".") or not fnmatch.fnmatch(name, pattern):
            continue
        if not (entry.is_dir() or (entry.is_file() and _set_suffix(name))):
            continue  # markers, logs, half-written `.tmp` files: not sample sets
        step = parse_step(name, steps)
        if step is None:
            skipped[name] = (f"--step-regex {steps.pattern!r} finds no step in it (it is matched against the name "
                             "without its extension)" if steps is not None else
                             "no step in its name, or more than one number and no step word (pass --step-regex)")
        else:
            by_step.setdefault(step, []).append(SampleSet(name, entry, step))
    found = []
    for step, sets in sorted(by_step.items()):
        if len(sets) == 1:
            found.append(sets[0])
        else:
            names = ", ".join(s.name for s in sets)
            skipped.update({s.name: f"step {step} is also the step of {names} (narrow --pattern, or pass "
                                    "--step-regex)" for s in sets})
    return found, skipped
