"""Prompt suites: the built-in suite is the scene generator's output, and a bad line is named with its field."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from eval.suites import (
    BUILTIN_SUITE,
    SuiteFormatError,
    SuitePrompt,
    builtin_prompts,
    format_suite,
    load_suite,
    parse_suite,
)
from pipelines.training.scenes import KINDS, make_scene

RED_CIRCLE = {"category": "single", "objects": [{"shape": "circle", "color": "red", "count": 1}], "relation": None}
GOOD_LINE = {"id": "p1", "prompt": "a red circle", "category": "single", "expectation": RED_CIRCLE,
             "tags": ["mine"], "seed": 3}
POSITION = {
    "category": "position",
    "objects": [{"shape": "circle", "color": "red", "count": 1}, {"shape": "star", "color": "blue", "count": 1}],
    "relation": {"a": {"shape": "circle", "color": "red"}, "relation": "above", "b": {"shape": "star", "color": "blue"}},
}


def line(**changes: object) -> str:
    """GOOD_LINE as JSON with some fields replaced (a value of ... removes the field)."""
    record = {**GOOD_LINE, **changes}
    return json.dumps({key: value for key, value in record.items() if value is not ...})


def with_expectation(**changes: object) -> dict:
    return {**RED_CIRCLE, **changes}


@pytest.mark.slow
def test_the_committed_builtin_suite_equals_a_fresh_regeneration():
    assert BUILTIN_SUITE.read_text(encoding="utf-8") == format_suite(builtin_prompts()), (
        "eval/data/builtin.jsonl is stale: run `python -c 'from eval.suites import write_builtin_suite; "
        "write_builtin_suite()'`"
    )


def test_the_builtin_suite_covers_every_category_in_both_phrasings():
    prompts = load_suite()
    assert len(prompts) >= 300
    counts = Counter(prompt.tags for prompt in prompts)
    assert {tags for tags in counts} == {(kind, phrasing) for kind in KINDS for phrasing in ("in_template", "heldout")}
    assert len(set(counts.values())) == 1  # every category as large as the others, in both phrasings
    assert all(prompt.category == prompt.expectation["category"] for prompt in prompts)


def test_heldout_prompts_phrase_the_same_scenes_differently():
    prompts = {prompt.id: prompt for prompt in load_suite()}
    heldout = [prompt for prompt in prompts.values() if "heldout" in prompt.tags]
    assert heldout
    for prompt in heldout:
        twin = prompts[prompt.id.removesuffix("-heldout")]
        assert (twin.expectation, twin.seed, twin.category) == (prompt.expectation, prompt.seed, prompt.category)
        assert twin.prompt != prompt.prompt


def test_builtin_scenes_are_distinct_within_each_category():
    prompts = [prompt for prompt in load_suite() if "in_template" in prompt.tags]
    for kind in KINDS:
        expectations = [json.dumps(p.expectation, sort_keys=True) for p in prompts if p.category == kind]
        assert len(set(expectations)) == len(expectations)


def test_a_heldout_caption_renders_the_same_image_as_its_template_twin():
    prompt = next(p for p in load_suite() if p.category == "position")
    image, scene = make_scene(prompt.seed, kind="position")
    heldout_image, heldout_scene = make_scene(prompt.seed, kind="position", heldout=True)
    assert np.array_equal(np.asarray(image), np.asarray(heldout_image))
    assert scene.expectation() == heldout_scene.expectation() == prompt.expectation
    assert scene.caption == prompt.prompt


def test_a_suite_round_trips_through_its_text(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text("\n".join([line(), "", line(id="p2", expectation=POSITION, category="position")]) + "\n")
    prompts = load_suite(path)
    assert [p.id for p in prompts] == ["p1", "p2"]
    assert prompts[0] == SuitePrompt("p1", "a red circle", "single", RED_CIRCLE, ("mine",), 3)
    assert parse_suite(format_suite(prompts)) == prompts


def test_prompts_without_expectation_take_defaults():
    (prompt,) = parse_suite(json.dumps({"id": "s1", "prompt": "a lighthouse at dusk", "category": "style"}))
    assert prompt == SuitePrompt("s1", "a lighthouse at dusk", "style", None, (), None)


@pytest.mark.parametrize(
    ("bad_line", "field", "message"),
    [
        ("{not json", None, "not valid JSON"),
        ("[1, 2]", None, "expected a JSON object"),
        (line(id=...), "id", "missing"),
        (line(prompt="  "), "prompt", "non-empty string"),
        (line(category=3), "category", "non-empty string"),
        (line(colour="red"), "colour", "unknown field; allowed: id, prompt, category, expectation, tags, seed"),
        (line(tags="a,b"), "tags", "list of strings"),
        (line(seed=-1), "seed", "whole number >= 0"),
        (line(seed=True), "seed", "whole number >= 0"),
        (line(category="counting"), "category", "differs from expectation.category"),
        (line(expectation=[]), "expectation", "expected an object"),
        (line(expectation=with_expectation(category="style")), "expectation.category", "is not one of single"),
        (line(expectation=with_expectation(objects=[])), "expectation.objects", "non-empty list"),
        (line(expectation=with_expectation(objects=[{"shape": "circle", "color": "teal", "count": 1}])),
         "expectation.objects[0].color", "'teal' is not one of red, orange"),
        (line(expectation=with_expectation(objects=[{"shape": "circle", "color": "red"}])),
         "expectation.objects[0].count", "missing"),
        (line(expectation=with_expectation(objects=[{"shape": "circle", "color": "red", "count": 2}])),
         "expectation.objects", "every count is 1"),
        (line(expectation=with_expectation(relation=POSITION["relation"])), "expectation.relation", "must be null"),
        (line(category="position", expectation={**POSITION, "relation": None}), "expectation.relation",
         "expected an object"),
        (line(category="position", expectation={**POSITION, "relation": {**POSITION["relation"], "relation": "near"}}),
         "expectation.relation.relation", "'near' is not one of left of"),
        (line(category="position", expectation={**POSITION, "relation": {
            **POSITION["relation"], "b": {"shape": "square", "color": "blue"}}}),
         "expectation.relation", "a and b must be the two objects"),
    ],
)
def test_a_bad_line_is_reported_with_its_number_and_field(bad_line, field, message):
    with pytest.raises(SuiteFormatError) as raised:
        parse_suite("\n".join([line(id="first"), "", bad_line]), "mine.jsonl")
    error = raised.value
    assert (error.line, error.field) == (3, field)
    assert str(error).startswith("mine.jsonl line 3: ")
    if field is not None:
        assert f"field '{field}'" in str(error)
    assert message in str(error)


def test_a_duplicate_id_names_where_it_first_appeared():
    with pytest.raises(SuiteFormatError, match=r"line 2: field 'id': duplicate 'p1' \(first on line 1\)"):
        parse_suite("\n".join([line(), line()]))


def test_an_empty_or_missing_suite_is_an_error(tmp_path):
    with pytest.raises(SuiteFormatError, match="no prompts"):
        parse_suite("\n\n")
    with pytest.raises(SuiteFormatError, match="cannot read suite"):
        load_suite(tmp_path / "absent.jsonl")
