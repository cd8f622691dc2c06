"""`image-gen eval` and `image-gen leaderboard` as a user runs them: a results file from a real model, the gate's
exit codes (0 passed, 1 regression), the leaderboard files, and one line with exit code 2 for bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from eval.suites import SuitePrompt, format_suite, load_suite
from image_gen.cli import main

BUNDLED_STUDENT = Path(__file__).resolve().parents[2] / "pipelines" / "models" / "inhouse-shapes-lcm"


@pytest.fixture(autouse=True)
def _hash_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(scope="module")
def suite_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every category in both phrasings: 16 prompts of the built-in suite."""
    prompts: list[SuitePrompt] = load_suite()[::20]
    path = tmp_path_factory.mktemp("suite") / "small.jsonl"
    path.write_text(format_suite(prompts))
    return path


def run(*argv: object) -> int:
    return main([str(arg) for arg in argv])


def test_eval_writes_a_results_file_and_a_rerun_of_the_baseline_passes_the_gate(
    tiny_models_dir: Path, suite_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture
):
    common = ("eval", "--models-dir", tiny_models_dir, "--device", "cpu", "--model", "tiny-lcm", "--steps", 2,
              "--suite", suite_file, "--limit", 8)
    assert run(*common, "--out", tmp_path / "base", "--samples", tmp_path / "samples", "--samples-per-category", 2) == 0
    baseline = tmp_path / "base" / "tiny-lcm-lcm-2steps-g8-32x32.json"
    result = json.loads(baseline.read_text())
    # sample sheets: a strip of at most 2 images (32 px, 4 px apart) per category, each named in samples.md
    strips = sorted((tmp_path / "samples").glob("*.png"))
    categories = {row["category"] for row in result["prompts"]}
    assert {strip.stem for strip in strips} == categories
    sheet = (tmp_path / "samples" / "samples.md").read_text()
    for strip in strips:
        shown = [row for row in result["prompts"] if row["category"] == strip.stem][:2]
        with Image.open(strip) as image:
            assert image.size == (32 * len(shown) + 4 * (len(shown) - 1), 32)
        for row in shown:
            verdict = "n/a" if row["passed"][0] is None else "pass" if row["passed"][0] else "fail"
            assert f"| {row['prompt']} | {verdict} |" in sheet
    assert result["config"]["content_hash"] and len(result["config"]["content_hash"]) == 10
    assert result["config"]["steps"] == 2 and result["config"]["prompts"] == 8
    assert result["config"]["optimizations"]["autocast"] == "off"  # the settings that drew the images
    assert len(result["prompts"]) == 8 and all(len(row["clip_score"]) == 2 for row in result["prompts"])
    summary = result["summary"]
    for metric in ("clip_score", "r_precision", "compositional", "diversity", "frechet_distance"):
        assert summary[metric]["low"] <= summary[metric]["mean"] <= summary[metric]["high"], metric
    assert summary["seconds_per_image"] > 0 and summary["peak_memory_mb"] > 0

    capsys.readouterr()
    assert run(*common, "--out", tmp_path / "rerun", "--name", "tiny-lcm@2", "--baseline", baseline,
               "--tolerance", 0) == 0
    assert "gate passed" in capsys.readouterr().out
    assert json.loads((tmp_path / "rerun" / "tiny-lcm@2.json").read_text())["name"] == "tiny-lcm@2"

    ratings = tmp_path / "ratings.json"  # as `image-gen arena ratings --json` writes it
    ratings.write_text(json.dumps({"leaderboard": [
        {"contender": "tiny-lcm@2", "rating": 1012.4, "lower": 990.2, "upper": 1031.0, "rank": 1, "battles": 40}]}))
    assert run("leaderboard", "--results", tmp_path / "rerun", "--ratings", ratings) == 0
    assert {"leaderboard.md", "leaderboard.html", "leaderboard.json", "pareto.png"} <= {
        p.name for p in (tmp_path / "rerun").iterdir()}
    assert "| arena |" in (tmp_path / "rerun" / "leaderboard.md").read_text()
    assert "1012 [990, 1031]" in (tmp_path / "rerun" / "leaderboard.html").read_text()
    (row,) = json.loads((tmp_path / "rerun" / "leaderboard.json").read_text())["rows"]
    assert row["name"] == "tiny-lcm@2" and row["arena"]["rating"] == 1012.4

    worse = json.loads(baseline.read_text())
    worse["summary"]["clip_score"]["mean"] *= 0.8
    (tmp_path / "worse.json").write_text(json.dumps(worse))
    capsys.readouterr()
    assert run("leaderboard", "--results", tmp_path / "base", "--baseline", baseline,
               "--candidate", tmp_path / "worse.json") == 1
    report = capsys.readouterr().err
    assert report.startswith("image-gen: regression: ") and "clip_score:" in report


@pytest.mark.skipif(not BUNDLED_STUDENT.is_dir(), reason="the distilled in-house model is not bundled yet")
def test_the_gate_fails_on_the_distilled_model_at_1_step_against_its_4_step_baseline(tmp_path: Path):
    common = ("eval", "--device", "cpu", "--model", "inhouse-shapes-lcm", "--limit", 32, "--out", tmp_path)
    assert run(*common, "--steps", 4) == 0
    baseline = tmp_path / next(p.name for p in tmp_path.glob("*4steps*.json"))
    assert run(*common, "--steps", 1, "--baseline", baseline) == 1
    assert run(*common, "--steps", 4, "--baseline", baseline) == 0


# --- bad input: one line, exit code 2 -----------------------------------------------------------------------------


@pytest.mark.parametrize(("argv", "message"), [
    (("--size", "big"), "--size must be WIDTHxHEIGHT"),
    (("--limit", 0), "--limit must be at least 1"),
    (("--images-per-prompt", 0), "--images-per-prompt must be at least 1"),
    (("--guidance", -1), "--guidance must be a number >= 0"),
    (("--tolerance", 0.1), "--tolerance and --gate-metrics need --baseline"),
    (("--baseline", "missing.json"), "--baseline missing.json: no such file"),
    (("--suite", "missing.jsonl"), "cannot read suite"),
    (("--model", "no-such-model"), "model 'no-such-model' not found"),
    (("--steps", 0), "--steps must be at least 1"),
    (("--steps", "many"), "invalid int value"),
    (("--scorer", "no-such-folder"), "does not exist"),
    (("--name", "../up"), "--name must be 1 to 64 letters"),
    (("--samples-per-category", 0), "--samples-per-category must be at least 1"),
    (("--samples", "a-file.txt"), "--samples a-file.txt is a file: give a folder"),
])
def test_eval_rejects_bad_input_with_one_line_and_exit_code_2(
    argv, message, tiny_models_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a-file.txt").write_text("not a folder")
    assert run("eval", "--models-dir", tiny_models_dir, "--device", "cpu", "--model", "tiny-lcm", *argv) == 2
    error = capsys.readouterr().err
    assert error.startswith("image-gen: error: ") and error.count("\n") == 1, error
    assert message in error


def test_eval_rejects_a_bad_suite_line_and_an_unusable_baseline(
    tiny_models_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
):
    bad_suite = tmp_path / "bad.jsonl"
    bad_suite.write_text('{"id": "x", "prompt": "a red circle"}\n')
    assert run("eval", "--models-dir", tiny_models_dir, "--suite", bad_suite) == 2
    assert "line 1: field 'category': missing" in capsys.readouterr().err
    not_results = tmp_path / "other.json"
    not_results.write_text("{}")
    assert run("eval", "--models-dir", tiny_models_dir, "--baseline", not_results) == 2
    assert "not a results file" in capsys.readouterr().err


@pytest.mark.parametrize(("argv", "message"), [
    (("--results", "nowhere"), "results folder nowhere does not exist"),
    (("--results", "."), "no results in ."),
    (("--ratings", "missing.json"), "--ratings missing.json: no such file"),
    (("--candidate", "x.json"), "--candidate needs --baseline"),
    (("--baseline", "x.json", "--tolerance", -0.5), "--tolerance must be from 0"),
    (("--baseline", "x.json", "--gate-metrics", "beauty"), "unknown metric 'beauty'"),
])
def test_leaderboard_rejects_bad_input_with_one_line_and_exit_code_2(
    argv, message, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    assert run("leaderboard", *argv) == 2
    error = capsys.readouterr().err
    assert error.startswith("image-gen: error: ") and error.count("\n") == 1, error
    assert message in error
