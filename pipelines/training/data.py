"""Training data: procedural scenes rendered once into a cached array, or a user's folder of images.

A folder dataset is `images/*.png|jpg` plus `captions.jsonl` with lines `{"file": "images/x.png", "caption": "..."}`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipelines.training.scenes import SCENE_VERSION, make_dataset


@dataclass
class CaptionedImages:
    """Images as uint8 (n, h, w, 3) with one caption each."""

    images: np.ndarray
    captions: list[str]

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
            captions = [json.loads(line)["caption"] for line in stem.with_suffix(".jsonl").open()]
            return CaptionedImages(np.load(stem.with_suffix(".npy"), mmap_mode="r"), captions)
    images, scenes = make_dataset(n, seed=seed, size=size)
    if cache_dir is not None:
        cache_dir.mkdir(parents=True, exist_ok=True)
        np.save(stem.with_suffix(".npy"), images)
        with stem.with_suffix(".jsonl").open("w") as f:
            for scene in scenes:
                f.write(json.dumps(scene.to_json()) + "\n")
    return CaptionedImages(images, [scene.caption for scene in scenes])


def folder_dataset(root: Path, size: int) -> CaptionedImages:
    """A user's folder: `captions.jsonl` naming image files relative to `root`, resized to `size`."""
    index = root / "captions.jsonl"
    if not index.is_file():
        raise FileNotFoundError(f"{index} not found: a folder dataset needs captions.jsonl with lines "
                                '{"file": "images/x.png", "caption": "..."}')
    records = [json.loads(line) for line in index.open() if line.strip()]
    images = np.empty((len(records), size, size, 3), dtype=np.uint8)
    for i, record in enumerate(records):
        with Image.open(root / record["file"]) as image:
            images[i] = np.asarray(image.convert("RGB").resize((size, size), Image.BICUBIC))
    return CaptionedImages(images, [record["caption"] for record in records])


def load_dataset(source: str, n: int, seed: int, size: int, cache_dir: Path | None) -> CaptionedImages:
    """`source` is "procedural" or the path of a folder dataset."""
    if source == "procedural":
        return procedural_dataset(n, seed, size, cache_dir)
    return folder_dataset(Path(source), size)
