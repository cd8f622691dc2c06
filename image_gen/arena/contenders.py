"""Who battles in the arena: the configured contenders (`arena_contenders`), or by default every registered model
at each of its presets, checked against the registry when the server starts."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from image_gen.errors import ImageGenError
from image_gen.settings import ArenaContender
from pipelines.errors import InvalidParamsError
from pipelines.params import GenerationParams, ModelInfo

PRESETS = ("speed", "quality")
_SETTINGS = ("steps", "guidance_scale", "scheduler", "width", "height", "negative_prompt")


def default_contenders(models: Sequence[ModelInfo]) -> list[ArenaContender]:
    """`<model>@speed` and `<model>@quality` for every model: the two settings a designer picks between in the
    studio. A preset that resolves to the same request as an earlier one of its model is left out."""
    contenders = []
    for model in models:
        seen: list[dict[str, Any]] = []
        for preset in PRESETS:
            values = {key: value for key, value in model.presets.get(preset, {}).items() if key in _SETTINGS}
            try:
                resolved = model.resolve(GenerationParams(prompt="x", seed=0, **values)).model_dump()
            except (InvalidParamsError, ValueError):  # a preset the model itself refuses: not a contender
                continue
            if resolved in seen:
                continue
            seen.append(resolved)
            name = f"{model.name}@{preset}"
            contenders.append(ArenaContender(name=name[:64], model=model.name, **values))
    return contenders


def check_contenders(
    contenders: Sequence[ArenaContender], resolve: Callable[[ArenaContender], object]
) -> list[ArenaContender]:
    """The contenders, if their names are unique and `resolve` (which builds a contender's request) accepts each;
    ImageGenError naming the contender and the problem otherwise."""
    names = [contender.name for contender in contenders]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ImageGenError(
            f"arena contender names must be unique: {', '.join(duplicates)} appear more than once",
            param="arena_contenders",
        )
    for contender in contenders:
        try:
            resolve(contender)
        except ImageGenError as error:
            raise ImageGenError(
                f"arena contender {contender.name!r}: {error.message}", param="arena_contenders"
            ) from error
    return list(contenders)


def describe(contender: ArenaContender) -> dict[str, Any]:
    """What the reveal shows of a contender: its name, model and the settings it sets."""
    return contender.model_dump(exclude_defaults=True)
