"""What a training run did, for the model card: loss curves as PNG plots and a JSON summary of each stage.

`image-gen train report --run-dir R --out DIR` reads each stage's `log.jsonl` (a resumed run logs the steps after
its last checkpoint twice; the later record of a step wins) and writes `loss-<stage>.png` and
`training-summary.json` into DIR. Run logs stay out of the repository; these summaries go in.
"""

from __future__ import annotations

import json
from pathlib import Path

STAGES = ("vae", "unet", "distill")
LOSS_KEYS = {"vae": ("loss", "l1"), "unet": ("loss", "mse"), "distill": ("loss",)}


def read_log(path: Path) -> list[dict]:
    """The records of a stage's log, one per step (the last written), in step order."""
    by_step: dict[int, dict] = {}
    with path.open() as f:
        for line in f:
            if line.strip():
                record = json.loads(line)
                by_step[record["step"]] = record
    return [by_step[step] for step in sorted(by_step)]


def smooth(values: list[float], weight: float = 0.9) -> list[float]:
    """Exponential moving average with bias correction (as TensorBoard's smoothing shows a noisy loss)."""
    out, average = [], 0.0
    for i, value in enumerate(values, start=1):
        average = weight * average + (1 - weight) * value
        out.append(average / (1 - weight**i))
    return out


def stage_summary(run_dir: Path, stage: str) -> dict | None:
    log = run_dir / stage / "log.jsonl"
    if not log.exists():
        return None
    records = read_log(log)
    progress = run_dir / stage / "checkpoint" / "progress.json"
    done = json.loads(progress.read_text()) if progress.exists() else {"step": records[-1]["step"] + 1}
    config_file = run_dir / stage / "config.json"
    tail = records[-max(1, len(records) // 20):]  # the last 5% of logged steps
    return {
        "steps": done["step"],
        "hours": round(done.get("seconds", records[-1]["seconds"]) / 3600, 2),
        "final": {key: round(sum(r[key] for r in tail) / len(tail), 5) for key in LOSS_KEYS[stage] if key in tail[0]},
        "config": json.loads(config_file.read_text()) if config_file.exists() else None,
    }


def plot_stage(run_dir: Path, stage: str, out: Path) -> Path | None:
    """`loss-<stage>.png`: each logged loss (faint) and its smoothed curve against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    log = run_dir / stage / "log.jsonl"
    if not log.exists():
        return None
    records = read_log(log)
    steps = [r["step"] for r in records]
    figure, axis = plt.subplots(figsize=(6.4, 3.6), dpi=100)
    for key, color in zip(LOSS_KEYS[stage], ("tab:blue", "tab:orange"), strict=False):
        if key not in records[0]:
            continue
        values = [r[key] for r in records]
        axis.plot(steps, values, color=color, alpha=0.25, linewidth=0.8)
        axis.plot(steps, smooth(values), color=color, label=key)
    axis.set_yscale("log")
    axis.set_xlabel("step")
    axis.set_ylabel("loss (log scale)")
    summary = stage_summary(run_dir, stage) or {}
    axis.set_title(f"{stage}: {summary.get('steps')} steps, {summary.get('hours')} h wall-clock")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    path = out / f"loss-{stage}.png"
    figure.savefig(path)
    plt.close(figure)
    return path


def write_report(run_dir: Path, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = [path for stage in STAGES if (path := plot_stage(run_dir, stage, out)) is not None]
    summary = {stage: found for stage in STAGES if (found := stage_summary(run_dir, stage)) is not None}
    if not summary:
        raise FileNotFoundError(f"no training logs under {run_dir} (expected {', '.join(STAGES)}/log.jsonl)")
    path = out / "training-summary.json"
    path.write_text(json.dumps(summary, indent=2) + "\n")
    return [*written, path]
