"""`evalfarm plot`: a metric against step from the results database, one line per run, as a file a person
opens. Results are written by the reducer's own record functions with known values."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import numpy as np
import pytest
from PIL import Image

from evalfarm import keys
from evalfarm.errors import EvalfarmError
from evalfarm.plot import plot_runs
from evalfarm.runs import run_history

from .helpers import record_result, run_cli

#: matplotlib's first two line colours: run A's line and run B's
BLUE, ORANGE = (0x1F, 0x77, 0xB4), (0xFF, 0x7F, 0x0E)


def values(fid: float, is_mean: float, is_std: float) -> dict[str, float]:
    return {keys.KEY_FID: fid, keys.KEY_IS_MEAN: is_mean, keys.KEY_IS_STD: is_std,
            keys.KEY_KID_MEAN: fid / 1000, keys.KEY_KID_STD: fid / 5000}


@pytest.fixture
def two_runs() -> None:
    for step, fid in ((3000, 20.0), (1000, 60.0), (2000, 35.0)):  # finished out of step order
        record_result("run-a", step, values(fid, 3.0 + step / 1000, 0.2))
    for step, fid in ((1000, 70.0), (2000, 50.0)):
        record_result("run-b", step, values(fid, 2.5 + step / 1000, 0.3))


def pixels_near(img: np.ndarray, rgb: tuple[int, int, int], tol: int = 12) -> int:
    return int((np.abs(img[..., :3].astype(int) - np.array(rgb)).max(axis=-1) <= tol).sum())


def test_a_png_of_two_runs_is_sized_drawn_and_has_one_line_colour_per_run(two_runs, tmp_path):
    out = tmp_path / "fid.png"
    drawn = plot_runs({"run-a": run_history("run-a"), "run-b": run_history("run-b")}, "fid", out)
    img = np.asarray(Image.open(out).convert("RGB"))
    assert drawn == 5
    assert img.shape[:2] == (675, 1200)
    assert len(np.unique(img.reshape(-1, 3), axis=0)) > 50  # not blank: axes, text, lines
    assert pixels_near(img, BLUE) > 300 and pixels_near(img, ORANGE) > 300


def test_is_and_kid_carry_a_std_band_and_fid_none(two_runs, tmp_path):
    def bands(family: str) -> int:
        out = tmp_path / f"{family}.svg"
        plot_runs({"run-a": run_history("run-a")}, family, out)
        return sum(el.get("id") == "run-0-band" for el in ET.parse(out).iter())

    assert bands("is") == 1 and bands("kid") == 1
    assert bands("fid") == 0


def test_points_are_drawn_in_step_order_whatever_order_they_finished_in(two_runs, tmp_path):
    out = tmp_path / "fid.svg"
    plot_runs({"run-a": run_history("run-a")}, "fid", out)
    ns = {"svg": "http://www.w3.org/2000/svg"}
    line = next(g for g in ET.parse(out).iter(f"{{{ns['svg']}}}g") if g.get("id") == "run-0-line")
    xs = [float(tok.split()[0]) for tok in line.find("svg:path", ns).get("d").replace("M", "L").split("L")[1:]]
    assert len(xs) == 3 and xs == sorted(xs)


def test_the_cli_writes_the_file_and_names_what_it_drew(two_runs, tmp_path):
    out = tmp_path / "plots" / "is.png"
    done = run_cli("plot", "--run", "run-a", "--run", "run-b", "--metric", "is", "-o", out)
    assert done.returncode == 0, done.stderr
    assert "Inception Score of run-a, run-b, 5 points" in done.stdout
    assert Image.open(out).size == (1200, 675)


def test_an_unknown_run_is_one_clear_error_and_no_file(two_runs, tmp_path):
    out = tmp_path / "x.png"
    done = run_cli("plot", "--run", "run-a", "--run", "no-such-run", "-o", out)
    assert done.returncode == 1
    assert done.stderr.strip() == ("error: run 'no-such-run' has no succeeded evaluation "
                                   "(`evalfarm results` lists the runs' results)")
    assert not out.exists()


def test_an_extension_it_cannot_write_is_refused_naming_the_formats(two_runs, tmp_path):
    with pytest.raises(EvalfarmError, match=r"\.png, \.svg, \.pdf"):
        plot_runs({"run-a": run_history("run-a")}, "fid", tmp_path / "fid.jpg2")


def test_a_run_without_the_metric_is_an_error_not_an_empty_plot(tmp_path):
    record_result("is-only", 1000, {keys.KEY_IS_MEAN: 3.0, keys.KEY_IS_STD: 0.1})
    with pytest.raises(EvalfarmError, match="no result of 'is-only' has FID"):
        plot_runs({"is-only": run_history("is-only")}, "fid", tmp_path / "fid.png")
