"""The procedural scene generator: deterministic in its seed, varied across seeds, and its ground truth (objects,
colours, boxes, relations, captions) matches the pixels it draws; held-out phrasings never occur in training."""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest

from pipelines.training.scenes import (
    BACKGROUNDS,
    COLORS,
    HELDOUT_RELATION_WORDS,
    HELDOUT_SHAPE_WORDS,
    INVERSE_RELATION,
    KINDS,
    NUMBER_WORDS,
    PARAPHRASE_PLURALS,
    PARAPHRASE_RELATION_WORDS,
    PARAPHRASE_SHAPE_WORDS,
    RELATION_WORDS,
    RELATIONS,
    SCENE_VERSION,
    SHAPE_PLURALS,
    SHAPE_WORDS,
    SHAPES,
    SIZES,
    Scene,
    caption_for,
    make_dataset,
    make_scene,
    scene_paraphrases,
)

SAMPLE_SEEDS = range(400)
SIZE = 128

COLOR_TOLERANCE = 40.0
"""RGB distance under which a pixel counts as an object colour; every background tone is more than twice as far."""

SHAPE_COVERAGE = {"circle": math.pi / 4, "square": 1.0, "triangle": 0.45, "cross": 0.59, "star": 0.33}
"""Share of its square box that each shape covers (from its geometry: a triangle of base 2r and height 1.8r, a
cross of arms 0.72r wide, a star of inner radius 0.45r)."""

GROUND_TRUTH_DIGESTS = {2: "1a52831086c402bb"}
"""sha256 (first 16 hex digits) of the captions and ground truth of seeds 0..49, per SCENE_VERSION. Cached datasets
and latents are keyed by SCENE_VERSION, so a change to the scenes that keeps the version would train on stale caches."""


@pytest.fixture(scope="module")
def sample() -> list[tuple[np.ndarray, Scene]]:
    """A few hundred training scenes at 128 px, as pixel arrays and ground truth."""
    scenes = []
    for seed in SAMPLE_SEEDS:
        image, scene = make_scene(seed, size=SIZE)
        scenes.append((np.asarray(image), scene))
    return scenes


def near(pixels: np.ndarray, color: str) -> np.ndarray:
    """Mask of the pixels within COLOR_TOLERANCE of a named object colour."""
    return np.linalg.norm(pixels.astype(np.float32) - np.array(COLORS[color], np.float32), axis=-1) < COLOR_TOLERANCE


def phrase_pattern(phrases) -> re.Pattern[str]:
    """Whole-word match of any of `phrases`, longest first (so "crosses" is not read as "cross")."""
    ordered = sorted(set(phrases), key=len, reverse=True)
    return re.compile(r"(?<![\w-])(" + "|".join(re.escape(p) for p in ordered) + r")(?![\w-])")


TRAINING_SHAPE_WORDS = [w for words in SHAPE_WORDS.values() for w in words]
TRAINING_NOUNS = phrase_pattern(TRAINING_SHAPE_WORDS + [SHAPE_PLURALS[w] for w in TRAINING_SHAPE_WORDS])
TRAINING_RELATIONS = phrase_pattern(w for words in RELATION_WORDS.values() for w in words)


def template_of(caption: str) -> str:
    """The caption with every colour, shape, size, number, relation, background and article replaced by a slot."""
    for pattern, slot in (
        (TRAINING_RELATIONS, "<rel>"),
        (TRAINING_NOUNS, "<shape>"),
        (phrase_pattern(COLORS), "<color>"),
        (phrase_pattern(SIZES), "<size>"),
        (phrase_pattern(NUMBER_WORDS.values()), "<n>"),
        (phrase_pattern(BACKGROUNDS), "<bg>"),
        (phrase_pattern(["a", "an"]), "<a>"),
    ):
        caption = pattern.sub(slot, caption)
    return caption.replace("<size> ", "")


def words(caption: str) -> set[str]:
    return set(re.findall(r"[\w-]+", caption))


def digest(images: np.ndarray, scenes: list[Scene]) -> str:
    data = images.tobytes() + json.dumps([s.to_json() for s in scenes], sort_keys=True).encode()
    return hashlib.sha256(data).hexdigest()


# --- determinism ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 17, 123_456])
@pytest.mark.parametrize("heldout", [False, True])
def test_the_same_seed_gives_identical_pixels_caption_and_ground_truth(seed: int, heldout: bool) -> None:
    first_image, first = make_scene(seed, heldout=heldout)
    second_image, second = make_scene(seed, heldout=heldout)
    assert np.array_equal(np.asarray(first_image), np.asarray(second_image))
    assert first.caption == second.caption
    assert first.to_json() == second.to_json()


def test_a_dataset_is_identical_in_a_fresh_process_with_another_hash_seed() -> None:
    code = (
        "import hashlib, json\n"
        "from pipelines.training.scenes import make_dataset\n"
        "images, scenes = make_dataset(12, seed=3, size=64)\n"
        "data = images.tobytes() + json.dumps([s.to_json() for s in scenes], sort_keys=True).encode()\n"
        "print(hashlib.sha256(data).hexdigest())\n"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120,
                            check=True)
    assert result.stdout.strip() == digest(*make_dataset(12, seed=3, size=64))


def test_a_dataset_rendered_by_several_processes_is_the_one_rendered_by_one() -> None:
    # 2,000 scenes: the smallest dataset that make_dataset splits across processes.
    serial = make_dataset(2000, seed=5, size=32, workers=1)
    parallel = make_dataset(2000, seed=5, size=32, workers=2)
    assert digest(*parallel) == digest(*serial)


def test_different_seeds_give_different_scenes(sample) -> None:
    first_fifty = sample[:50]
    assert len({image.tobytes() for image, _ in first_fifty}) == 50
    assert len({scene.caption for _, scene in first_fifty}) >= 40
    other_images, _ = make_dataset(4, seed=1, size=SIZE)
    assert all(not np.array_equal(other, image) for other in other_images for image, _ in sample[:4])


def test_the_ground_truth_changes_only_with_the_scene_version() -> None:
    scenes = [make_scene(seed, size=SIZE)[1] for seed in range(50)]
    found = hashlib.sha256(json.dumps([s.to_json() for s in scenes], sort_keys=True).encode()).hexdigest()[:16]
    assert GROUND_TRUTH_DIGESTS.get(SCENE_VERSION) == found, (
        "the scenes changed: if on purpose, bump SCENE_VERSION in scenes.py (cached datasets are keyed by it) and "
        f"pin GROUND_TRUTH_DIGESTS[{SCENE_VERSION}] = {found!r} here"
    )


# --- variety ---------------------------------------------------------------------------------------------------------


def test_a_few_hundred_seeds_cover_every_shape_colour_size_count_relation_and_background(sample) -> None:
    scenes = [scene for _, scene in sample]
    objects = [obj for scene in scenes for obj in scene.objects]
    assert {obj.shape for obj in objects} == set(SHAPES) and len(SHAPES) >= 5
    assert {obj.color for obj in objects} == set(COLORS) and len(COLORS) >= 8
    assert {obj.size for obj in objects} == {"small", "large"}
    assert {len(scene.objects) for scene in scenes} == {1, 2, 3}
    assert {scene.relation for scene in scenes if scene.relation} == set(RELATIONS) and len(RELATIONS) == 4
    assert {scene.kind for scene in scenes} == set(KINDS)
    backgrounds = Counter(scene.background for scene in scenes)
    assert set(backgrounds) == set(BACKGROUNDS) and "plain" in backgrounds and len(backgrounds) >= 4
    assert len({scene.background_tone for scene in scenes}) >= 3


def test_each_kind_of_scene_holds_the_objects_its_kind_promises(sample) -> None:
    for _, scene in sample:
        objects = scene.objects
        if scene.kind == "single":
            assert len(objects) == 1
        elif scene.kind == "counting":
            assert len(objects) in (2, 3)
            assert len({(obj.shape, obj.color) for obj in objects}) == 1
        else:
            assert len(objects) == 2
            assert objects[0].shape != objects[1].shape and objects[0].color != objects[1].color
        assert (scene.relation is not None) == (scene.kind == "position")


def test_captions_come_from_several_templates_with_synonyms_and_word_orders(sample) -> None:
    scenes = [scene for _, scene in sample]
    templates: dict[str, set[str]] = {kind: set() for kind in KINDS}
    for scene in scenes:
        templates[scene.kind].add(template_of(scene.caption))
    assert all(len(found) >= 3 for found in templates.values()), templates
    used = {match for scene in scenes for match in TRAINING_NOUNS.findall(scene.caption)}
    assert {"disc", "plus sign"} & used and {"circle", "cross"} & used, "shape synonyms are used"
    assert any(re.search(r"\b(small|large)\b", scene.caption) for scene in scenes), "sizes are sometimes named"
    # Two objects without a relation are named in either order.
    orders = {scene.caption.index(scene.objects[0].color) < scene.caption.index(scene.objects[1].color)
              for scene in scenes if scene.kind == "two_objects"}
    assert orders == {True, False}


def test_every_caption_names_what_the_ground_truth_holds(sample) -> None:
    for _, scene in sample:
        for obj in scene.objects:
            assert re.search(rf"\b{obj.color}\b", scene.caption), scene
            nouns = [SHAPE_PLURALS[w] for w in SHAPE_WORDS[obj.shape]] + list(SHAPE_WORDS[obj.shape])
            assert phrase_pattern(nouns).search(scene.caption), scene
        if scene.kind == "counting":
            assert re.search(rf"\b{NUMBER_WORDS[len(scene.objects)]}\b", scene.caption), scene


# --- ground truth against pixels ------------------------------------------------------------------------------------


def test_ground_truth_boxes_lie_inside_the_image_at_the_stated_size(sample) -> None:
    for _, scene in sample:
        for obj in scene.objects:
            x0, y0, x1, y1 = obj.box
            assert 0 <= x0 < x1 <= scene.size and 0 <= y0 < y1 <= scene.size, scene
            assert x1 - x0 == y1 - y0
            assert abs((x1 - x0) / scene.size - SIZES[obj.size]) <= 0.1 * SIZES[obj.size] + 1 / scene.size


def test_each_box_holds_its_object_drawn_in_its_colour_and_shape(sample) -> None:
    for pixels, scene in sample:
        for obj in scene.objects:
            x0, y0, x1, y1 = obj.box
            patch = pixels[y0:y1, x0:x1]
            coverage = near(patch, obj.color).mean()
            # The covered share tells the shapes apart: 0.33 star, 0.45 triangle, 0.59 cross, 0.79 circle, 1 square.
            assert abs(coverage - SHAPE_COVERAGE[obj.shape]) < 0.05, (scene.seed, obj, coverage)
            for other in scene.objects:
                if other.color != obj.color:
                    assert near(patch, other.color).mean() < 0.02, (scene.seed, obj, other)


def test_nothing_of_an_object_colour_is_drawn_outside_the_boxes(sample) -> None:
    for pixels, scene in sample:
        outside = np.ones(pixels.shape[:2], dtype=bool)
        for obj in scene.objects:
            x0, y0, x1, y1 = obj.box
            outside[y0:y1, x0:x1] = False
        background = pixels[outside].astype(np.float32)
        palette = np.array(list(COLORS.values()), np.float32)
        distances = np.linalg.norm(background[:, None, :] - palette[None, :, :], axis=-1)
        assert (distances.min(axis=1) < COLOR_TOLERANCE).mean() < 0.002, scene.seed
        tone = np.array(scene.background_tone, np.float32)
        assert np.abs(background.astype(np.float32).mean(axis=0) - tone).max() < 12, scene.seed


def test_two_object_positions_satisfy_the_stated_relation(sample) -> None:
    axis_and_sign = {"left of": (0, -1), "right of": (0, 1), "above": (1, -1), "below": (1, 1)}
    checked = Counter()
    for _, scene in sample:
        if scene.kind != "position":
            continue
        a, b = scene.objects
        axis, sign = axis_and_sign[scene.relation]
        # a's centre lies clearly on its side of b's: at least 15% of the image apart along the relation's axis.
        assert sign * (a.center[axis] - b.center[axis]) >= 0.15 * scene.size, scene
        # and the caption says so, naming a before the relation and b after it.
        match = phrase_pattern(RELATION_WORDS[scene.relation]).search(scene.caption)
        assert match, scene.caption
        assert scene.caption.index(a.color) < match.start() < scene.caption.index(b.color), scene.caption
        other_relations = [w for r, ws in RELATION_WORDS.items() if r != scene.relation for w in ws]
        assert not phrase_pattern(other_relations).search(scene.caption), scene.caption
        assert scene.expectation()["relation"] == {
            "a": {"shape": a.shape, "color": a.color}, "relation": scene.relation,
            "b": {"shape": b.shape, "color": b.color},
        }
        checked[scene.relation] += 1
    assert set(checked) == set(RELATIONS)


# --- held-out phrasings ---------------------------------------------------------------------------------------------


def test_held_out_phrasings_never_occur_in_training_captions(sample) -> None:
    assert set(HELDOUT_SHAPE_WORDS) == set(SHAPES) and set(HELDOUT_RELATION_WORDS) == set(RELATIONS)
    scenes = [scene for _, scene in sample]
    training = [scene.caption for scene in scenes] + [
        caption_for(s.kind, s.objects, s.relation, s.background, random.Random(k)) for s in scenes for k in range(10)
    ] + [text for s in scenes for text in scene_paraphrases(s.to_json(), 10)]
    heldout = [caption_for(s.kind, s.objects, s.relation, s.background, random.Random(k), heldout=True)
               for s in scenes for k in range(3)]
    heldout += [make_scene(seed, size=64, heldout=True)[1].caption for seed in range(30)]

    heldout_phrases = list(HELDOUT_SHAPE_WORDS.values()) + list(HELDOUT_RELATION_WORDS.values())
    heldout_phrases += [SHAPE_PLURALS[w] for w in HELDOUT_SHAPE_WORDS.values()]
    in_training = phrase_pattern(heldout_phrases)
    assert [c for c in training if in_training.search(c)] == []
    for phrase in list(HELDOUT_SHAPE_WORDS.values()) + list(HELDOUT_RELATION_WORDS.values()):
        assert any(phrase_pattern([phrase]).search(c) for c in heldout), f"{phrase!r} is never used"

    vocabulary = set().union(*(words(c) for c in training))
    assert [c for c in heldout if not words(c) - vocabulary] == [], "every held-out caption has an unseen word"
    assert not set(training) & set(heldout)


def test_held_out_captions_keep_the_scene_they_describe() -> None:
    for seed in range(40):
        image, scene = make_scene(seed, size=64)
        heldout_image, heldout_scene = make_scene(seed, size=64, heldout=True)
        assert np.array_equal(np.asarray(image), np.asarray(heldout_image))
        assert heldout_scene.objects == scene.objects and heldout_scene.relation == scene.relation
        for obj in scene.objects:
            assert obj.color in heldout_scene.caption and HELDOUT_SHAPE_WORDS[obj.shape] in heldout_scene.caption
        if scene.relation:
            assert HELDOUT_RELATION_WORDS[scene.relation] in heldout_scene.caption


# --- training paraphrases -------------------------------------------------------------------------------------------


def paraphrase_nouns(shape: str) -> re.Pattern[str]:
    nouns = PARAPHRASE_SHAPE_WORDS[shape]
    return phrase_pattern(list(nouns) + [PARAPHRASE_PLURALS.get(n) or SHAPE_PLURALS[n] for n in nouns])


def test_paraphrases_say_what_the_scene_shows(sample) -> None:
    said_backwards = 0
    for _, scene in sample:
        for text in scene_paraphrases(scene.to_json(), 4):
            for obj in scene.objects:
                assert re.search(rf"\b{obj.color}\b", text) and paraphrase_nouns(obj.shape).search(text), (scene, text)
            if scene.kind == "counting":
                assert re.search(rf"\b{NUMBER_WORDS[len(scene.objects)]}\b", text), (scene, text)
            if scene.relation:
                a, b = scene.objects
                first_is_a = text.index(f" {a.color} ") < text.index(f" {b.color} ")
                relation = scene.relation if first_is_a else INVERSE_RELATION[scene.relation]
                said_backwards += not first_is_a
                assert phrase_pattern(PARAPHRASE_RELATION_WORDS[relation]).search(text), (scene, text)
                wrong = [w for r, ws in PARAPHRASE_RELATION_WORDS.items() if r != relation for w in ws
                         if w not in PARAPHRASE_RELATION_WORDS[relation]]
                assert not phrase_pattern(wrong).search(text), (scene, text)
    assert said_backwards > 0, "relations are said either way round"


def test_paraphrases_are_fixed_per_scene_and_varied_across_scenes(sample) -> None:
    scenes = [scene.to_json() for _, scene in sample]
    assert [scene_paraphrases(s, 2) for s in scenes] == [scene_paraphrases(json.loads(json.dumps(s)), 2)
                                                         for s in scenes]
    texts = [text for s in scenes for text in scene_paraphrases(s, 2)]
    assert len(set(texts)) > 0.8 * len(texts), "mostly distinct"
    for words_of_shape in PARAPHRASE_SHAPE_WORDS.values():
        assert all(phrase_pattern([word]).search(" ".join(texts)) for word in words_of_shape), words_of_shape


def test_paraphrases_fit_the_text_encoders_token_length(sample) -> None:
    from pipelines.training.text import MAX_TOKENS, load_text_encoder

    tokenizer, _ = load_text_encoder()
    texts = [text for _, scene in sample for text in scene_paraphrases(scene.to_json(), 4)]
    assert max(len(ids) for ids in tokenizer(texts).input_ids) <= MAX_TOKENS
