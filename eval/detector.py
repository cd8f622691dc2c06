"""A classical detector for the procedural scenes: coloured shapes found in an image, checked against a prompt.

It scores generated images in GenEval's categories against the ground truth of `pipelines.training.scenes`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import cache

import numpy as np
from PIL import Image, ImageDraw

from pipelines.training.scenes import COLORS, SHAPES, shape_polygon

WORK_SIZE = 128
"""Every image is analysed at this side, the scenes' native size; results are mapped back to the input."""

MIN_AREA = 30
"""Components smaller than this (pixels at WORK_SIZE) are specks, not objects."""

MIN_SHAPE_SCORE = 0.5
"""A region whose best template fits worse than this (soft IoU) is reported with shape UNKNOWN_SHAPE."""

UNKNOWN_SHAPE = "unknown"
"""The shape name of a region that fits no template well enough (never a prompt's shape)."""

POSITION_MARGIN = 0.1
"""As in GenEval: centres must differ by more than this fraction of the two objects' summed extents."""

SUB_SCORES: dict[str, tuple[str, ...]] = {
    "single": ("single_object", "colors"),
    "counting": ("counting",),
    "two_objects": ("two_objects", "color_attribution"),
    "position": ("position", "two_objects", "color_attribution"),
}
"""The sub-scores each prompt category yields; the first is the category's own."""

_COLOR_NAMES = tuple(COLORS)
_PALETTE = np.array([COLORS[name] for name in _COLOR_NAMES], dtype=np.float32)
_FOREGROUND_FLOOR = 30.0  # RGB distance from the background below which a pixel is never foreground
_COLOR_ALPHA = 0.35  # a pixel joins an object when at least this far along the ray background -> colour
_CORE_ALPHA = 0.7  # pixels this far along their ray decide an object's colour
_SPLIT_SHARE = 0.15  # a second colour with this share of a blob's core becomes its own object
_SPLIT_BELOW_IOU = 0.72  # a blob that fits no shape this well may be two touching objects
_SUPERSAMPLE = 4
_STRETCH = (0.92, 1.09)  # a template's width:height may differ from the shape's by this factor (squared)
_TEMPLATE_BLURS = 2  # templates are also compared blurred this many times by [1, 2, 1] / 4


@dataclass(frozen=True)
class Detection:
    """One object found: its shape and colour names, box (x0, y0, x1, y1) and centre in input pixels."""

    shape: str
    color: str
    box: tuple[float, float, float, float]
    center: tuple[float, float]
    area: float
    score: float
    """Soft IoU of the object's mask with its shape's template (1.0 is a perfect fit)."""


@dataclass(frozen=True)
class CheckResult:
    """`passed` is the prompt category's own sub-score; `details["scores"]` holds every sub-score that applies."""

    category: str
    passed: bool
    details: dict


# --- pixels: background model, foreground, colour rays -------------------------------------------------------


def _as_work_array(image: Image.Image) -> np.ndarray:
    rgb = image.convert("RGB")
    if rgb.size != (WORK_SIZE, WORK_SIZE):
        rgb = rgb.resize((WORK_SIZE, WORK_SIZE), Image.BILINEAR if min(rgb.size) < WORK_SIZE else Image.BOX)
    return np.asarray(rgb, dtype=np.float32)


@cache
def _quadratic_basis(h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    xx, yy = xx / w - 0.5, yy / h - 0.5
    return np.stack([np.ones_like(xx), xx, yy, xx * yy, xx * xx, yy * yy], axis=-1)


def estimate_background(rgb: np.ndarray) -> np.ndarray:
    """A smooth (quadratic per channel) background fitted robustly to the pixels that are not objects."""
    h, w, _ = rgb.shape
    basis = _quadratic_basis(h, w)
    sample_basis, sample = basis[::2, ::2].reshape(-1, 6), rgb[::2, ::2].reshape(-1, 3).astype(np.float64)
    coef = np.zeros((6, 3))
    coef[0] = np.median(sample, axis=0)
    for threshold in (50.0, 40.0, 32.0):
        keep = np.linalg.norm(sample - sample_basis @ coef, axis=1) < threshold
        if keep.sum() < 20 * basis.shape[-1]:
            break
        chosen = sample_basis[keep]
        coef = np.linalg.solve(chosen.T @ chosen + 1e-6 * np.eye(6), chosen.T @ sample[keep])
    return (basis.reshape(-1, 6) @ coef).astype(np.float32).reshape(h, w, 3)


def _blur3(values: np.ndarray) -> np.ndarray:
    """A separable [1, 2, 1] / 4 blur over the first two axes (edges replicated)."""
    for axis in (0, 1):
        before = np.concatenate([values.take([0], axis), values.take(range(values.shape[axis] - 1), axis)], axis)
        after = np.concatenate([values.take(range(1, values.shape[axis]), axis), values.take([-1], axis)], axis)
        values = (before + 2 * values + after) / 4
    return values


def _color_rays(diff: np.ndarray, background: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per pixel (rows of n x 3): the palette colour whose ray from the background best explains it, how far along."""
    rays = _PALETTE[None] - background[:, None]
    alpha = np.einsum("nc,nkc->nk", diff, rays) / np.maximum(np.einsum("nkc,nkc->nk", rays, rays), 1.0)
    alpha = np.clip(alpha, 0.0, 1.5)
    residual = np.square(diff[:, None] - alpha[..., None] * rays).sum(axis=-1)
    best = residual.argmin(axis=-1)
    return best, alpha[np.arange(len(best)), best]


# --- binary morphology and connected components in numpy ------------------------------------------------------


def _neighbourhood(values: np.ndarray, fill: float | bool, reduce: str) -> np.ndarray:
    padded = np.pad(values, 1, constant_values=fill)
    h, w = values.shape
    windows = [padded[dy : dy + h, dx : dx + w] for dy in range(3) for dx in range(3)]
    return getattr(np, reduce).reduce(windows)


def _dilate(mask: np.ndarray, steps: int = 1) -> np.ndarray:
    for _ in range(steps):
        mask = _neighbourhood(mask, False, "logical_or")
    return mask


def _erode(mask: np.ndarray, steps: int = 1) -> np.ndarray:
    for _ in range(steps):
        mask = _neighbourhood(mask, False, "logical_and")
    return mask


def label_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """8-connected components of `mask` as labels 1..n (0 is background), by min-label propagation."""
    h, w = mask.shape
    outside = h * w
    labels = np.where(mask, np.arange(h * w).reshape(h, w), outside)
    while True:
        spread = np.where(mask, _neighbourhood(labels, outside, "minimum"), outside)
        flat = np.append(spread.ravel(), outside)
        spread = np.where(mask, flat[spread], outside)  # pointer jumping: adopt the label's own label
        if np.array_equal(spread, labels):
            break
        labels = spread
    roots, dense = np.unique(labels, return_inverse=True)
    dense = dense.reshape(h, w) + 1
    dense[~mask] = 0
    return dense, len(roots) - (1 if outside in roots else 0)


def _grow(seeds: np.ndarray, within: np.ndarray) -> np.ndarray:
    """Give every pixel of `within` the label of the nearest seed region (geodesic, 8-connected)."""
    labels = np.where(within, seeds, 0)
    while True:
        empty = within & (labels == 0)
        if not empty.any():
            return labels
        grown = _neighbourhood(labels, 0, "maximum")
        step = empty & (grown > 0)
        if not step.any():
            return labels
        labels = np.where(step, grown, labels)


# --- shapes: templates drawn with the scenes' own polygons -----------------------------------------------------


@cache
def _unit_outline(shape: str) -> tuple[tuple[float, float], ...] | None:
    """The shape's polygon scaled so that its own extent is the unit square (None: an ellipse)."""
    polygon = shape_polygon(shape, 0.0, 0.0, 1.0)
    if polygon is None:
        return None
    xs, ys = zip(*polygon, strict=True)
    x0, y0, x1, y1 = min(xs), min(ys), max(xs), max(ys)
    return tuple(((x - x0) / (x1 - x0), (y - y0) / (y1 - y0)) for x, y in polygon)


def shape_template(shape: str, box: tuple[float, float, float, float], height: int, width: int) -> np.ndarray:
    """Coverage in [0, 1] of `shape` filling `box` (pixel edges), on a height x width grid."""
    canvas = Image.new("L", (width * _SUPERSAMPLE, height * _SUPERSAMPLE), 0)
    draw = ImageDraw.Draw(canvas)
    x0, y0, x1, y1 = (v * _SUPERSAMPLE for v in box)
    outline = _unit_outline(shape)
    if outline is None:
        draw.ellipse((x0, y0, x1, y1), fill=255)
    else:
        draw.polygon([(x0 + u * (x1 - x0), y0 + v * (y1 - y0)) for u, v in outline], fill=255)
    cover = np.asarray(canvas, dtype=np.float32).reshape(height, _SUPERSAMPLE, width, _SUPERSAMPLE)
    return cover.mean(axis=(1, 3)) / 255.0


def _soft_iou(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.minimum(a, b).sum() / max(np.maximum(a, b).sum(), 1e-6))


@cache
def _unit_moments(shape: str) -> tuple[float, float, float, float]:
    """Centroid and standard deviation (x, y) of the shape's area, in units of its extent."""
    side = 256
    cx, cy, sx, sy = _moments(shape_template(shape, (0.0, 0.0, float(side), float(side)), side, side))
    return cx / side, cy / side, sx / side, sy / side


def _moments(coverage: np.ndarray) -> tuple[float, float, float, float]:
    height, width = coverage.shape
    total = max(float(coverage.sum()), 1e-6)
    xs, ys = np.arange(width) + 0.5, np.arange(height) + 0.5
    px, py = coverage.sum(axis=0) / total, coverage.sum(axis=1) / total
    cx, cy = float(px @ xs), float(py @ ys)
    return cx, cy, float(np.sqrt(px @ (xs - cx) ** 2)), float(np.sqrt(py @ (ys - cy) ** 2))


def classify_shape(coverage: np.ndarray) -> tuple[str, float, tuple[float, float, float, float]]:
    """The best-fitting shape for a soft mask, its soft IoU, and the box its template filled.

    Each shape's template is placed by matching its centroid and spread to the mask's (robust to blur and
    to noisy edges) and compared sharp and blurred, so that a soft generated image still finds its shape.
    """
    height, width = coverage.shape
    cx, cy, sx, sy = _moments(coverage)
    best, best_score, best_box = SHAPES[0], -1.0, (0.0, 0.0, 0.0, 0.0)
    for shape in SHAPES:
        ux, uy, usx, usy = _unit_moments(shape)
        w, h = sx / usx, sy / usy
        # Stretch within a little of the shape's own proportions only: a long ellipse is no circle.
        scale, stretch = np.sqrt(w * h), np.clip(np.sqrt(w / max(h, 1e-6)), *_STRETCH)
        w, h = scale * stretch, scale / stretch
        box = (cx - ux * w, cy - uy * h, cx + (1 - ux) * w, cy + (1 - uy) * h)
        template = shape_template(shape, box, height, width)
        for _ in range(_TEMPLATE_BLURS + 1):
            score = _soft_iou(coverage, template)
            if score > best_score:
                best, best_score, best_box = shape, score, box
            template = _blur3(template)
    return best, best_score, best_box


# --- objects --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Pixels:
    """One image at WORK_SIZE: colours, fitted background, each pixel's colour and position on its ray."""

    rgb: np.ndarray
    background: np.ndarray
    colour: np.ndarray  # palette index of the ray that best explains the pixel
    alpha: np.ndarray  # how far along that ray (0 background, 1 the pure colour)
    core: np.ndarray  # foreground pixels far enough along their ray to decide an object's colour


def _analyse(rgb: np.ndarray) -> tuple[_Pixels, np.ndarray]:
    """The per-pixel analysis and the foreground mask."""
    background = estimate_background(rgb)
    diff = _blur3(rgb - background)
    distance = np.linalg.norm(diff, axis=-1)
    quiet = distance <= np.percentile(distance, 60)
    threshold = max(_FOREGROUND_FLOOR, 1.5 * float(np.percentile(distance[quiet], 99)))
    candidates = distance >= _FOREGROUND_FLOOR
    colour = np.zeros(distance.shape, dtype=np.int64)
    alpha = np.zeros(distance.shape, dtype=np.float32)
    colour[candidates], alpha[candidates] = _color_rays(diff[candidates], background[candidates])
    foreground = candidates & ((distance >= threshold) | (alpha >= _COLOR_ALPHA))
    return _Pixels(rgb, background, colour, alpha, foreground & (alpha >= _CORE_ALPHA)), foreground


def _blobs(pixels: _Pixels, foreground: np.ndarray) -> list[tuple[np.ndarray, int]]:
    """Object-sized connected regions of one colour each: (mask, palette index)."""
    regions, count = label_components(foreground)
    blobs = []
    for index in range(1, count + 1):
        region = regions == index
        if region.sum() < MIN_AREA:
            continue
        votes = np.bincount(pixels.colour[region & pixels.core], minlength=len(_COLOR_NAMES))
        if votes.sum() == 0:
            votes = np.bincount(pixels.colour[region], minlength=len(_COLOR_NAMES))
        shares = votes / votes.sum()
        kept = [int(k) for k in np.argsort(-votes) if shares[k] >= _SPLIT_SHARE and votes[k] >= MIN_AREA // 3]
        if len(kept) <= 1:
            blobs.append((region, int(votes.argmax())))
            continue
        # Differently coloured objects that touch: each colour's core claims the pixels nearest to it.
        seeds = np.zeros(region.shape, dtype=np.int64)
        for new, k in enumerate(kept, start=1):
            seeds[region & pixels.core & (pixels.colour == k)] = new
        parts = _grow(seeds, region)
        blobs.extend((parts == new, k) for new, k in enumerate(kept, start=1) if (parts == new).sum() >= MIN_AREA)
    return blobs


@dataclass(frozen=True)
class _Fit:
    coverage: np.ndarray  # soft mask at WORK_SIZE
    shape: str
    score: float
    box: tuple[float, float, float, float]


def _fit(mask: np.ndarray, others: np.ndarray, pixels: _Pixels) -> _Fit:
    """Soft coverage of one object (each pixel's position on the ray background -> its colour) and its shape."""
    near = _dilate(mask, 2) & ~others
    core = pixels.core & mask if (pixels.core & mask).sum() >= 4 else mask
    ray = np.median(pixels.rgb[core], axis=0)[None, None] - pixels.background
    along = np.einsum("hwc,hwc->hw", pixels.rgb - pixels.background, ray)
    coverage = np.where(near, np.clip(along / np.maximum(np.einsum("hwc,hwc->hw", ray, ray), 1.0), 0.0, 1.0), 0.0)
    rows, cols = np.nonzero(near)
    top, left = rows.min(), cols.min()
    shape, score, (x0, y0, x1, y1) = classify_shape(coverage[top : rows.max() + 1, left : cols.max() + 1])
    return _Fit(coverage, shape, score, (x0 + left, y0 + top, x1 + left, y1 + top))


def _split_touching(mask: np.ndarray, pixels: _Pixels) -> list[np.ndarray]:
    """The parts that erosion of the blob's solid pixels separates it into (touching objects), else the blob."""
    eroded = mask & (pixels.alpha >= 0.5)
    while eroded.sum() >= MIN_AREA // 3:
        cores, count = label_components(eroded)
        sizes = np.bincount(cores.ravel(), minlength=count + 1)[1:]
        big = [i + 1 for i, size in enumerate(sizes) if size >= MIN_AREA // 3]
        if len(big) >= 2:
            seeds = np.zeros_like(cores)
            for new, old in enumerate(big, start=1):
                seeds[cores == old] = new
            parts = _grow(seeds, mask)
            return [parts == new for new in range(1, len(big) + 1)]
        eroded = _erode(eroded)
    return [mask]


def _fits(mask: np.ndarray, others: np.ndarray, pixels: _Pixels) -> list[_Fit]:
    """One fit for the blob, or one per part when no shape fits it whole and every part fits better."""
    whole = _fit(mask, others, pixels)
    if whole.score >= _SPLIT_BELOW_IOU:
        return [whole]
    parts = _split_touching(mask, pixels)
    if len(parts) < 2:
        return [whole]
    fits = [_fit(part, others | (mask & ~part), pixels) for part in parts]
    return fits if min(fit.score for fit in fits) > whole.score else [whole]


def detect(image: Image.Image) -> list[Detection]:
    """Every coloured shape in `image`, largest first; boxes, centres and areas are in the input's pixels."""
    pixels, foreground = _analyse(_as_work_array(image))
    blobs = _blobs(pixels, foreground)
    taken = np.zeros(foreground.shape, dtype=bool)
    for mask, _ in blobs:
        taken |= mask
    sx, sy = image.width / WORK_SIZE, image.height / WORK_SIZE
    detections = []
    for mask, colour in blobs:
        for fit in _fits(mask, taken & ~mask, pixels):
            x0, y0, x1, y1 = (float(v) for v in fit.box)
            detections.append(Detection(
                shape=fit.shape if fit.score >= MIN_SHAPE_SCORE else UNKNOWN_SHAPE,
                color=_COLOR_NAMES[colour],
                box=(round(x0 * sx, 2), round(y0 * sy, 2), round(x1 * sx, 2), round(y1 * sy, 2)),
                center=(round((x0 + x1) / 2 * sx, 2), round((y0 + y1) / 2 * sy, 2)),
                area=round(float(fit.coverage.sum()) * sx * sy, 2),
                score=round(float(fit.score), 4),
            ))
    return sorted(detections, key=lambda d: -d.area)


# --- checks against a prompt's expectation --------------------------------------------------------------------


def _matches(detection: Detection, spec: dict) -> bool:
    return detection.shape == spec["shape"] and detection.color == spec["color"]


def _largest(detections: list[Detection], spec: dict) -> Detection | None:
    return next((d for d in detections if _matches(d, spec)), None)


def _relation_holds(a: Detection, b: Detection, relation: str) -> tuple[bool, float]:
    """Whether a is `relation` b, and a's centre minus b's along the relation's axis (in pixels)."""
    axis = 0 if relation in ("left of", "right of") else 1
    offset = a.center[axis] - b.center[axis]
    extents = (a.box[axis + 2] - a.box[axis]) + (b.box[axis + 2] - b.box[axis])
    margin = POSITION_MARGIN * extents
    return (offset < -margin if relation in ("left of", "above") else offset > margin), offset


def score_detections(detections: list[Detection], expectation: dict) -> CheckResult:
    """Score what was detected against a prompt's expectation (`Scene.expectation()`): every sub-score."""
    category = expectation["category"]
    if category not in SUB_SCORES:
        raise ValueError(f"unknown category {category!r}; expected one of {', '.join(SUB_SCORES)}")
    detections = sorted(detections, key=lambda d: -d.area)
    specs = expectation["objects"]
    scores: dict[str, bool] = {}
    details: dict = {"detections": [asdict(d) for d in detections]}
    if category == "single":
        spec = specs[0]
        scores["single_object"] = _largest(detections, spec) is not None
        # The main object: the largest of the prompt's shape, else the largest of any shape.
        main = next((d for d in detections if d.shape == spec["shape"]), detections[0] if detections else None)
        scores["colors"] = main is not None and main.color == spec["color"]
        details["main_color"] = main.color if main else None
    elif category == "counting":
        spec = specs[0]
        details["counted"] = sum(_matches(d, spec) for d in detections)
        scores["counting"] = details["counted"] == spec["count"]
    else:
        present = all(sum(_matches(d, spec) for d in detections) >= spec["count"] for spec in specs)
        # Attribution fails when a prompt's colour shows up on another of the prompt's shapes (a swap or a bleed).
        details["swapped"] = [
            asdict(d) for d in detections for spec in specs for other in specs
            if other["shape"] != spec["shape"] and d.shape == spec["shape"] and d.color == other["color"]
        ]
        scores["two_objects"] = present
        scores["color_attribution"] = present and not details["swapped"]
        if category == "position":
            relation = expectation["relation"]
            a, b = _largest(detections, relation["a"]), _largest(detections, relation["b"])
            scores["position"] = False
            if a is not None and b is not None:
                scores["position"], details["offset"] = _relation_holds(a, b, relation["relation"])
    details["scores"] = {name: bool(scores[name]) for name in SUB_SCORES[category]}
    return CheckResult(category, details["scores"][SUB_SCORES[category][0]], details)


def check(image: Image.Image, expectation: dict) -> CheckResult:
    """Detect the objects in `image` and score them against `expectation` in its category's sub-scores."""
    return score_detections(detect(image), expectation)
