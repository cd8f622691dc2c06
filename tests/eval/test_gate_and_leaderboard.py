"""The regression gate and the leaderboard on results records with known numbers: directions, tolerance,
comparability, the Pareto front, the ratings join and the rendered files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from eval.gate import QUALITY_METRICS, find_regressions, why_not_comparable
from eval.leaderboard import (
    LeaderboardError,
    leaderboard_rows,
    load_ratings,
    load_results,
    pareto_front,
    write_leaderboard,
)
from eval.results import RESULTS_FORMAT, headline


def result(name: str, *, clip: float = 30.0, fd: float = 0.5, seconds: float = 1.0, position: float = 0.8,
           model: str = "m", suite: str = "s1", created: str = "2026-01-01T00:00:00+00:00") -> dict:
    def score(mean: float) -> dict:
        return {"mean": mean, "low": mean * 0.9, "high": mean * 1.1, "n": 10}

    return {
        "format": RESULTS_FORMAT, "name": name, "created": created,
        "config": {"model": model, "content_hash": "0123456789", "scheduler": "lcm", "steps": 4,
                   "guidance_scale": 8.0, "width": 32, "height": 32, "suite_sha256": suite, "prompts": 5,
                   "scorer": {"name": "inhouse-clip", "content_hash": "x"}, "images_per_prompt": 2,
                   "distractors": 10},
        "prompts": [],
        "summary": {"clip_score": score(clip), "r_precision": score(0.5), "compositional": score(0.6),
                    "diversity": score(0.2), "frechet_distance": score(fd), "seconds_per_image": seconds,
                    "peak_memory_mb": 100.0, "compositional_scores": {"position": score(position)},
                    "images": 10, "by_tag": {}},
    }  # fmt: skip


def test_identical_results_pass_the_gate_at_zero_tolerance():
    assert find_regressions(result("a"), result("a"), 0.0) == []


def test_a_worse_metric_beyond_the_tolerance_is_a_regression_in_its_own_direction():
    base = result("base", clip=30.0, fd=0.50, position=0.80)
    worse = result("new", clip=28.0, fd=0.60, position=0.79)
    found = {r.metric: r for r in find_regressions(base, worse, 0.05)}
    assert set(found) == {"clip_score", "frechet_distance"}  # position lost 1.25%: within 5%
    assert found["frechet_distance"].allowed == pytest.approx(0.525)
    assert "above the allowed" in str(found["frechet_distance"]) and "below the allowed" in str(found["clip_score"])
    better = result("new", clip=35.0, fd=0.1, position=1.0)  # better in every direction is never a regression
    assert find_regressions(base, better, 0.0) == []


def test_speed_is_gated_only_when_asked():
    base, slower = result("base", seconds=1.0), result("new", seconds=3.0)
    assert find_regressions(base, slower, 0.05) == []
    assert [r.metric for r in find_regressions(base, slower, 0.05, ["seconds_per_image"])] == ["seconds_per_image"]


def test_every_compositional_sub_score_is_gated_by_default():
    assert "compositional.position" in headline(result("a"))
    regressions = find_regressions(result("a", position=0.8), result("b", position=0.5), 0.05, QUALITY_METRICS)
    assert [r.metric for r in regressions] == ["compositional.position"]


def test_results_on_other_prompts_or_another_scorer_are_not_comparable():
    assert why_not_comparable(result("a"), result("b")) is None
    assert "suite_sha256" in why_not_comparable(result("a", suite="s1"), result("b", suite="s2"))


def test_the_pareto_front_keeps_points_no_other_beats_in_both_speed_and_quality():
    points = [(1.0, 30.0), (2.0, 35.0), (2.5, 33.0), (0.5, 20.0), (1.0, 30.0)]
    assert pareto_front(points) == [True, True, False, True, True]  # equal points do not dominate each other
    assert pareto_front([(1.0, 0.5), (2.0, 0.3)], quality_higher_is_better=False) == [True, True]


@pytest.mark.parametrize("ratings", [
    {"m-fast": 1050.0},
    {"ratings": [{"contender": "m-fast", "rating": 1050.0, "lower": 1020.0, "upper": 1080.0, "rank": 1}]},
    [{"model": "m-fast", "rating": 1050.0, "low": 1020.0, "high": 1080.0}],
])
def test_ratings_join_rows_by_configuration_name(tmp_path: Path, ratings):
    file = tmp_path / "ratings.json"
    file.write_text(json.dumps(ratings))
    rows = leaderboard_rows([{**result("m-fast"), "file": "a.json"}, {**result("m-slow"), "file": "b.json"}],
                            load_ratings(file))
    by_name = {row["name"]: row for row in rows}
    assert by_name["m-fast"]["arena"]["rating"] == 1050.0
    assert by_name["m-slow"]["arena"] is None


def test_unreadable_ratings_and_empty_results_folders_are_errors_that_name_the_file(tmp_path: Path):
    (tmp_path / "ratings.json").write_text('{"ratings": []}')
    with pytest.raises(LeaderboardError, match="holds no ratings"):
        load_ratings(tmp_path / "ratings.json")
    with pytest.raises(LeaderboardError, match="no results in"):
        load_results(tmp_path)


def test_the_leaderboard_renders_markdown_html_json_and_a_pareto_plot(tmp_path: Path):
    results = tmp_path / "results"
    results.mkdir()
    for record in (result("m-1step", clip=20.0, seconds=0.1), result("m-4step", clip=30.0, seconds=0.4),
                   result("m-8step", clip=29.0, seconds=0.8)):
        (results / f"{record['name']}.json").write_text(json.dumps(record))
    (results / "notes.json").write_text("{}")  # not a results file: skipped
    paths = write_leaderboard(results, tmp_path / "board")
    assert [p.name for p in paths] == ["leaderboard.md", "leaderboard.html", "leaderboard.json", "pareto.png"]
    rows = json.loads(paths[2].read_text())["rows"]
    assert [row["name"] for row in rows] == ["m-4step", "m-8step", "m-1step"]
    assert [row["pareto"] for row in rows] == [True, False, True]
    markdown = paths[0].read_text()
    assert "| 1 | m-4step |" in markdown and "30.00 [27.00, 33.00]" in markdown and "![Pareto plot](pareto.png)" in markdown
    assert "<td>m-8step</td>" in paths[1].read_text()
    with Image.open(paths[3]) as plot:
        assert plot.format == "PNG" and plot.width > 400
