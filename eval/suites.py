"""Prompt suites: JSONL files of prompts with the structured expectation a generated image is checked against.

Each line is `{"id", "prompt", "category", "expectation": {...} | null, "tags": [...], "seed"}`; the expectation has
the shape of `Scene.expectation()`. The built-in suite is generated from the procedural scenes, once with training
phrasings (tag `in_template`) and once with held-out phrasings (tag `heldout`) of the same scenes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from pipelines.training.scenes import COLORS, KINDS, RELATIONS, SHAPES, Scene, make_scene

BUILTIN_SUITE = Path(__file__).parent / "data" / "builtin.jsonl"

BUILTIN_SCENES_PER_KIND = 40
"""Distinct scenes per category in the built-in suite; each appears with both phrasings."""

_BUILTIN_FIRST_SEED = {"single": 100_000, "counting": 200_000, "two_objects": 300_000, "position": 400_000}
_FIELDS = ("id", "prompt", "category", "expectation", "tags", "seed")
_OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


class SuiteFormatError(ValueError):
    """A suite file that does not parse; the message names the file, line and field."""

    def __init__(self, message: str, line: int | None = None, field: str | None = None):
        super().__init__(message)
        self.line = line
        self.field = field


@dataclass(frozen=True)
class SuitePrompt:
    """One prompt of a suite; `expectation` is None for prompts scored without a detector (e.g. by CLIP)."""

    id: str
    prompt: str
    category: str
    expectation: dict | None = None
    tags: tuple[str, ...] = field(default=())
    seed: int | None = None

    def to_json(self) -> dict:
        return {"id": self.id, "prompt": self.prompt, "category": self.category,
                "expectation": self.expectation, "tags": list(self.tags), "seed": self.seed}


# --- validation -----------------------------------------------------------------------------------------------


class _Invalid(Exception):
    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


def _one_of(value: object, allowed: tuple[str, ...], name: str) -> str:
    if value not in allowed:
        raise _Invalid(name, f"{value!r} is not one of {', '.join(allowed)}")
    return str(value)


def _mapping(value: object, name: str, keys: tuple[str, ...]) -> dict:
    if not isinstance(value, dict):
        raise _Invalid(name, f"expected an object with {', '.join(keys)}, got {type(value).__name__}")
    missing = [key for key in keys if key not in value]
    if missing:
        raise _Invalid(f"{name}.{missing[0]}", "missing")
    extra = [key for key in value if key not in keys]
    if extra:
        raise _Invalid(f"{name}.{extra[0]}", f"unknown field; allowed: {', '.join(keys)}")
    return value


def _object_ref(value: object, name: str, with_count: bool) -> tuple[str, str]:
    ref = _mapping(value, name, ("shape", "color", "count") if with_count else ("shape", "color"))
    _one_of(ref["shape"], SHAPES, f"{name}.shape")
    _one_of(ref["color"], tuple(COLORS), f"{name}.color")
    if with_count and (type(ref["count"]) is not int or ref["count"] < 1):
        raise _Invalid(f"{name}.count", f"expected a whole number >= 1, got {ref['count']!r}")
    return ref["shape"], ref["color"]


def _validate_expectation(expectation: object, name: str = "expectation") -> dict:
    """Check an expectation's structure and its category's rules, naming the first bad field."""
    data = _mapping(expectation, name, ("category", "objects", "relation"))
    category = _one_of(data["category"], KINDS, f"{name}.category")
    objects = data["objects"]
    if not isinstance(objects, list) or not objects:
        raise _Invalid(f"{name}.objects", "expected a non-empty list of {shape, color, count}")
    refs = [_object_ref(obj, f"{name}.objects[{i}]", with_count=True) for i, obj in enumerate(objects)]
    wanted = {"single": 1, "counting": 1, "two_objects": 2, "position": 2}[category]
    if len(objects) != wanted:
        raise _Invalid(f"{name}.objects", f"a {category} expectation has {wanted} object(s), got {len(objects)}")
    if category != "counting" and any(obj["count"] != 1 for obj in objects):
        raise _Invalid(f"{name}.objects", f"every count is 1 in a {category} expectation")
    relation = data["relation"]
    if category != "position":
        if relation is not None:
            raise _Invalid(f"{name}.relation", f"must be null in a {category} expectation")
        return data
    rel = _mapping(relation, f"{name}.relation", ("a", "relation", "b"))
    sides = (_object_ref(rel["a"], f"{name}.relation.a", False), _object_ref(rel["b"], f"{name}.relation.b", False))
    _one_of(rel["relation"], RELATIONS, f"{name}.relation.relation")
    if sorted(sides) != sorted(refs):
        raise _Invalid(f"{name}.relation", "a and b must be the two objects of the expectation")
    return data


def _prompt_from(data: dict, seen: dict[str, int], line: int) -> SuitePrompt:
    extra = [key for key in data if key not in _FIELDS]
    if extra:
        raise _Invalid(extra[0], f"unknown field; allowed: {', '.join(_FIELDS)}")
    for key in ("id", "prompt", "category"):
        if key not in data:
            raise _Invalid(key, "missing")
        if not isinstance(data[key], str) or not data[key].strip():
            raise _Invalid(key, f"expected a non-empty string, got {data[key]!r}")
    if data["id"] in seen:
        raise _Invalid("id", f"duplicate {data['id']!r} (first on line {seen[data['id']]})")
    expectation = data.get("expectation")
    if expectation is not None:
        _validate_expectation(expectation)
        if data["category"] != expectation["category"]:
            raise _Invalid("category", f"{data['category']!r} differs from expectation.category "
                                       f"{expectation['category']!r}")
    tags = data.get("tags", [])
    if not isinstance(tags, list) or not all(isinstance(tag, str) for tag in tags):
        raise _Invalid("tags", f"expected a list of strings, got {tags!r}")
    seed = data.get("seed")
    if seed is not None and (type(seed) is not int or seed < 0):
        raise _Invalid("seed", f"expected a whole number >= 0 or null, got {seed!r}")
    seen[data["id"]] = line
    return SuitePrompt(data["id"], data["prompt"], data["category"], expectation, tuple(tags), seed)


def parse_suite(text: str, source: str = "<suite>") -> list[SuitePrompt]:
    """Prompts from JSONL text; blank lines are skipped, anything else wrong raises SuiteFormatError."""
    prompts: list[SuitePrompt] = []
    seen: dict[str, int] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise SuiteFormatError(f"{source} line {number}: not valid JSON ({error.msg})", number) from None
        if not isinstance(record, dict):
            raise SuiteFormatError(f"{source} line {number}: expected a JSON object, got {type(record).__name__}",
                                   number)
        try:
            prompts.append(_prompt_from(record, seen, number))
        except _Invalid as error:
            raise SuiteFormatError(f"{source} line {number}: field {error.field!r}: {error}", number,
                                   error.field) from None
    if not prompts:
        raise SuiteFormatError(f"{source}: no prompts")
    return prompts


def load_suite(path: str | Path | None = None) -> list[SuitePrompt]:
    """The prompts of a JSONL suite file (the built-in suite when `path` is None), validated line by line."""
    path = Path(path) if path is not None else BUILTIN_SUITE
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise SuiteFormatError(f"{path}: cannot read suite ({error.strerror or error})") from None
    return parse_suite(text, str(path))


# --- the built-in suite ---------------------------------------------------------------------------------------


def _content_key(expectation: dict) -> tuple:
    """What a scene shows, independent of object order and of how the relation is worded."""
    objects = tuple(sorted((o["shape"], o["color"], o["count"]) for o in expectation["objects"]))
    relation = expectation["relation"]
    if relation is None:
        return objects, None
    a, b = ((relation[side]["shape"], relation[side]["color"]) for side in ("a", "b"))
    word = relation["relation"]
    if word in ("right of", "below"):
        a, b, word = b, a, _OPPOSITE[word]
    return objects, (a, word, b)


def _balance_key(scene: Scene) -> object:
    """Scenes are spread evenly over this: the relation of position scenes, the number of counting ones."""
    if scene.kind == "position":
        return scene.relation
    if scene.kind == "counting":
        return len(scene.objects)
    return None


def builtin_scene_seeds(kind: str, n: int = BUILTIN_SCENES_PER_KIND) -> list[int]:
    """The first `n` seeds from the kind's range that show distinct content, balanced over `_balance_key`."""
    groups = {"position": len(RELATIONS), "counting": 2}.get(kind, 1)
    quota = -(-n // groups)
    seeds: list[int] = []
    seen: set[tuple] = set()
    per_group: dict[object, int] = {}
    seed = _BUILTIN_FIRST_SEED[kind]
    while len(seeds) < n:
        _, scene = make_scene(seed, kind=kind)
        key, group = _content_key(scene.expectation()), _balance_key(scene)
        if key not in seen and per_group.get(group, 0) < quota:
            seen.add(key)
            per_group[group] = per_group.get(group, 0) + 1
            seeds.append(seed)
        seed += 1
    return seeds


def builtin_prompts() -> list[SuitePrompt]:
    """The built-in suite: every category's scenes with a training phrasing, then with a held-out phrasing."""
    seeds = {kind: builtin_scene_seeds(kind) for kind in KINDS}
    prompts = []
    for phrasing in ("in_template", "heldout"):
        suffix = "-heldout" if phrasing == "heldout" else ""
        for kind in KINDS:
            for number, seed in enumerate(seeds[kind], start=1):
                _, scene = make_scene(seed, kind=kind, heldout=phrasing == "heldout")
                prompts.append(SuitePrompt(f"{kind}-{number:03d}{suffix}", scene.caption, kind,
                                           scene.expectation(), (kind, phrasing), seed))
    return prompts


def format_suite(prompts: list[SuitePrompt]) -> str:
    """Prompts as JSONL text, one compact line each."""
    return "".join(json.dumps(p.to_json(), separators=(",", ":")) + "\n" for p in prompts)


def write_builtin_suite(path: Path = BUILTIN_SUITE) -> Path:
    """Regenerate the built-in suite file from the scene generator."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(format_suite(builtin_prompts()), encoding="utf-8")
    return path
