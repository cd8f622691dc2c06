"""What every training loop shares: the run folder, accelerate, resumable checkpoints, budgets and logs."""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm


@dataclass
class RunConfig:
    """Options common to every `image-gen train` command."""

    run_dir: Path
    steps: int
    batch_size: int
    lr: float
    seed: int = 0
    time_budget_s: float | None = None
    stop_at: int | None = None
    """Stop (with a checkpoint) once this step is reached while the learning rate still follows `steps`: a run
    resumed in several legs with different totals is retraced exactly with one command per leg."""
    checkpoint_every: int = 250
    snapshot_every: int = 2000
    """The teacher's raw and EMA weights are kept every this many steps (unet/step-N), to measure its progress."""
    log_every: int = 25
    mixed_precision: str = "no"
    data: str = "procedural"
    dataset_size: int = 40_000
    image_size: int = 128


class TrainingRun:
    """Owns the accelerator, the step counter, checkpoints and the JSONL log of one run."""

    def __init__(self, config: RunConfig, name: str):
        self.config = config
        self.name = name
        self.dir = config.run_dir / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.accelerator = Accelerator(mixed_precision=config.mixed_precision, cpu=not torch.cuda.is_available())
        self.device = self.accelerator.device
        if self.device.type == "cuda":
            # fp32 matrix products and convolutions on TF32 tensor cores (Ampere and newer), as diffusers' training
            # scripts do with --allow_tf32: several times faster, and well inside the noise of diffusion training.
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.step = 0
        self.started = time.monotonic()
        self.seconds_before = 0.0
        set_seed(config.seed)

    @property
    def checkpoint_dir(self) -> Path:
        return self.dir / "checkpoint"

    def resume(self) -> None:
        """Restore models, optimiser, EMA and RNG state from the last checkpoint, if there is one."""
        state = self.checkpoint_dir / "progress.json"
        if not state.exists():
            return
        self.accelerator.load_state(str(self.checkpoint_dir))
        progress = json.loads(state.read_text())
        self.step, self.seconds_before = progress["step"], progress["seconds"]
        self.accelerator.print(f"resumed {self.name} at step {self.step} ({self.seconds_before / 60:.1f} min trained)")

    def save(self) -> None:
        """Write a checkpoint atomically enough: state first, then the progress file that marks it valid."""
        self.accelerator.wait_for_everyone()
        if not self.accelerator.is_main_process:
            return
        progress = self.checkpoint_dir / "progress.json"
        progress.unlink(missing_ok=True)
        self.accelerator.save_state(str(self.checkpoint_dir))
        progress.write_text(json.dumps({"step": self.step, "seconds": self.seconds}))

    @property
    def seconds(self) -> float:
        return self.seconds_before + time.monotonic() - self.started

    def out_of_budget(self) -> bool:
        budget = self.config.time_budget_s
        return budget is not None and time.monotonic() - self.started > budget

    def log(self, record: dict) -> None:
        if self.accelerator.is_main_process:
            record = {"step": self.step, "seconds": round(self.seconds, 1), **record}
            with (self.dir / "log.jsonl").open("a") as f:
                f.write(json.dumps(record) + "\n")

    def write_config(self, extra: dict) -> None:
        data = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self.config).items()}
        (self.dir / "config.json").write_text(json.dumps({**data, **extra}, indent=2))

    def progress_bar(self) -> tqdm:
        return tqdm(total=self.config.steps, initial=self.step, desc=self.name, dynamic_ncols=True,
                    disable=not self.accelerator.is_local_main_process, mininterval=5)

    def loop(self):
        """Yield step numbers until `steps`, `stop_at` or the time budget is reached; checkpoint on the way and at
        the end."""
        end = min(self.config.steps, self.config.stop_at or self.config.steps)
        bar = self.progress_bar()
        try:
            while self.step < end and not self.out_of_budget():
                yield self.step
                self.step += 1
                bar.update(1)
                if self.step % self.config.checkpoint_every == 0:
                    self.save()
        finally:
            bar.close()
            self.save()


def cosine_lr(step: int, total: int, warmup: int, base: float) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
