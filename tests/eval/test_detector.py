"""The procedural-scene detector: finds every object of ground-truth renders, and refuses images that do not match."""

from __future__ import annotations

import copy
import random
from collections import Counter

import numpy as np
import pytest
from PIL import Image, ImageFilter

from eval.detector import (
    SUB_SCORES,
    CheckResult,
    Detection,
    check,
    detect,
    score_detections,
    shape_template,
)
from pipelines.training.scenes import COLORS, KINDS, SHAPES, make_scene

SEEDS_PER_KIND = 150
NOISY_SEEDS_PER_KIND = 50
OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


def blur_and_noise(image: Image.Image, seed: int, radius: float = 1.0, sigma: float = 6.0) -> Image.Image:
    """A render softened the way a generated image is: Gaussian blur, then per-channel Gaussian noise."""
    pixels = np.asarray(image.filter(ImageFilter.GaussianBlur(radius)), dtype=np.float32)
    pixels = pixels + np.random.default_rng(seed).normal(0, sigma, pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def compose(objects: list[tuple[str, str, tuple[float, float, float, float]]],
            tone: tuple[int, int, int] = (128, 128, 128), size: int = 128) -> Image.Image:
    """An anti-aliased image of (shape, colour, box) objects on a plain background, objects free to touch."""
    pixels = np.empty((size, size, 3), dtype=np.float32)
    pixels[:] = tone
    for shape, colour, box in objects:
        cover = shape_template(shape, box, size, size)[..., None]
        pixels = pixels * (1 - cover) + np.array(COLORS[colour], dtype=np.float32) * cover
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def accuracy(results: list[CheckResult]) -> dict[str, float]:
    """Share of passes per sub-score."""
    passed, total = Counter(), Counter()
    for result in results:
        for name, ok in result.details["scores"].items():
            total[name] += 1
            passed[name] += ok
    return {name: passed[name] / total[name] for name in total}


def content(expectation: dict) -> tuple:
    """What an expectation asks for, independent of object order and of relation wording."""
    objects = frozenset((o["shape"], o["color"], o["count"]) for o in expectation["objects"])
    relation = expectation["relation"]
    if relation is None:
        return objects, None
    a, b = ((relation[side]["shape"], relation[side]["color"]) for side in ("a", "b"))
    word = relation["relation"]
    if word in ("right of", "below"):
        a, b, word = b, a, OPPOSITE[word]
    return objects, (a, word, b)


def mismatched(expectation: dict, other: dict, rng: random.Random) -> list[tuple[str, dict]]:
    """Expectations the image of `expectation` does not satisfy: another scene's, a wrong colour, a wrong shape,
    swapped colours, the opposite relation, a count one off."""
    variants = []
    if content(other) != content(expectation):
        variants.append(("other scene", other))
    used_colors = {o["color"] for o in expectation["objects"]}
    used_shapes = {o["shape"] for o in expectation["objects"]}
    for attribute, choices in (("color", [c for c in COLORS if c not in used_colors]),
                               ("shape", [s for s in SHAPES if s not in used_shapes])):
        variant = copy.deepcopy(expectation)
        target = rng.choice(variant["objects"])
        old, new = target[attribute], rng.choice(choices)
        target[attribute] = new
        if variant["relation"]:
            for side in ("a", "b"):
                if variant["relation"][side][attribute] == old:
                    variant["relation"][side][attribute] = new
        variants.append((f"wrong {attribute}", variant))
    if expectation["category"] in ("two_objects", "position"):
        variant = copy.deepcopy(expectation)
        first, second = variant["objects"]
        first["color"], second["color"] = second["color"], first["color"]
        if variant["relation"]:
            a, b = variant["relation"]["a"], variant["relation"]["b"]
            a["color"], b["color"] = b["color"], a["color"]
        variants.append(("swapped colours", variant))
    if expectation["category"] == "position":
        variant = copy.deepcopy(expectation)
        variant["relation"]["relation"] = OPPOSITE[variant["relation"]["relation"]]
        variants.append(("opposite relation", variant))
    if expectation["category"] == "counting":
        for delta in (-1, 1):
            variant = copy.deepcopy(expectation)
            variant["objects"][0]["count"] += delta
            variants.append((f"count {delta:+d}", variant))
    return variants


@pytest.fixture(scope="module")
def ground_truth_detections() -> list[tuple[dict, dict, list[Detection]]]:
    """(expectation, the next scene's expectation, detections) for SEEDS_PER_KIND renders of each kind."""
    cases = []
    for kind in KINDS:
        scenes = [make_scene(seed, kind=kind) for seed in range(SEEDS_PER_KIND)]
        for index, (image, scene) in enumerate(scenes):
            other = scenes[(index + 1) % len(scenes)][1].expectation()
            cases.append((scene.expectation(), other, detect(image)))
    return cases


@pytest.mark.slow
def test_every_category_is_at_least_98_percent_right_on_ground_truth_renders(ground_truth_detections):
    scores = accuracy([score_detections(found, expectation) for expectation, _, found in ground_truth_detections])
    assert set(scores) == {"single_object", "colors", "counting", "two_objects", "color_attribution", "position"}
    assert all(value >= 0.98 for value in scores.values()), scores


@pytest.mark.slow
def test_detections_name_exactly_the_rendered_objects(ground_truth_detections):
    right = sum(
        sorted((d.shape, d.color) for d in found)
        == sorted((o["shape"], o["color"]) for o in expectation["objects"] for _ in range(o["count"]))
        for expectation, _, found in ground_truth_detections
    )
    assert right / len(ground_truth_detections) >= 0.98


@pytest.mark.slow
def test_mismatched_expectations_fail_at_least_98_percent_of_the_time(ground_truth_detections):
    rng = random.Random(0)
    false_passes, tries = Counter(), Counter()
    for expectation, other, found in ground_truth_detections:
        for name, variant in mismatched(expectation, other, rng):
            tries[name] += 1
            false_passes[name] += score_detections(found, variant).passed
    assert set(tries) == {"other scene", "wrong color", "wrong shape", "swapped colours", "opposite relation",
                          "count -1", "count +1"}
    rates = {name: false_passes[name] / tries[name] for name in tries}
    assert all(rate <= 0.02 for rate in rates.values()), rates


@pytest.mark.slow
def test_blur_and_noise_keep_every_category_at_least_98_percent_right():
    results = []
    for kind in KINDS:
        for seed in range(1000, 1000 + NOISY_SEEDS_PER_KIND):
            image, scene = make_scene(seed, kind=kind)
            results.append(check(blur_and_noise(image, seed), scene.expectation()))
    scores = accuracy(results)
    assert all(value >= 0.98 for value in scores.values()), scores


def test_a_larger_render_is_resized_and_its_boxes_mapped_back():
    for seed in range(8):
        image, scene = make_scene(seed, size=256, kind="two_objects")
        found = detect(image)
        assert sorted((d.shape, d.color) for d in found) == sorted((o.shape, o.color) for o in scene.objects)
        for obj in scene.objects:
            if obj.shape in ("circle", "square", "cross"):  # their drawn extent is their box
                match = next(d for d in found if d.shape == obj.shape)
                assert np.allclose(match.box, obj.box, atol=3.0), (match.box, obj.box)


def test_check_reports_every_sub_score_of_its_category():
    for kind in KINDS:
        image, scene = make_scene(7, kind=kind)
        result = check(image, scene.expectation())
        assert result.category == kind
        assert tuple(result.details["scores"]) == SUB_SCORES[kind]
        assert result.passed is result.details["scores"][SUB_SCORES[kind][0]] is True


def test_touching_objects_of_one_colour_are_counted_separately():
    image = compose([("circle", "red", (20, 40, 50, 70)), ("circle", "red", (49, 40, 79, 70)),
                     ("star", "yellow", (20, 80, 42, 102)), ("star", "yellow", (40, 80, 62, 102)),
                     ("star", "yellow", (60, 80, 82, 102))])
    found = Counter((d.shape, d.color) for d in detect(image))
    assert found == {("circle", "red"): 2, ("star", "yellow"): 3}


def test_touching_objects_of_two_colours_keep_their_own_colour_and_shape():
    image = compose([("circle", "red", (20, 40, 50, 70)), ("square", "blue", (50, 40, 80, 70))])
    assert sorted((d.shape, d.color) for d in detect(image)) == [("circle", "red"), ("square", "blue")]


@pytest.mark.parametrize("tone", [(70, 80, 70), (150, 140, 120)])
def test_white_objects_are_found_on_dark_and_light_backgrounds(tone):
    image = compose([("triangle", "white", (30, 30, 66, 66)), ("star", "white", (80, 80, 100, 100))], tone)
    assert sorted((d.shape, d.color) for d in detect(image)) == [("star", "white"), ("triangle", "white")]


def test_an_empty_background_has_no_objects():
    image, _ = make_scene(3, kind="single")
    plain = Image.new("RGB", image.size, (110, 95, 110))
    assert detect(plain) == []
    assert detect(blur_and_noise(plain, 0, sigma=8.0)) == []


SINGLE_RED_CIRCLE = {"category": "single", "objects": [{"shape": "circle", "color": "red", "count": 1}],
                     "relation": None}
RED_CIRCLE_LEFT_OF_BLUE_SQUARE = {
    "category": "position",
    "objects": [{"shape": "circle", "color": "red", "count": 1}, {"shape": "square", "color": "blue", "count": 1}],
    "relation": {"a": {"shape": "circle", "color": "red"}, "relation": "left of",
                 "b": {"shape": "square", "color": "blue"}},
}


def found(shape: str, color: str, x: float, y: float, side: float = 20.0) -> Detection:
    """A detection of side `side` centred at (x, y)."""
    box = (x - side / 2, y - side / 2, x + side / 2, y + side / 2)
    return Detection(shape, color, box, (x, y), side * side, 1.0)


def test_colors_scores_the_colour_of_the_main_object_even_when_its_shape_is_wrong():
    blue_circle = score_detections([found("circle", "blue", 60, 60)], SINGLE_RED_CIRCLE)
    assert blue_circle.details["scores"] == {"single_object": False, "colors": False}
    red_square = score_detections([found("square", "red", 60, 60)], SINGLE_RED_CIRCLE)
    assert red_square.details["scores"] == {"single_object": False, "colors": True}


def test_a_colour_that_bleeds_onto_the_other_shape_fails_color_attribution_only():
    detections = [found("circle", "red", 30, 60), found("square", "blue", 90, 60), found("circle", "blue", 60, 100)]
    result = score_detections(detections, RED_CIRCLE_LEFT_OF_BLUE_SQUARE)
    assert result.details["scores"] == {"position": True, "two_objects": True, "color_attribution": False}


def test_swapped_colours_fail_every_sub_score():
    detections = [found("circle", "blue", 30, 60), found("square", "red", 90, 60)]
    result = score_detections(detections, RED_CIRCLE_LEFT_OF_BLUE_SQUARE)
    assert result.details["scores"] == {"position": False, "two_objects": False, "color_attribution": False}


@pytest.mark.parametrize(("square_x", "holds"), [(90, True), (64, False), (50, False), (20, False)])
def test_position_needs_a_clear_offset_along_the_relations_axis(square_x, holds):
    detections = [found("circle", "red", 60, 60), found("square", "blue", square_x, 20)]
    assert score_detections(detections, RED_CIRCLE_LEFT_OF_BLUE_SQUARE).passed is holds


def test_an_unknown_category_is_refused_with_the_allowed_ones():
    with pytest.raises(ValueError, match="single, counting, two_objects, position"):
        score_detections([], {"category": "style", "objects": [], "relation": None})
