"""`image-gen bench pipeline|limit|attention|serving|distill|api` on the tiny models: each writes its Markdown and JSON
report with the numbers it promises; the stand-in models have the architectures they are named after."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from image_gen.bench import api, attention, distill, limit, pipeline, serving
from image_gen.bench.measure import PeakMemory, Stopwatch, peak_rss_bytes, reset_peak_rss
from image_gen.bench.models import INHOUSE_ARCH, _char_clip_tokenizer, ensure_bench_model
from image_gen.bench.report import machine


@pytest.fixture(autouse=True)
def tiny_models_on_one_thread(
    tiny_models_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("IMAGE_GEN_MODELS_DIR", str(tiny_models_dir))
    monkeypatch.setenv("IMAGE_GEN_BENCH_MODELS", str(tmp_path / "bench-models"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def report(out: Path, name: str) -> dict:
    assert (out / f"{name}.md").read_text().startswith("# ")
    return json.loads((out / f"{name}.json").read_text())


def test_machine_description_records_the_load_and_cpu_features() -> None:
    info = machine()
    assert len(info["load_average"]) == 3 and "cpu_features" in info


def test_peak_memory_sees_a_transient_allocation() -> None:
    with PeakMemory("cpu") as peak:
        block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
        del block
    if reset_peak_rss():  # Linux: the window starts at the reset
        assert peak.result()["rss_added"] >= 48 * 2**20
    assert peak_rss_bytes() > 0
    elapsed = Stopwatch("cpu").stop(Stopwatch("cpu").start())
    assert elapsed.wall >= 0 and elapsed.cpu >= 0


def test_pipeline_benchmark_compares_variants_with_stock(tmp_path: Path) -> None:
    argv = ["--model", "tiny-sd", "--sizes", "32", "--steps", "2", "--batch", "2", "--repeats", "1",
            "--variants", "default,channels_last+fuse_qkv,bf16"]
    assert pipeline.main(argv, tmp_path) == 0
    data = report(tmp_path, "pipeline")
    rows = data["results"][0]["contenders"]
    assert [r["name"] for r in rows] == ["stock diffusers", "ours default", "ours channels_last+fuse_qkv",
                                         "ours bf16"]
    assert rows[1]["parity_255"]["max"] <= 2 and rows[2]["parity_255"]["max"] <= 2
    assert rows[3]["options"]["autocast"] == "bfloat16"
    assert all(r["speedup_cpu"]["median"] > 0 and r["images_per_s_wall"] > 0 for r in rows)
    assert "load_average" in data["machine"]


def test_unknown_variant_names_the_known_ones() -> None:
    with pytest.raises(ValueError, match="channels_last"):
        pipeline.variant_options("channels_first")


@pytest.mark.parametrize("name", ["pipeline", "limit", "attention", "distill", "serving"])
def test_a_device_this_machine_lacks_is_a_one_line_error_and_no_report(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    from image_gen.cli import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["bench", name, "--out", str(tmp_path), "--device", "cuda"]) == 2
    assert "device 'cuda' is not available on this machine" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.md"))


def test_limit_benchmark_reports_a_fraction_of_the_matmul_peak(tmp_path: Path) -> None:
    argv = ["--model", "tiny-sd", "--batch", "2", "--steps", "1", "--repeats", "1", "--variants", "default"]
    assert limit.main(argv, tmp_path) == 0
    data = report(tmp_path, "limit")
    result = data["results"][0]
    assert data["gflop_per_forward"] > 0 and 0 < result["fraction_of_peak"]["median"] < 2
    assert abs(sum(result["time_by_kind"].values()) - 1) < 1e-6


def test_attention_benchmark_measures_each_cell_in_its_own_process(tmp_path: Path) -> None:
    argv = ["--model", "tiny-sd", "--sizes", "32", "--backends", "sdpa,math", "--memory-cap", "2"]
    assert attention.main(argv, tmp_path) == 0
    cells = report(tmp_path, "attention")["cells"]
    assert [(c["backend"], c["applied"]) for c in cells] == [("sdpa", "sdpa"), ("math", "math")]
    assert all(c["rss_peak"] > 0 and c["cpu_s"] > 0 for c in cells)


def test_attention_cell_over_its_memory_cap_reports_out_of_memory(tiny_sd_model: Path) -> None:
    cell = attention.measure(tiny_sd_model, 64, "math", "cpu", 16 * 2**20, rows=64, threads=1)
    assert cell["error"] == "out of memory"


def test_serving_benchmark_batches_concurrent_requests(tmp_path: Path) -> None:
    argv = ["--model", "tiny-sd", "--concurrency", "2", "--jobs", "1", "--steps", "1"]
    assert serving.main(argv, tmp_path) == 0
    row = report(tmp_path, "serving")["results"][0]
    assert row["failures"] == []
    assert row["runs"]["batched"][0]["jobs"] == row["runs"]["one_at_a_time"][0]["jobs"] == 2


@pytest.mark.slow
def test_api_benchmark_loads_a_served_api_and_reads_its_metrics(tmp_path: Path) -> None:
    assert api.main(["--clients", "6", "--duration", "4", "--keys", "2", "--rate", "30"], tmp_path) in (0, 1)
    data = report(tmp_path, "api")
    assert data["errors"] == 0 and data["jobs_failed"] == 0
    assert data["jobs_succeeded"] >= 1 and data["latency_client"]["poll"]["n"] >= 1
    assert data["passed"] == (data["latency_client"]["poll"]["p99_ms"] < api.P99_TARGET_MS)
    assert 0 < data["poll_server_share_under_50ms"] <= 1  # read back from the server's /metrics


def test_distill_benchmark_times_student_against_teacher(tmp_path: Path) -> None:
    argv = ["--teacher", "tiny-sd", "--student", "tiny-lcm", "--teacher-steps", "3", "--student-steps", "1",
            "--batch", "1", "--repeats", "1", "--no-quality"]
    assert distill.main(argv, tmp_path) == 0
    data = report(tmp_path, "distill")
    assert data["student"]["steps"] == 1 and data["student"]["quality"] is None
    assert data["speedup_cpu"]["median"] > 0


def test_inhouse_stand_in_has_the_bundled_teacher_architecture(tmp_path: Path) -> None:
    from pipelines.params import read_json
    from pipelines.registry import BUNDLED_MODELS_DIR
    from pipelines.training.text import MAX_TOKENS

    folder = ensure_bench_model(INHOUSE_ARCH, tmp_path)
    for component in ("unet", "vae"):
        bundled = read_json(BUNDLED_MODELS_DIR / "inhouse-shapes" / component / "config.json")
        built = read_json(folder / component / "config.json")
        assert {key: built[key] for key in bundled if not key.startswith("_")} == {
            key: value for key, value in bundled.items() if not key.startswith("_")}
    assert read_json(folder / "scheduler" / "scheduler_config.json")["prediction_type"] == "v_prediction"
    assert read_json(folder / "tokenizer" / "tokenizer_config.json")["model_max_length"] == MAX_TOKENS
    assert "random weights" in read_json(folder / "image-gen.json")["label"]
    built_at = (folder / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns
    assert ensure_bench_model(INHOUSE_ARCH, tmp_path) == folder  # cached
    assert (folder / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns == built_at

    # A stand-in cached for another architecture (an older bundled model) is rebuilt.
    config = read_json(folder / "unet" / "config.json")
    (folder / "unet" / "config.json").write_text(json.dumps({**config, "layers_per_block": 3}))
    assert ensure_bench_model(INHOUSE_ARCH, tmp_path) == folder
    assert read_json(folder / "unet" / "config.json")["layers_per_block"] == config["layers_per_block"]


def test_sd15_stand_in_tokenizer_pads_to_77_tokens() -> None:
    ids = _char_clip_tokenizer(77)(["a red cat"], padding="max_length", max_length=77).input_ids[0]
    assert len(ids) == 77 and ids[0] == 49406


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device: checks the --device cuda path")
def test_pipeline_benchmark_runs_on_cuda(tmp_path: Path) -> None:
    argv = ["--model", "tiny-sd", "--sizes", "32", "--steps", "2", "--batch", "2", "--repeats", "1",
            "--device", "cuda", "--threads", "0", "--variants", "default,fp16"]
    assert pipeline.main(argv, tmp_path) == 0
    data = report(tmp_path, "pipeline")
    assert data["device"].startswith("cuda") and data["dtype"] == "float16" and "gpu" in data["machine"]
    assert all("cuda_peak" in r["memory"] for r in data["results"][0]["contenders"])
