"""The teacher's recipe: `attention_head_dim` is channels per head (diffusers' argument of that name counts heads),
the shipped teacher's recipe rebuilds its exact layout and is the defaults, training captions mix in paraphrases at
their rate, and a run started under an older recipe resumes only with that recipe."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention

from pipelines.errors import PipelineError
from pipelines.registry import BUNDLED_MODELS_DIR
from pipelines.training.data import CaptionedImages
from pipelines.training.unet import (
    UnetConfig,
    build_unet,
    check_resumable,
    load_unet_config,
    training_captions,
)

RECIPES = Path(__file__).parents[2] / "pipelines" / "training" / "recipes"
RECIPE = RECIPES / "inhouse-shapes.json"
FIRST_RECIPE = RECIPES / "inhouse-shapes-v1.json"  # the first teacher shipped, trained when heads were miscounted


def heads_by_width(unet: UNet2DConditionModel) -> dict[int, set[tuple[int, int]]]:
    """(heads, channels per head) of every attention layer, by the layer's width."""
    found: dict[int, set[tuple[int, int]]] = {}
    for module in unet.modules():
        if isinstance(module, Attention):
            width = module.to_q.out_features
            found.setdefault(width, set()).add((module.heads, width // module.heads))
    return found


def test_attention_head_dim_is_channels_per_head() -> None:
    unet = build_unet(UnetConfig(), latent_channels=16, sample_size=16)
    assert heads_by_width(unet) == {64: {(2, 32)}, 128: {(4, 32)}, 192: {(6, 32)}}
    # Attention at every level, the full-resolution one included.
    assert all(block.startswith("CrossAttn") for block in unet.config.down_block_types + unet.config.up_block_types)


def test_the_shipped_teachers_recipe_rebuilds_its_layout() -> None:
    shipped = UNet2DConditionModel.from_config(
        UNet2DConditionModel.load_config(BUNDLED_MODELS_DIR / "inhouse-shapes" / "unet"))
    recipe = load_unet_config(RECIPE)
    rebuilt = build_unet(recipe, latent_channels=16, sample_size=16)
    assert heads_by_width(rebuilt) == heads_by_width(shipped) == {64: {(2, 32)}, 128: {(4, 32)}, 192: {(6, 32)}}
    assert {name: tensor.shape for name, tensor in rebuilt.state_dict().items()} == {
        name: tensor.shape for name, tensor in shipped.state_dict().items()}
    # The defaults of `image-gen train unet` are the shipped recipe, paraphrases included.
    assert recipe == UnetConfig()


def test_the_first_teachers_recipe_keeps_its_32_heads_at_two_levels() -> None:
    recipe = load_unet_config(FIRST_RECIPE)
    assert heads_by_width(build_unet(recipe, latent_channels=16, sample_size=16)) == {128: {(32, 4)}, 192: {(32, 6)}}
    assert recipe.paraphrase_rate == 0.0


def a_run_with_checkpoint(tmp_path: Path, unet: dict) -> SimpleNamespace:
    (tmp_path / "checkpoint").mkdir()
    (tmp_path / "checkpoint" / "progress.json").write_text(json.dumps({"step": 250}))
    (tmp_path / "config.json").write_text(json.dumps({"unet": unet}))
    return SimpleNamespace(dir=tmp_path, checkpoint_dir=tmp_path / "checkpoint")


def test_a_run_started_when_the_head_size_counted_heads_resumes_only_with_that_layout(tmp_path: Path) -> None:
    recipe = load_unet_config(FIRST_RECIPE)
    # What the first teacher's run wrote: the shipped block types, attention_head_dim 32, no attention_heads.
    written_then = {key: value for key, value in json.loads(json.dumps(recipe.__dict__)).items()
                    if key != "attention_heads"}
    run = a_run_with_checkpoint(tmp_path, written_then)
    check_resumable(run, recipe)  # 32 heads per level, as it was trained
    same_blocks = UnetConfig(down_block_types=recipe.down_block_types, up_block_types=recipe.up_block_types,
                             paraphrase_rate=recipe.paraphrase_rate)
    with pytest.raises(PipelineError, match=r"another UNet \(attention_heads differ\)"):
        check_resumable(run, same_blocks)


@pytest.mark.parametrize(("fields", "message"), [
    ({"attention_head_dim": 48}, "attention_head_dim 48 must divide every entry of block_out_channels [64, 128, 192]"),
    ({"attention_heads": (2, 4)}, "attention_heads needs one entry per level"),
    ({"transformer_layers_per_block": (2, 1)}, "transformer_layers_per_block needs one number, or one per level"),
    ({"transformer_layers_per_block": 0}, "transformer_layers_per_block must be whole numbers of at least 1, got 0"),
])
def test_a_layout_that_does_not_fit_the_levels_is_refused(fields: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        UnetConfig(**fields)


# --- training captions: dropout and paraphrases ----------------------------------------------------------------------


def captions_data(n: int = 64) -> CaptionedImages:
    return CaptionedImages(np.zeros((n, 1, 1, 3), np.uint8), [f"caption {i}" for i in range(n)],
                           [[f"paraphrase {i}a", f"paraphrase {i}b"] for i in range(n)])


def test_paraphrases_replace_captions_at_their_rate_and_dropout_still_applies() -> None:
    data, index = captions_data(), np.arange(64).repeat(40)
    picked = training_captions(data, index, np.random.default_rng(0), dropout=0.1, paraphrase_rate=0.5)
    assert all(text in ("", data.captions[i], *data.paraphrases[i]) for i, text in zip(index, picked, strict=True))
    shares = Counter("dropped" if not t else t.split()[0] for t in picked)
    assert abs(shares["dropped"] / len(picked) - 0.1) < 0.02
    assert abs(shares["paraphrase"] / len(picked) - 0.45) < 0.03
    assert {t[-1] for t in picked if t.startswith("paraphrase")} == {"a", "b"}


def test_at_rate_zero_the_captions_and_random_stream_are_those_of_the_first_teacher() -> None:
    data, index = captions_data(), np.arange(64)
    rng, before = np.random.default_rng(3), np.random.default_rng(3)
    picked = training_captions(data, index, rng, dropout=0.1, paraphrase_rate=0.0)
    # What the first teacher's loop drew: one number per caption, for the dropout.
    assert picked == ["" if before.random() < 0.1 else data.captions[i] for i in index]
    assert rng.random() == before.random()
    # The shipped student's recipe: no dropout, no paraphrases, no random number at all.
    assert training_captions(data, index, rng, dropout=0.0, paraphrase_rate=0.0) == data.captions
    assert rng.random() == before.random()


def test_a_run_started_before_paraphrases_resumes_only_without_them(tmp_path: Path) -> None:
    written_then = {key: value for key, value in json.loads(json.dumps(UnetConfig().__dict__)).items()
                    if key != "paraphrase_rate"}
    run = a_run_with_checkpoint(tmp_path, written_then)
    check_resumable(run, UnetConfig(paraphrase_rate=0.0))
    with pytest.raises(PipelineError, match=r"another UNet \(paraphrase_rate differ\)"):
        check_resumable(run, UnetConfig())


def test_a_run_started_before_the_schedule_choice_resumes_only_on_sds_schedule(tmp_path: Path) -> None:
    written_then = {key: value for key, value in json.loads(json.dumps(UnetConfig().__dict__)).items()
                    if key not in ("loss_weighting", "zero_terminal_snr")}
    run = a_run_with_checkpoint(tmp_path, written_then)
    check_resumable(run, UnetConfig())
    with pytest.raises(PipelineError, match=r"another UNet \(loss_weighting, zero_terminal_snr differ\)"):
        check_resumable(run, UnetConfig(loss_weighting="min_snr_v", zero_terminal_snr=True))


def test_transformer_depth_adds_caption_reading_blocks_where_asked_and_a_run_written_before_it_resumes(
        tmp_path: Path) -> None:
    def depths(unet: UNet2DConditionModel) -> list[int]:
        return [len(attention.transformer_blocks) for block in unet.down_blocks for attention in block.attentions]

    assert depths(build_unet(UnetConfig(), latent_channels=16, sample_size=16)) == [1, 1, 1]
    deeper = build_unet(UnetConfig(transformer_layers_per_block=(2, 1, 1)), latent_channels=16, sample_size=16)
    assert depths(deeper) == [2, 1, 1]
    assert [len(attention.transformer_blocks) for attention in deeper.up_blocks[-1].attentions] == [2, 2]
    written_then = {key: value for key, value in json.loads(json.dumps(UnetConfig().__dict__)).items()
                    if key != "transformer_layers_per_block"}
    run = a_run_with_checkpoint(tmp_path, written_then)
    check_resumable(run, UnetConfig())
    with pytest.raises(PipelineError, match=r"another UNet \(transformer_layers_per_block differ\)"):
        check_resumable(run, UnetConfig(transformer_layers_per_block=2))
