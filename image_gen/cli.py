"""The `image-gen` command: generate images, list models, read PNG metadata, set up, and start the services.

User errors print one line `image-gen: error: ...` and exit with code 2; torch loads only when a command needs it.
"""

from __future__ import annotations

import argparse
import importlib
import json
import re
import sys
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from image_gen import __version__
from image_gen.errors import ImageGenError
from image_gen.settings import Settings, load_settings

if TYPE_CHECKING:
    from tqdm import tqdm

    from pipelines.params import ModelInfo
    from pipelines.registry import ModelRegistry
    from pipelines.text2image import StepEvent

PROG = "image-gen"
DEFAULT_OUTPUT_DIR = Path("outputs")
OTHER_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".avif"}

# Commands that parse their own arguments: `image-gen train ...` runs `pipelines.training.cli:main(args)`.
PASSTHROUGH_COMMANDS = {
    "train": ("pipelines.training.cli", "main", "train or distil the in-house model"),
    "bench": ("image_gen.bench", "main", "benchmark generation speed and memory"),
    "keys": ("image_gen.auth", "main", "create, list and revoke API keys"),
    "arena": ("image_gen.arena.cli", "main", "export the arena's votes and compute its ratings"),
}
SERVICE_COMMANDS = {
    "serve": ("ui.app", "serve"),
    "worker": ("image_gen.worker", "run_worker"),
}


# GenerationParams field -> the `generate` flag that sets it, for error messages.
FLAG_OF_PARAM = {
    "negative_prompt": "--negative",
    "width": "--size width",
    "height": "--size height",
    "steps": "--steps",
    "guidance_scale": "--guidance",
    "seed": "--seed",
    "num_images": "-n",
}


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors become one-line ImageGenErrors instead of a usage dump."""

    def error(self, message: str) -> NoReturn:
        raise ImageGenError(f"{message} (see `{self.prog} --help`)")


def _choices(setting: str) -> tuple[str, ...]:
    return typing.get_args(Settings.model_fields[setting].annotation)


def _add_settings_flags(parser: argparse.ArgumentParser, *, runtime: bool) -> None:
    group = parser.add_argument_group("settings (override IMAGE_GEN_* and the config file)")
    group.add_argument(
        "--config", type=Path, metavar="FILE", help="TOML or JSON settings file (default: $IMAGE_GEN_CONFIG)"
    )
    group.add_argument(
        "--models-dir", type=Path, metavar="DIR", help="folder of model folders (default: ./models)"
    )
    if runtime:
        group.add_argument("--device", choices=_choices("device"), help="where to run (default: auto)")
        group.add_argument("--dtype", choices=_choices("dtype"), help="weights dtype (default: auto)")
        group.add_argument(
            "--attention", choices=_choices("attention"), help="attention backend (default: sdpa)"
        )


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog=PROG, description="Self-hostable text-to-image: CLI, REST API, studio, workers."
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    generate = commands.add_parser("generate", help="generate images from a prompt and save them as PNG")
    generate.add_argument("prompt", help="what to draw")
    generate.add_argument(
        "-n", "--num-images", type=int, default=1, metavar="N", help="images (seeds S, S+1...)"
    )
    generate.add_argument("--model", help="model name (default: the registry's default model)")
    generate.add_argument("--steps", type=int, help="denoising steps, 1..150 (default: the model's)")
    generate.add_argument(
        "--guidance", type=float, help="classifier-free guidance scale >= 0 (default: the model's)"
    )
    generate.add_argument("--seed", type=int, help="random seed (default: random)")
    generate.add_argument("--size", metavar="WxH", help="image size, e.g. 512x512 (default: the model's)")
    generate.add_argument("--scheduler", help="sampler, e.g. ddim, euler, dpmpp_2m (default: the model's)")
    generate.add_argument("--negative", default="", metavar="PROMPT", help="negative prompt")
    generate.add_argument(
        "-o", "--output", type=Path, metavar="FILE|DIR", help="out.png, or a folder (default: ./outputs/)"
    )
    _add_settings_flags(generate, runtime=True)
    generate.set_defaults(handler=cmd_generate)

    models = commands.add_parser("models", help="list the models and the folders that failed to load")
    models.add_argument("--json", action="store_true", help="print JSON")
    _add_settings_flags(models, runtime=False)
    models.set_defaults(handler=cmd_models)

    info = commands.add_parser("info", help="print the generation parameters a PNG carries (any studio's)")
    info.add_argument("image", type=Path, help="a PNG file")
    info.add_argument("--json", action="store_true", help="print JSON")
    info.set_defaults(handler=cmd_info)

    setup = commands.add_parser(
        "setup", help="make sure a model exists (builds the untrained tiny model if none)"
    )
    _add_settings_flags(setup, runtime=False)
    setup.set_defaults(handler=cmd_setup)

    serve = commands.add_parser("serve", help="run the REST API, studio and arena (and in-process workers)")
    serve.add_argument("--host", help="address to listen on (default: 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (default: 7860)")
    serve.add_argument(
        "--store", help="object store: path, file://PATH or s3://BUCKET/PREFIX (default: ./data)"
    )
    serve.add_argument(
        "--workers-in-process", type=int, metavar="N", help="worker processes it supervises (default: 1)"
    )
    serve.add_argument(
        "--insecure",
        action="store_true",
        default=None,
        help="listen on a non-loopback address although no API key exists (anyone who reaches it can use it)",
    )
    _add_settings_flags(serve, runtime=True)
    serve.set_defaults(handler=cmd_service)

    worker = commands.add_parser("worker", help="run a worker that claims jobs from the store's queue")
    worker.add_argument(
        "--store", help="object store: path, file://PATH or s3://BUCKET/PREFIX (default: ./data)"
    )
    worker.add_argument("--max-batch", type=int, metavar="N", help="requests batched together (default: 4)")
    _add_settings_flags(worker, runtime=True)
    worker.set_defaults(handler=cmd_service)

    from eval.cli import add_eval_arguments, add_leaderboard_arguments

    evaluate = commands.add_parser("eval", help="score a model and settings on a prompt suite (results JSON)")
    add_eval_arguments(evaluate)
    _add_settings_flags(evaluate, runtime=True)
    evaluate.set_defaults(handler=cmd_eval)

    leaderboard = commands.add_parser(
        "leaderboard", help="render evaluation results as a leaderboard (Markdown, HTML, JSON, Pareto plot)"
    )
    add_leaderboard_arguments(leaderboard)
    leaderboard.set_defaults(handler=cmd_leaderboard)

    for name, (_, _, help_text) in PASSTHROUGH_COMMANDS.items():
        commands.add_parser(
            name, help=f"{help_text} (`image-gen {name} --help` for its options)", add_help=False
        )
    return parser


def _settings(args: argparse.Namespace) -> Settings:
    """Settings with the flags this command has, flags winning over env and the config file."""
    names = [name for name in Settings.model_fields if name != "config"]
    overrides = {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}
    return load_settings(getattr(args, "config", None), **overrides)


def _model(registry: ModelRegistry, name: str | None, settings: Settings) -> ModelInfo:
    name = name or settings.default_model
    return registry.get(name) if name else registry.default()


def _parse_size(text: str | None) -> tuple[int | None, int | None]:
    if text is None:
        return None, None
    match = re.fullmatch(r"\s*(\d+)\s*[xX×]\s*(\d+)\s*", text)
    if not match:
        raise ImageGenError(f"--size must be WIDTHxHEIGHT, e.g. 512x512; got {text!r}", param="size")
    return int(match.group(1)), int(match.group(2))


def _slug(prompt: str, limit: int = 40) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")
    return slug[:limit].rstrip("-") or "image"


def _output_paths(output: Path | None, seeds: Sequence[int], prompt: str) -> list[Path]:
    """`-o out.png`: out.png, or out-0.png, out-1.png... for several; `-o DIR`: DIR/<seed>-<slug>.png."""
    if output is not None and output.suffix.lower() in OTHER_IMAGE_SUFFIXES:
        raise ImageGenError(
            f"-o {output}: images are written as PNG: use a .png file or a folder", param="output"
        )
    if output is not None and output.suffix.lower() == ".png":
        if len(seeds) == 1:
            return [output]
        return [output.with_name(f"{output.stem}-{index}.png") for index in range(len(seeds))]
    folder = output if output is not None else DEFAULT_OUTPUT_DIR
    return [folder / f"{seed}-{_slug(prompt)}.png" for seed in seeds]


def _progress_callback(bar: tqdm) -> Callable[[StepEvent], None]:
    def on_step(event: StepEvent) -> None:
        bar.total = event.total
        bar.update(1)

    return on_step


def cmd_generate(args: argparse.Namespace) -> int:
    width, height = _parse_size(args.size)
    settings = _settings(args)  # before importing torch: a bad setting fails in a fraction of a second

    from pydantic import ValidationError
    from tqdm import tqdm

    from image_gen.records import png_bytes
    from image_gen.runtime import build_registry
    from pipelines.params import GenerationParams

    registry = build_registry(settings, bootstrap=True)
    model = _model(registry, args.model, settings)
    try:
        params = GenerationParams(
            prompt=args.prompt,
            negative_prompt=args.negative,
            model=model.name,
            width=width,
            height=height,
            steps=args.steps,
            guidance_scale=args.guidance,
            scheduler=args.scheduler,
            seed=args.seed,
            num_images=args.num_images,
        )
    except ValidationError as exc:
        error = exc.errors()[0]
        field = str(error["loc"][0])
        flag = FLAG_OF_PARAM.get(field, field)
        raise ImageGenError(f"{flag} {error['input']}: {error['msg']}", param=field) from exc
    request = model.resolve(params)  # before loading: bad input fails fast, and the seed names the files
    assert request.seed is not None
    seeds = [request.seed + index for index in range(request.num_images)]
    paths = _output_paths(args.output, seeds, request.prompt)

    pipe = registry.load(model.name)
    with tqdm(desc="generating", unit="step", leave=False, disable=None) as bar:
        result = pipe.generate(request, callback=_progress_callback(bar))
    run = {key: value for key, value in result.metadata().items() if key not in ("params", "seeds")}
    for image, seed, path in zip(result.images, seeds, paths, strict=True):
        one = request.model_copy(update={"seed": seed, "num_images": 1})
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(png_bytes(image, one, model, run))
        print(path)
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from image_gen.runtime import build_registry

    registry = build_registry(_settings(args), bootstrap=False)
    models = registry.list()
    broken = registry.errors
    if args.json:
        payload = {
            "models": [model.model_dump(mode="json") for model in models],
            "broken": [{"name": name, "error": error} for name, error in broken.items()],
        }
        print(json.dumps(payload, indent=2))
        return 0
    header = ("NAME", "ARCH", "SIZE", "SCHEDULER", "STEPS", "GUIDANCE", "HASH", "LABEL")
    rows = [
        (
            model.name,
            model.architecture,
            str(model.native_size),
            model.default_scheduler,
            str(model.default_steps),
            f"{model.default_guidance:g}",
            model.content_hash,
            model.label or "",
        )
        for model in models
    ]
    widths = [max(len(row[column]) for row in [header, *rows]) for column in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    if not models:
        print(f"(no models: run `{PROG} setup`, or put diffusers model folders in the models folder)")
    for name, error in broken.items():
        print(f"broken: {name}: {error}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from storage.pnginfo import PARAMETER_KEYS, read_png_info

    try:
        info = read_png_info(args.image)
    except ValueError as exc:
        raise ImageGenError(str(exc), param="image") from exc
    if args.json:
        payload = {
            "source": info.source,
            "parameters": info.parameters,
            "raw_text": info.raw_text,
            "request": info.request,
        }
        print(json.dumps(payload, indent=2, ensure_ascii=False))
        return 0
    print(f"source: {info.source}")
    for key in PARAMETER_KEYS:
        if key in info.parameters:
            print(f"{key.replace('_', ' ')}: {info.parameters[key]}")
    for key, value in info.parameters["extra"].items():
        print(f"{key}: {value}")
    if info.request is not None:
        print(f"image-gen record: {json.dumps(info.request, ensure_ascii=False, sort_keys=True)}")
    return 0


def cmd_setup(args: argparse.Namespace) -> int:
    from image_gen.runtime import build_registry

    settings = _settings(args)
    settings.models_dir.mkdir(parents=True, exist_ok=True)
    registry = build_registry(settings, bootstrap=True)
    names = ", ".join(model.name for model in registry.list())
    print(f"models ready: {names}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from eval.cli import EvalUsageError, run_eval
    from image_gen.runtime import build_registry

    settings = _settings(args)
    try:
        return run_eval(args, build_registry(settings, bootstrap=False))
    except EvalUsageError as exc:
        raise ImageGenError(str(exc)) from exc


def cmd_leaderboard(args: argparse.Namespace) -> int:
    from eval.cli import EvalUsageError, run_leaderboard

    try:
        return run_leaderboard(args)
    except EvalUsageError as exc:
        raise ImageGenError(str(exc)) from exc


def _import_command(module_name: str, function_name: str, command: str) -> Callable[..., Any]:
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            raise ImageGenError(
                f"`{PROG} {command}` is not available in this installation: module {module_name} is missing",
                code="not_available",
            ) from exc
        raise ImageGenError(
            f"`{PROG} {command}` needs the Python package {exc.name!r}: install it, or reinstall image-gen",
            code="not_available",
        ) from exc
    function = getattr(module, function_name, None)
    if function is None:
        raise ImageGenError(
            f"`{PROG} {command}` is not available in this installation: {module_name}.{function_name} is missing",
            code="not_available",
        )
    return typing.cast(Callable[..., Any], function)


def cmd_service(args: argparse.Namespace) -> int:
    module_name, function_name = SERVICE_COMMANDS[args.command]
    function = _import_command(module_name, function_name, args.command)
    return function(_settings(args)) or 0


def _run_passthrough(command: str, argv: list[str]) -> int:
    module_name, function_name, _ = PASSTHROUGH_COMMANDS[command]
    return _import_command(module_name, function_name, command)(argv) or 0


def _run(argv: list[str]) -> int:
    if argv and argv[0] in PASSTHROUGH_COMMANDS:
        return _run_passthrough(argv[0], argv[1:])
    args = build_parser().parse_args(argv)
    return args.handler(args)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `image-gen` console script; returns the exit code."""
    from pipelines.errors import PipelineError

    try:
        return _run(list(sys.argv[1:] if argv is None else argv))
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except (ImageGenError, PipelineError) as exc:
        message = str(exc)
    except FileNotFoundError as exc:
        message = f"no such file: {exc.filename or exc}"
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
