"""The text-encoder probe: the real MiniLM encoder on a small number of real scene captions."""

import pytest

from eval.text_probe import TARGETS, main, noun_index, noun_states, report_table, text_probe_report
from pipelines.training.scenes import INVERSE_RELATION
from pipelines.training.text import load_text_encoder


@pytest.fixture(scope="module")
def encoder():
    return load_text_encoder()


def test_noun_index_takes_the_last_piece_of_the_longest_spelling():
    assert noun_index([101, 7, 8, 9, 102], [[8, 9], [9]]) == 3
    assert noun_index([101, 5, 9, 102], [[8, 9], [9]]) == 2
    with pytest.raises(ValueError, match="no spelling"):
        noun_index([101, 5, 102], [[8, 9], [9]])


def test_noun_states_label_both_objects_of_each_caption(encoder):
    tokenizer, model = encoder
    states = noun_states(range(6), "in_template", tokenizer, model, layers=(0, 6))
    assert states.states[6].shape == (12, model.config.hidden_size)
    sides = [TARGETS["side"][i] for i in states.labels["side"]]
    assert all(INVERSE_RELATION[a] == b for a, b in zip(sides[0::2], sides[1::2], strict=True))
    doubled = noun_states(range(6), "training", tokenizer, model, layers=(6,))
    assert len(doubled.labels["colour"]) == 24  # each scene's caption and one paraphrase
    with pytest.raises(ValueError, match="phrasing"):
        noun_states(range(2), "paraphrased", tokenizer, model, layers=(6,))


def test_the_contextual_states_carry_each_nouns_colour_and_the_input_embeddings_do_not(encoder):
    report = text_probe_report(train_scenes=200, test_scenes=60, tokenizer=encoder[0], encoder=encoder[1])
    accuracy = {key: value["in_template"]["mean"] for key, value in report["accuracy"].items()}
    assert accuracy["colour/layer6"] >= 0.7
    assert accuracy["colour/layer0"] <= 0.3
    assert accuracy["side/layer6"] > accuracy["side/layer0"] + 0.1
    table = report_table(report)
    assert "| colour | layer 6 (what the UNet reads) | 12.5 |" in table


def test_cli_refuses_a_training_set_too_small_to_fit(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--train-scenes", "3"])
    assert exit_info.value.code == 2
    assert "--train-scenes must be at least 10" in capsys.readouterr().err
