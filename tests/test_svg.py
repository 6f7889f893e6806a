"""The dashboard's charts: one pure function from series to SVG text (`evalfarm.api.svg`), read back here the
way the browser tests read it, by its points' data attributes."""

from __future__ import annotations

import math
import re

from evalfarm.api.svg import Series, line_chart


def points_of(svg: str) -> list[tuple[str, str]]:
    return re.findall(r'<circle class="point" data-run="[^"]*" data-step="([^"]*)" data-value="([^"]*)"', svg)


def test_a_chart_has_one_point_per_result_sorted_by_step_with_a_tooltip():
    svg = line_chart([Series("r", [(3000, 1.5, None), (1000, 2.5, None), (2000, 2.0, None)])], metric="fid",
                     label="FID")
    assert points_of(svg) == [("1000", "2.5"), ("2000", "2.0"), ("3000", "1.5")]
    assert "<title>r · step 1000 · FID 2.5</title>" in svg
    assert svg.count('class="line"') == 1 and 'class="tick x"' in svg and 'class="tick y"' in svg


def test_a_chart_without_points_says_so():
    svg = line_chart([Series("r", [])], metric="fid", label="FID")
    assert points_of(svg) == [] and "no results" in svg and 'class="series"' not in svg


def test_a_single_point_and_equal_values_get_a_real_scale():
    for pts in ([(1000, 3.0, 0.5)], [(1000, 3.0, None), (2000, 3.0, None)], [(5, 0.0, None)]):
        svg = line_chart([Series("r", pts)], metric="is", label="IS")
        assert len(points_of(svg)) == len(pts)
        assert "nan" not in svg.lower() and "inf" not in svg.lower()
        coords = [float(v) for v in re.findall(r'c[xy]="([^"]+)"', svg)]
        assert all(math.isfinite(c) and 0 <= c <= 440 for c in coords)
    assert svg.count('class="tick y"') >= 2


def test_non_finite_values_are_never_drawn():
    svg = line_chart([Series("r", [(1, float("nan"), None), (2, 1.0, float("inf")), (3, float("inf"), None),
                                   (4, 2.0, float("nan")), (5, 3.0, 0.1)])], metric="kid", label="KID")
    assert points_of(svg) == [("2", "1.0"), ("4", "2.0"), ("5", "3.0")]
    assert "nan" not in svg.lower() and "inf" not in svg.lower()
    assert svg.count('class="band"') == 1  # the one point with a std: drawn as a bar


def test_every_name_is_escaped():
    svg = line_chart([Series('<script>"&', [(1, 1.0, None)])], metric="a\"b", label="<b>")
    assert "<script>" not in svg and "<b>" not in svg
    assert 'data-run="&lt;script&gt;&quot;&amp;"' in svg and 'data-metric="a&quot;b"' in svg


def test_several_series_share_one_scale_with_their_own_colours():
    svg = line_chart([Series("a", [(0, 1.0, None), (10, 2.0, None)], "#111111"),
                      Series("b", [(5, 100.0, None)], "#222222")], metric="fid", label="FID")
    assert re.findall(r'<g class="series" data-run="([^"]+)"', svg) == ["a", "b"]
    assert 'fill="#111111"' in svg and 'fill="#222222"' in svg
    ys = [float(y) for y in re.findall(r'cy="([^"]+)"', svg)]
    assert ys[2] < ys[1] < ys[0]  # 100 above 2 above 1: one y scale for both runs
