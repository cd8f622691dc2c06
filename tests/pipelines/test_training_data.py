"""Training data: a user's folder of images and captions.jsonl, and the cached procedural dataset."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipelines.errors import PipelineError
from pipelines.training.data import folder_dataset, load_dataset, procedural_dataset
from pipelines.training.scenes import SCENE_VERSION, make_dataset

RED, BLUE, GREEN = (220, 30, 30), (35, 75, 225), (40, 170, 60)


def write_folder(root: Path, records: list[dict], images: dict[str, Image.Image]) -> Path:
    for name, image in images.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        image.save(root / name)
    lines = [json.dumps(record) for record in records]
    (root / "captions.jsonl").write_text("\n".join([*lines[:1], "", *lines[1:]]) + "\n")  # a blank line is allowed
    return root


@pytest.fixture
def user_folder(tmp_path: Path) -> Path:
    """Three images of different sizes, modes and formats, listed in captions.jsonl."""
    rgba = Image.new("RGBA", (16, 16), (*GREEN, 255))
    return write_folder(
        tmp_path,
        [
            {"file": "images/red.png", "caption": "a red square"},
            {"file": "images/blue.jpg", "caption": "a blue square"},
            {"file": "images/green.png", "caption": "a green square"},
        ],
        {"images/red.png": Image.new("RGB", (40, 30), RED), "images/blue.jpg": Image.new("RGB", (100, 100), BLUE),
         "images/green.png": rgba},
    )


def test_a_folder_dataset_loads_every_listed_image_resized_with_its_caption(user_folder: Path) -> None:
    data = folder_dataset(user_folder, 32)
    assert len(data) == 3
    assert data.images.shape == (3, 32, 32, 3) and data.images.dtype == np.uint8
    assert data.captions == ["a red square", "a blue square", "a green square"]
    for image, color in zip(data.images, (RED, BLUE, GREEN), strict=True):
        assert np.abs(image[16, 16].astype(int) - color).max() <= 6


def test_a_folder_batch_is_pixels_in_minus_one_to_one_and_captions(user_folder: Path) -> None:
    data = load_dataset(str(user_folder), n=1000, seed=0, size=32, cache_dir=None)
    pixels, captions = data.batch(np.array([2, 0]))
    assert pixels.shape == (2, 3, 32, 32)
    assert captions == ["a green square", "a red square"]
    assert pixels.min() >= -1.0 and pixels.max() <= 1.0
    red = np.array(RED) / 127.5 - 1.0
    assert np.allclose(pixels[1, :, 16, 16].numpy(), red, atol=0.05)


def test_a_folder_without_captions_jsonl_is_refused_naming_the_file(tmp_path: Path) -> None:
    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    with pytest.raises(PipelineError, match=r"captions\.jsonl not found.*\"file\": .*\"caption\""):
        folder_dataset(tmp_path, 32)


def test_a_missing_image_is_refused_naming_it_and_its_line(tmp_path: Path) -> None:
    write_folder(tmp_path, [{"file": "images/here.png", "caption": "a"}, {"file": "images/gone.png", "caption": "b"}],
                 {"images/here.png": Image.new("RGB", (8, 8))})
    with pytest.raises(PipelineError, match=r"images/gone\.png not found \(named on line 3 of .*captions\.jsonl\)"):
        folder_dataset(tmp_path, 32)


@pytest.mark.parametrize("line", ['{"file": "images/a.png"}', "images/a.png, a caption", '["images/a.png", "a"]'])
def test_a_malformed_captions_line_is_refused_naming_its_line(tmp_path: Path, line: str) -> None:
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "captions.jsonl").write_text('{"file": "a.png", "caption": "ok"}\n' + line + "\n")
    with pytest.raises(PipelineError, match=r"captions\.jsonl:2: expected a line"):
        folder_dataset(tmp_path, 32)


def test_a_file_that_is_not_an_image_is_refused_naming_it(tmp_path: Path) -> None:
    (tmp_path / "notes.png").write_text("not a picture")
    (tmp_path / "captions.jsonl").write_text('{"file": "notes.png", "caption": "x"}\n')
    with pytest.raises(PipelineError, match=r"notes\.png \(line 1 of .*\) is not a readable image"):
        folder_dataset(tmp_path, 32)


def test_an_empty_captions_jsonl_is_refused(tmp_path: Path) -> None:
    (tmp_path / "captions.jsonl").write_text("\n")
    with pytest.raises(PipelineError, match="lists no images"):
        folder_dataset(tmp_path, 32)


def test_the_procedural_dataset_is_rendered_once_then_read_from_its_cache(tmp_path: Path) -> None:
    first = procedural_dataset(6, seed=2, size=32, cache_dir=tmp_path)
    stem = tmp_path / f"scenes-v{SCENE_VERSION}-n6-s2-32px"
    assert stem.with_suffix(".npy").is_file() and stem.with_suffix(".jsonl").is_file()
    images, scenes = make_dataset(6, seed=2, size=32)
    assert np.array_equal(first.images, images) and first.captions == [s.caption for s in scenes]
    ground_truth = [json.loads(line) for line in stem.with_suffix(".jsonl").open()]
    assert [g["expectation"] for g in ground_truth] == [s.expectation() for s in scenes]

    # A cache hit does not render: a marked cache comes back as it is.
    marked = np.load(stem.with_suffix(".npy"))
    marked[0, 0, 0] = (1, 2, 3)
    np.save(stem.with_suffix(".npy"), marked)
    again = load_dataset("procedural", 6, seed=2, size=32, cache_dir=tmp_path)
    assert tuple(again.images[0, 0, 0]) == (1, 2, 3) and again.captions == first.captions
