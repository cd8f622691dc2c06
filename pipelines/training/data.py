"""Training data: procedural scenes rendered once into a cached array, or a user's folder of images.

A folder dataset is `images/*.png|jpg` plus `captions.jsonl` with lines `{"file": "images/x.png", "caption": "..."}`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipelines.errors import PipelineError
from pipelines.training.scenes import SCENE_VERSION, make_dataset, scene_paraphrases

_LINE_FORMAT = '{"file": "images/x.png", "caption": "..."}'

PARAPHRASES_PER_SCENE = 2
"""Training paraphrases kept per procedural scene (a user's folder dataset has its captions only)."""

PARAPHRASE_RATE = 0.5
"""Default share of training captions that are one of the scene's paraphrases (teacher and student alike)."""


@dataclass
class CaptionedImages:
    """Images as uint8 (n, h, w, 3) with one caption each, and other captions of each image to train on (procedural
    scenes: `scenes.paraphrase`; empty for a folder dataset)."""

    images: np.ndarray
    captions: list[str]
    paraphrases: list[list[str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.captions)

    def batch(self, index: np.ndarray) -> tuple[torch.Tensor, list[str]]:
        """Pixels scaled to [-1, 1] as (b, 3, h, w), and their captions."""
        pixels = torch.from_numpy(self.images[index]).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        return pixels, [self.captions[i] for i in index]


def procedural_dataset(n: int, seed: int, size: int, cache_dir: Path | None = None) -> CaptionedImages:
    """`n` procedural scenes, rendered once and cached under `cache_dir` (same seed, same data)."""
    if cache_dir is not None:
        stem = cache_dir / f"scenes-v{SCENE_VERSION}-n{n}-s{seed}-{size}px"
        if stem.with_suffix(".npy").exists() and stem.with_suffix(".jsonl").exists():
            scenes = [json.loads(line) for line in stem.with_suffix(".jsonl").open()]
            return _with_paraphrases(np.load(stem.with_suffix(".npy"), mmap_mode="r"), scenes)
    images, rendered = make_dataset(n, seed=seed, size=size)
    scenes = [scene.to_json() for scene in rendered]
    if cache_dir is not None:
        cache_dir.mkdir(parents=True, exist_ok=True)
        np.save(stem.with_suffix(".npy"), images)
        with stem.with_suffix(".jsonl").open("w") as f:
            for scene in scenes:
                f.write(json.dumps(scene) + "\n")
    return _with_paraphrases(images, scenes)


def _with_paraphrases(images: np.ndarray, scenes: list[dict]) -> CaptionedImages:
    return CaptionedImages(images, [scene["caption"] for scene in scenes],
                           [scene_paraphrases(scene, PARAPHRASES_PER_SCENE) for scene in scenes])


def folder_dataset(root: Path, size: int) -> CaptionedImages:
    """A user's folder: `captions.jsonl` naming image files relative to `root`, resized to `size`."""
    index = root / "captions.jsonl"
    if not index.is_file():
        raise PipelineError(f"{index} not found: a folder dataset needs captions.jsonl with lines {_LINE_FORMAT}")
    records = []
    for number, line in enumerate(index.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            records.append((number, root / record["file"], str(record["caption"])))
        except (ValueError, TypeError, KeyError) as exc:
            raise PipelineError(f"{index}:{number}: expected a line {_LINE_FORMAT}") from exc
    if not records:
        raise PipelineError(f"{index} lists no images: expected lines {_LINE_FORMAT}")
    images = np.empty((len(records), size, size, 3), dtype=np.uint8)
    for i, (number, path, _) in enumerate(records):
        try:
            with Image.open(path) as image:
                images[i] = np.asarray(image.convert("RGB").resize((size, size), Image.BICUBIC))
        except FileNotFoundError as exc:
            raise PipelineError(f"{path} not found (named on line {number} of {index})") from exc
        except OSError as exc:
            raise PipelineError(f"{path} (line {number} of {index}) is not a readable image: {exc}") from exc
    return CaptionedImages(images, [caption for _, _, caption in records])


def load_dataset(source: str, n: int, seed: int, size: int, cache_dir: Path | None) -> CaptionedImages:
    """`source` is "procedural" or the path of a folder dataset."""
    if source == "procedural":
        return procedural_dataset(n, seed, size, cache_dir)
    return folder_dataset(Path(source), size)
