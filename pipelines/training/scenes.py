"""Deterministic procedural scenes: coloured shapes with captions and structured ground truth.

The same seed always gives the same images, captions and ground truth; the evaluation suite reads the
ground truth (objects, colours, boxes, relations) to check generated images against their prompts.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import random
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field

import numpy as np
from PIL import Image, ImageDraw

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross")

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (245, 140, 20),
    "yellow": (240, 220, 30),
    "green": (40, 170, 60),
    "blue": (35, 75, 225),
    "purple": (135, 50, 185),
    "pink": (250, 130, 190),
    "white": (250, 250, 250),
}

SIZES: dict[str, float] = {"small": 0.26, "large": 0.40}
"""Object extent as a fraction of the image side. At 0.16 (20 px at 128 px) the points of a small star do not
survive an 8x-downsampling autoencoder: the detector read 18% of small stars in VAE reconstructions as blobs."""

SCENE_VERSION = 2
"""Bumped whenever the same seed renders a different scene, so that cached datasets are rebuilt."""

RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")

BACKGROUNDS: tuple[str, ...] = ("plain", "gradient", "stripes", "checker", "grain")

# Muted background tones that stay far (in RGB) from every object colour.
BACKGROUND_TONES: tuple[tuple[int, int, int], ...] = (
    (128, 128, 128),
    (92, 100, 108),
    (150, 140, 120),
    (70, 80, 70),
    (110, 95, 110),
)

KINDS: tuple[str, ...] = ("single", "counting", "two_objects", "position")
KIND_WEIGHTS: tuple[float, ...] = (0.25, 0.2, 0.2, 0.35)

NUMBER_WORDS = {1: "one", 2: "two", 3: "three"}

# Phrasings seen in training; the evaluation's held-out set uses HELDOUT_* instead.
SHAPE_WORDS = {
    "circle": ("circle", "disc"),
    "square": ("square",),
    "triangle": ("triangle",),
    "star": ("star",),
    "cross": ("cross", "plus sign"),
}
SHAPE_PLURALS = {"circle": "circles", "disc": "discs", "square": "squares", "triangle": "triangles",
                 "star": "stars", "cross": "crosses", "plus sign": "plus signs", "round dot": "round dots", "box": "boxes",
                 "pyramid shape": "pyramid shapes", "five-pointed star": "five-pointed stars",
                 "x-shaped cross": "x-shaped crosses"}
RELATION_WORDS = {
    "left of": ("to the left of", "left of"),
    "right of": ("to the right of", "right of"),
    "above": ("above", "over"),
    "below": ("below", "under"),
}
HELDOUT_SHAPE_WORDS = {"circle": "round dot", "square": "box", "triangle": "pyramid shape",
                       "star": "five-pointed star", "cross": "x-shaped cross"}
HELDOUT_RELATION_WORDS = {"left of": "on the left side of", "right of": "on the right side of",
                          "above": "on top of", "below": "underneath"}


@dataclass
class SceneObject:
    shape: str
    color: str
    size: str
    box: tuple[int, int, int, int]
    """Pixel box (x0, y0, x1, y1) in the rendered image."""

    @property
    def center(self) -> tuple[float, float]:
        x0, y0, x1, y1 = self.box
        return ((x0 + x1) / 2, (y0 + y1) / 2)


@dataclass
class Scene:
    """One image's ground truth: what the caption promises and where each object is."""

    kind: str
    objects: list[SceneObject]
    relation: str | None
    """For kind "position": objects[0] <relation> objects[1]."""
    background: str
    background_tone: tuple[int, int, int]
    caption: str
    size: int = 128
    seed: int = 0
    extras: dict = field(default_factory=dict)

    def expectation(self) -> dict:
        """The structured expectation the evaluation suite checks a generated image against."""
        return scene_expectation(self.kind, self.objects, self.relation)

    def to_json(self) -> dict:
        data = asdict(self)
        data["expectation"] = self.expectation()
        return data


def scene_expectation(kind: str, objects: list[SceneObject], relation: str | None) -> dict:
    groups: dict[tuple[str, str], int] = {}
    for obj in objects:
        groups[(obj.color, obj.shape)] = groups.get((obj.color, obj.shape), 0) + 1
    return {
        "category": kind,
        "objects": [{"shape": s, "color": c, "count": n} for (c, s), n in groups.items()],
        "relation": (
            {"a": {"shape": objects[0].shape, "color": objects[0].color}, "relation": relation,
             "b": {"shape": objects[1].shape, "color": objects[1].color}}
            if relation else None
        ),
    }


def shape_polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    if shape == "square":
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)]
    if shape == "star":
        points = []
        for k in range(10):
            radius = r if k % 2 == 0 else r * 0.45
            angle = -math.pi / 2 + k * math.pi / 5
            points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
        return points
    if shape == "cross":
        w = r * 0.36
        return [(cx - w, cy - r), (cx + w, cy - r), (cx + w, cy - w), (cx + r, cy - w), (cx + r, cy + w),
                (cx + w, cy + w), (cx + w, cy + r), (cx - w, cy + r), (cx - w, cy + w), (cx - r, cy + w),
                (cx - r, cy - w), (cx - w, cy - w)]
    return None


def _draw_background(kind: str, tone: tuple[int, int, int], size: int, rng: random.Random) -> Image.Image:
    base = np.empty((size, size, 3), dtype=np.float32)
    base[:] = tone
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    if kind == "gradient":
        direction = rng.choice([xx, yy, (xx + yy) / 2])
        base += (direction[..., None] - 0.5) * 40
    elif kind == "stripes":
        period = rng.choice([8, 12, 16]) * size / 128
        coord = xx if rng.random() < 0.5 else yy
        base += (((coord * size) // period) % 2 == 0)[..., None] * 14 - 7
    elif kind == "checker":
        cell = rng.choice([12, 16, 24]) * size / 128
        check = (((xx * size) // cell + (yy * size) // cell) % 2 == 0)
        base += check[..., None] * 14 - 7
    elif kind == "grain":
        noise = np.random.default_rng(rng.getrandbits(32)).normal(0, 6, (size, size, 1))
        base += noise.astype(np.float32)
    return Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))


def _render(objects: list[SceneObject], background: Image.Image, supersample: int = 4) -> Image.Image:
    size = background.width
    big = background.resize((size * supersample, size * supersample), Image.NEAREST)
    draw = ImageDraw.Draw(big)
    for obj in objects:
        x0, y0, x1, y1 = (v * supersample for v in obj.box)
        cx, cy, r = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2
        fill = COLORS[obj.color]
        polygon = shape_polygon(obj.shape, cx, cy, r)
        if polygon is None:
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        else:
            draw.polygon(polygon, fill=fill)
    return big.resize((size, size), Image.LANCZOS)


def _boxes_overlap(a: tuple[int, ...], b: tuple[int, ...], margin: int) -> bool:
    return not (a[2] + margin <= b[0] or b[2] + margin <= a[0] or a[3] + margin <= b[1] or b[3] + margin <= a[1])


def _place(rng: random.Random, extent: int, size: int, region: tuple[float, float, float, float],
           taken: list[tuple[int, ...]], margin: int) -> tuple[int, int, int, int] | None:
    """A box of side `extent` whose centre lies in `region` (fractions x0, y0, x1, y1), clear of `taken`."""
    half = extent / 2
    for _ in range(60):
        cx = rng.uniform(max(region[0] * size, half + 2), min(region[2] * size, size - half - 2))
        cy = rng.uniform(max(region[1] * size, half + 2), min(region[3] * size, size - half - 2))
        box = (round(cx - half), round(cy - half), round(cx - half) + extent, round(cy - half) + extent)
        if all(not _boxes_overlap(box, other, margin) for other in taken):
            return box
    return None


def _pick_objects(rng: random.Random, kind: str, size: int) -> tuple[list[SceneObject], str | None]:
    margin = max(2, size // 32)

    def extent(size_name: str) -> int:
        return round(SIZES[size_name] * size * rng.uniform(0.9, 1.1))

    if kind in ("single", "counting"):
        shape, color = rng.choice(SHAPES), rng.choice(list(COLORS))
        count = 1 if kind == "single" else rng.choice((2, 3))
        size_name = rng.choice(list(SIZES)) if count < 3 else "small"
        objects, taken = [], []
        for _ in range(count):
            box = _place(rng, extent(size_name), size, (0, 0, 1, 1), taken, margin * 2)
            if box is None:
                return [], None
            taken.append(box)
            objects.append(SceneObject(shape, color, size_name, box))
        return objects, None

    # Two different objects: distinct in colour and shape so the caption binds each colour to one shape.
    shape_a, shape_b = rng.sample(SHAPES, 2)
    color_a, color_b = rng.sample(list(COLORS), 2)
    size_a, size_b = rng.choice(list(SIZES)), rng.choice(list(SIZES))
    relation = rng.choice(RELATIONS)
    if kind == "position":
        # Object a sits clearly on its side of b: centres separated along the relation's axis.
        regions = {
            "left of": ((0.0, 0.15, 0.42, 0.85), (0.58, 0.15, 1.0, 0.85)),
            "right of": ((0.58, 0.15, 1.0, 0.85), (0.0, 0.15, 0.42, 0.85)),
            "above": ((0.15, 0.0, 0.85, 0.42), (0.15, 0.58, 0.85, 1.0)),
            "below": ((0.15, 0.58, 0.85, 1.0), (0.15, 0.0, 0.85, 0.42)),
        }[relation]
    else:
        relation = None
        regions = ((0, 0, 1, 1), (0, 0, 1, 1))
    box_a = _place(rng, extent(size_a), size, regions[0], [], margin)
    box_b = _place(rng, extent(size_b), size, regions[1], [box_a] if box_a else [], margin * 2)
    if box_a is None or box_b is None:
        return [], None
    return [SceneObject(shape_a, color_a, size_a, box_a), SceneObject(shape_b, color_b, size_b, box_b)], relation


def _noun(rng: random.Random, obj_shape: str, heldout: bool) -> str:
    if heldout:
        return HELDOUT_SHAPE_WORDS[obj_shape]
    return rng.choice(SHAPE_WORDS[obj_shape])


def _phrase(rng: random.Random, obj: SceneObject, heldout: bool, with_size: bool) -> str:
    noun = _noun(rng, obj.shape, heldout)
    adjectives = f"{obj.size} {obj.color}" if with_size else obj.color
    article = "an" if adjectives[0] in "aeiou" else "a"
    return f"{article} {adjectives} {noun}"


def caption_for(kind: str, objects: list[SceneObject], relation: str | None, background: str,
                rng: random.Random, heldout: bool = False) -> str:
    """A caption from several templates, synonyms and word orders (or the held-out phrasings)."""
    with_size = rng.random() < 0.3
    if kind == "single":
        phrase = _phrase(rng, objects[0], heldout, with_size)
        templates = (
            ["{p}", "{p} on a {bg} background", "a picture of {p}", "an image showing {p}"]
            if not heldout else ["there is {p} in the picture", "{p}, centered somewhere in the frame"]
        )
        text = rng.choice(templates).format(p=phrase, bg=background)
    elif kind == "counting":
        obj = objects[0]
        noun = _noun(rng, obj.shape, heldout)
        plural = SHAPE_PLURALS.get(noun, noun + "s")
        number = NUMBER_WORDS[len(objects)]
        if len(objects) == 1:
            text = f"one {obj.color} {noun}"
        elif heldout:
            text = rng.choice([f"exactly {number} {plural}, all {obj.color}", f"a group of {number} {obj.color} {plural}"])
        else:
            text = rng.choice([f"{number} {obj.color} {plural}", f"{number} {obj.color} {plural} on a {background} background",
                               f"a picture of {number} {obj.color} {plural}"])
    elif kind == "two_objects":
        a, b = (_phrase(rng, o, heldout, with_size) for o in objects)
        if rng.random() < 0.5:
            a, b = b, a
        templates = (["{a} and {b}", "{a} next to {b}", "a picture of {a} and {b}"]
                     if not heldout else ["both {a} as well as {b}", "{a} together with {b}"])
        text = rng.choice(templates).format(a=a, b=b)
    else:
        a, b = (_phrase(rng, o, heldout, with_size) for o in objects)
        words = HELDOUT_RELATION_WORDS[relation] if heldout else rng.choice(RELATION_WORDS[relation])
        if heldout:
            text = rng.choice([f"{a} sits {words} {b}", f"{b}, with {a} {words} it"])
        else:
            text = rng.choice([f"{a} {words} {b}", f"{a} {words} {b} on a {background} background",
                               f"a picture of {a} {words} {b}"])
    return text


# --- training paraphrases ---------------------------------------------------------------------------------------
# More ways to say what a scene shows than `caption_for`'s templates, for training only (never the evaluation's
# held-out words or templates): with one spelling per concept a UNet learns the spelling; with several it has to read
# the concept from the text encoder's token states, which is what carries it to phrasings it never saw.
PARAPHRASE_SHAPE_WORDS = {
    "circle": ("circle", "disc", "ball", "orb"),
    "square": ("square", "block", "tile"),
    "triangle": ("triangle", "wedge", "three-sided figure"),
    "star": ("star", "starburst", "spiky star"),
    "cross": ("cross", "plus sign", "plus", "cross mark"),
}
PARAPHRASE_PLURALS = {"ball": "balls", "orb": "orbs", "block": "blocks", "tile": "tiles", "wedge": "wedges",
                      "three-sided figure": "three-sided figures", "starburst": "starbursts",
                      "spiky star": "spiky stars", "plus": "pluses", "cross mark": "cross marks"}
PARAPHRASE_RELATION_WORDS = {
    "left of": ("to the left of", "left of", "further left than"),
    "right of": ("to the right of", "right of", "further right than"),
    "above": ("above", "over", "higher up than"),
    "below": ("below", "under", "beneath", "lower down than"),
}
INVERSE_RELATION = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
PARAPHRASE_TEMPLATES = {
    "single": ("{p}", "a drawing of {p}", "{p} on a {bg} background", "a {bg} background with {p}",
               "a simple image of {p}"),
    "counting": ("{number} {color} {plural}", "a drawing of {number} {color} {plural}",
                 "{number} {plural} in {color}", "{color} {plural}, {number} of them",
                 "a {bg} background with {number} {color} {plural}"),
    "two_objects": ("{a} and {b}", "{a} with {b}", "{a}, {b}", "a drawing of {a} and {b}",
                    "a {bg} background with {a} and {b}"),
    "position": ("{a} {words} {b}", "{a} is {words} {b}", "a drawing of {a} {words} {b}",
                 "a {bg} background with {a} {words} {b}"),
}


def paraphrase(kind: str, objects: list[SceneObject], relation: str | None, background: str,
               rng: random.Random) -> str:
    """One caption of the scene in the paraphrase vocabulary. A relation is said either way round ("a left of b"
    or "b right of a"), so the words, not the order of the objects, carry the layout."""

    def phrase(obj: SceneObject) -> str:
        adjectives = f"{obj.size} {obj.color}" if rng.random() < 0.3 else obj.color
        article = "an" if adjectives[0] in "aeiou" else "a"
        return f"{article} {adjectives} {rng.choice(PARAPHRASE_SHAPE_WORDS[obj.shape])}"

    template = rng.choice(PARAPHRASE_TEMPLATES[kind])
    if kind == "single":
        return template.format(p=phrase(objects[0]), bg=background)
    if kind == "counting":
        obj = objects[0]
        noun = rng.choice(PARAPHRASE_SHAPE_WORDS[obj.shape])
        if len(objects) == 1:
            return f"one {obj.color} {noun}"
        plural = PARAPHRASE_PLURALS.get(noun) or SHAPE_PLURALS.get(noun, noun + "s")
        return template.format(number=NUMBER_WORDS[len(objects)], color=obj.color, plural=plural, bg=background)
    a, b = phrase(objects[0]), phrase(objects[1])
    if kind == "two_objects":
        if rng.random() < 0.5:
            a, b = b, a
        return template.format(a=a, b=b, bg=background)
    if rng.random() < 0.5:
        a, b, relation = b, a, INVERSE_RELATION[relation]
    return template.format(a=a, b=b, words=rng.choice(PARAPHRASE_RELATION_WORDS[relation]), bg=background)


def scene_paraphrases(scene: dict, count: int) -> list[str]:
    """`count` paraphrases of a scene (as `Scene.to_json` writes it), the same ones for the same scene."""
    objects = [SceneObject(o["shape"], o["color"], o["size"], tuple(o["box"])) for o in scene["objects"]]
    rng = random.Random(f"paraphrase-{scene['seed']}")
    return [paraphrase(scene["kind"], objects, scene["relation"], scene["background"], rng) for _ in range(count)]

def make_scene(seed: int, size: int = 128, kind: str | None = None, heldout: bool = False) -> tuple[Image.Image, Scene]:
    """Render scene number `seed`: the same seed always gives the same image and caption."""
    rng = random.Random(seed)
    kind = kind or rng.choices(KINDS, KIND_WEIGHTS)[0]
    objects: list[SceneObject] = []
    relation = None
    while not objects:
        objects, relation = _pick_objects(rng, kind, size)
    background = rng.choice(BACKGROUNDS)
    tone = rng.choice(BACKGROUND_TONES)
    image = _render(objects, _draw_background(background, tone, size, rng))
    caption = caption_for(kind, objects, relation, background, rng, heldout)
    return image, Scene(kind, objects, relation, background, tone, caption, size, seed)


def _render_range(start: int, stop: int, seed: int, size: int) -> tuple[np.ndarray, list[Scene]]:
    images = np.empty((stop - start, size, size, 3), dtype=np.uint8)
    scenes = []
    for i in range(start, stop):
        image, scene = make_scene(seed * 1_000_003 + i, size)
        images[i - start] = np.asarray(image)
        scenes.append(scene)
    return images, scenes


def default_workers() -> int:
    """Processes that render a dataset: the CPUs this process may use, at most 16."""
    return max(1, min(16, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


def make_dataset(n: int, seed: int = 0, size: int = 128, workers: int | None = None) -> tuple[np.ndarray, list[Scene]]:
    """`n` scenes as a uint8 array (n, size, size, 3) and their ground truth; deterministic in `seed`.

    Each scene has its own seed, so `workers` processes (default: one per usable CPU) render contiguous ranges
    and the result is the same whatever their number. Below 2,000 scenes one process renders them all."""
    workers = default_workers() if workers is None else workers
    if workers <= 1 or n < 2000:
        return _render_range(0, n, seed, size)
    bounds = np.linspace(0, n, workers * 4 + 1).astype(int)
    images = np.empty((n, size, size, 3), dtype=np.uint8)
    scenes: list[Scene] = []
    # Spawned, not forked: the caller may hold torch's thread pools, which do not survive a fork.
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        parts = pool.map(_render_range, bounds[:-1], bounds[1:], [seed] * (len(bounds) - 1),
                         [size] * (len(bounds) - 1))
        for start, (chunk, chunk_scenes) in zip(bounds[:-1], parts, strict=True):
            images[start:start + len(chunk)] = chunk
            scenes.extend(chunk_scenes)
    return images, scenes
