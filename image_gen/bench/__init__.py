"""`image-gen bench NAME`: side-by-side benchmarks that write Markdown and JSON to docs/benchmarks/."""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path

BENCHMARKS = {
    "api": "image_gen.bench.api",
    "attention": "image_gen.bench.attention",
    "distill": "image_gen.bench.distill",
    "limit": "image_gen.bench.limit",
    "pipeline": "image_gen.bench.pipeline",
    "queue": "image_gen.bench.queue",
    "serving": "image_gen.bench.serving",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="image-gen bench", description=__doc__)
    parser.add_argument("name", choices=sorted(BENCHMARKS), help="which benchmark to run")
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks"), help="where the report goes")
    args, rest = parser.parse_known_args(argv)
    module = importlib.import_module(BENCHMARKS[args.name])
    return module.main(rest, args.out)
