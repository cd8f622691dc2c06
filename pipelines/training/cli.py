"""`image-gen train vae|unet|distill|clip|export`: the training commands and their defaults (which run on a CPU).

Bad input (a missing earlier stage, an unusable dataset, a non-positive number) prints one line and exits with 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

from pipelines.errors import PipelineError
from pipelines.training.common import RunConfig
from pipelines.training.data import PARAPHRASE_RATE

DEFAULTS = {
    "vae": {"steps": 3000, "batch_size": 16, "lr": 4e-4},
    "unet": {"steps": 40_000, "batch_size": 48, "lr": 3e-4},
    "distill": {"steps": 4000, "batch_size": 32, "lr": 1e-4},
    "clip": {"steps": 600, "batch_size": 128, "lr": 2e-3, "dataset_size": 16_000},
}

# What each stage reads from the run folder, and the command that writes it.
NEEDS = {
    "unet": (("vae/final", "vae"),),
    "distill": (("vae/final", "vae"), ("unet/final/unet-ema", "unet")),
    "export": (("vae/final", "vae"), ("unet/final/unet-ema", "unet")),
}


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line, as every error of the `image-gen` command is."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def _positive(kind: type[int] | type[float]) -> Callable[[str], int | float]:
    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a positive {kind.__name__}, got {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value

    return parse


def _rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number from 0 to 1, got {text!r}") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be from 0 to 1, got {text}")
    return value


def _check_inputs(stage: str, run_dir: Path, teacher: str = "final", init_from: Path | None = None) -> None:
    if init_from is not None and not (init_from / "config.json").is_file():
        raise PipelineError(f"--init-from {init_from}: no config.json there: give a diffusers UNet folder such as "
                            "runs/inhouse/unet/final/unet-ema or pipelines/models/inhouse-shapes/unet")
    for folder, command in NEEDS.get(stage, ()):
        folder = folder.replace("unet/final/", f"unet/{teacher}/")
        if not (run_dir / folder / "config.json").is_file():
            raise PipelineError(f"{run_dir / folder} not found: run `image-gen train {command} --run-dir {run_dir}` "
                                "first")


def _parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="image-gen train", description=__doc__)
    sub = parser.add_subparsers(dest="stage", required=True)
    for stage in DEFAULTS:
        p = sub.add_parser(stage, help=f"train the {stage} stage")
        p.add_argument("--run-dir", type=Path, default=Path("runs/inhouse"), help="checkpoints, logs and outputs")
        p.add_argument("--steps", type=_positive(int), default=DEFAULTS[stage]["steps"])
        p.add_argument("--batch-size", type=_positive(int), default=DEFAULTS[stage]["batch_size"])
        p.add_argument("--lr", type=_positive(float), default=DEFAULTS[stage]["lr"])
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--time-budget", type=_positive(float), default=None, metavar="MINUTES",
                       help="stop (with a checkpoint) after this many minutes; rerun to resume")
        p.add_argument("--stop-at", type=_positive(int), default=None, metavar="STEP",
                       help="stop (with a checkpoint) at this step while the learning-rate schedule still runs to "
                       "--steps; rerun with another --steps or --stop-at to go on")
        p.add_argument("--checkpoint-every", type=_positive(int), default=250)
        p.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), default="no")
        p.add_argument("--data", default="procedural", help='"procedural" or a folder with captions.jsonl')
        p.add_argument("--dataset-size", type=_positive(int), default=DEFAULTS[stage].get("dataset_size", 40_000))
        p.add_argument("--image-size", type=_positive(int), default=128)
        if stage == "unet":
            p.add_argument("--unet-config", type=Path, metavar="FILE",
                           help="JSON of UNet fields to change, e.g. a larger one for a GPU: "
                           '{"block_out_channels": [128, 256, 384], "layers_per_block": 2}')
            p.add_argument("--init-from", type=Path, metavar="DIR",
                           help="start from these UNet weights (a diffusers folder such as runs/X/unet/final/unet-ema "
                           "or a model's unet/) instead of random ones: fine-tune with another recipe")
            p.add_argument("--snapshot-every", type=_positive(int), default=RunConfig.snapshot_every,
                           metavar="STEPS", help="keep the raw and EMA weights every this many steps as unet/step-N "
                           "(default %(default)s)")
        if stage == "distill":
            p.add_argument("--teacher", default="final", metavar="TAG",
                           help="the teacher's snapshot under <run-dir>/unet/: final (default) or step-N")
            p.add_argument("--paraphrase-rate", type=_rate, default=PARAPHRASE_RATE, metavar="RATE",
                           help="share of prompts that are paraphrases of the scenes' captions, from 0 to 1 "
                           "(default %(default)s; 0 for the shipped student's recipe)")
        if stage == "clip":
            p.add_argument("--out", type=Path, default=None,
                           help="also save the trained model here (the bundled one: eval/models/inhouse-clip)")
    export = sub.add_parser("export", help="write the teacher and student as diffusers folders")
    export.add_argument("--run-dir", type=Path, default=Path("runs/inhouse"))
    export.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "models")
    export.add_argument("--teacher", default="final", metavar="TAG",
                        help="the teacher's snapshot under <run-dir>/unet/: final (default) or step-N, e.g. to "
                        "evaluate a run's progress (image-gen eval --models-dir OUT)")
    report = sub.add_parser("report", help="loss plots and a summary of a run, for the model card")
    report.add_argument("--run-dir", type=Path, default=Path("runs/inhouse"))
    report.add_argument("--out", type=Path, default=Path("docs/model-card"))
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if getattr(args, "stop_at", None) is not None and args.stop_at > args.steps:
        parser.error(f"argument --stop-at: {args.stop_at} is past --steps {args.steps}, where every run ends")
    try:
        _check_inputs(args.stage, args.run_dir, getattr(args, "teacher", "final"), getattr(args, "init_from", None))
        return _run(args)
    except PipelineError as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    if args.stage == "report":
        from pipelines.training.report import write_report

        try:
            written = write_report(args.run_dir, args.out)
        except FileNotFoundError as error:
            raise PipelineError(str(error)) from None
        for path in written:
            print(path)
        return 0
    if args.stage == "export":
        from pipelines.training.export import export_models

        for path in export_models(args.run_dir, args.out, teacher_tag=args.teacher):
            print(path)
        return 0
    config = RunConfig(
        run_dir=args.run_dir, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
        time_budget_s=None if args.time_budget is None else args.time_budget * 60, stop_at=args.stop_at,
        checkpoint_every=args.checkpoint_every, mixed_precision=args.mixed_precision, data=args.data,
        dataset_size=args.dataset_size, image_size=args.image_size,
        snapshot_every=getattr(args, "snapshot_every", RunConfig.snapshot_every),
    )
    if args.stage == "vae":
        from pipelines.training.vae import VaeConfig, train_vae

        train_vae(config, VaeConfig())
    elif args.stage == "unet":
        from pipelines.training.unet import UnetConfig, load_unet_config, train_unet

        unet_config = load_unet_config(args.unet_config) if args.unet_config else UnetConfig()
        train_unet(config, unet_config, init_from=args.init_from)
    elif args.stage == "clip":
        from pipelines.training.clip import train_clip

        train_clip(config, out=args.out)
    else:
        from pipelines.training.distill import DistillConfig, distill

        distill(config, DistillConfig(teacher=args.teacher, paraphrase_rate=args.paraphrase_rate))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
