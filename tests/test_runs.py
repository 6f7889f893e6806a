"""A run's history, as export, plot and the dashboard read it: every result, by step, page after page."""

from __future__ import annotations

import pytest

from evalfarm import keys, runs
from evalfarm.errors import EvalfarmError
from evalfarm.runs import run_history

from .helpers import record_result


def test_a_history_longer_than_a_page_is_read_whole_and_in_step_order(monkeypatch):
    monkeypatch.setattr(runs, "PAGE", 2)
    for step in (5, 1, 4, 2, 3):
        record_result("long", step, {keys.KEY_FID: float(step)})
    assert [(p.step, p.metrics[keys.KEY_FID]) for p in run_history("long")] == [(s, float(s)) for s in range(1, 6)]


def test_results_without_a_step_come_last():
    record_result("r", None, {keys.KEY_FID: 9.0})
    record_result("r", 7, {keys.KEY_FID: 1.0})
    assert [p.step for p in run_history("r")] == [7, None]


def test_an_empty_run_name_is_refused_rather_than_read_as_every_run():
    record_result("some-run", 1, {keys.KEY_FID: 1.0})
    with pytest.raises(EvalfarmError, match="a run name is needed"):
        run_history("")


def test_a_result_knows_whether_its_weights_were_the_canonical_file():
    record_result("r", 1, {keys.KEY_FID: 1.0}, weights_sha256=keys.CANONICAL_INCEPTION_SHA256_PREFIX + "0" * 56)
    record_result("r", 2, {keys.KEY_FID: 1.0}, weights_sha256="ab" * 32)
    assert [p.canonical_weights for p in run_history("r")] == [True, False]
