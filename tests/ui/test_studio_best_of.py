"""The studio's "Best of" control: N candidates, of which the batch count best by the bundled CLIP's score against
the prompt are shown, best first; fewer candidates than the batch is refused with a message."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import gradio as gr
import httpx
import numpy as np
import pytest
from PIL import Image

from eval.clip import load_scorer
from storage.pnginfo import read_png_info
from ui.studio import best_of_candidates

PROMPT = "a red circle left of a blue star"


@pytest.fixture(scope="module")
def studio_url(start_api: Callable[..., str]) -> str:
    return start_api(with_studio=True)


def test_best_of_shows_the_candidate_the_scorer_ranks_best(studio_url: str) -> None:
    from gradio_client import Client

    client = Client(studio_url + "/", verbose=False)
    status, gallery, seed = client.predict(
        PROMPT, "", "tiny-sd", "32x32", 2, 7.5, "ddim", "Fixed", 40, 1, 3, api_name="/generate"
    )

    assert "Done: 1 image" in status and seed == 40
    [item] = gallery
    shown = read_png_info(Path(item["image"]).read_bytes())
    job_id = shown.request["job_id"]
    candidates = [
        Image.open(io.BytesIO(httpx.get(f"{studio_url}/v1/images/{job_id}_{i}", timeout=30).content))
        for i in range(3)
    ]
    scores = load_scorer().score(candidates, [PROMPT] * 3)
    assert shown.parameters["seed"] == 40 + int(np.argmax(scores))
    job = httpx.get(f"{studio_url}/v1/jobs/{job_id}", timeout=30).json()
    assert job["best_of"] == 3 and job["images"][0]["id"] == f"{job_id}_{int(np.argmax(scores))}"


def test_best_of_is_off_at_one_and_at_least_the_batch_count_otherwise() -> None:
    assert best_of_candidates(1, 4) is None
    assert best_of_candidates(4, 4) == 4 and best_of_candidates(6.0, 2) == 6
    with pytest.raises(gr.Error, match="Best of 2 is fewer candidates than the batch count"):
        best_of_candidates(2, 3)
