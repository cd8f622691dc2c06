"""The studio end to end: a real server (API, studio, queue and in-process worker on the tiny models) driven by
Debian's chromium the way a designer uses it, and by `gradio_client` the way a program does."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image, PngImagePlugin
from playwright.sync_api import expect

from image_gen.auth import KeyStore
from storage.objects import LocalObjectStore
from storage.pnginfo import read_png_info

browser = pytest.mark.browser
SCREENSHOTS = os.environ.get(
    "IMAGE_GEN_SCREENSHOTS"
)  # a folder (docs/screenshots) to save the screenshots in


@pytest.fixture(scope="module")
def studio_url(start_api: Callable[..., str]) -> str:
    """The whole product without API keys: one local user."""
    return start_api(with_studio=True)


@pytest.fixture(scope="module")
def team(
    start_api: Callable[..., str], tiny_sd_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[str, dict[str, str]]:
    """A server with API keys (so the studio asks for a login): its URL and each user's secret. carol may have one
    unfinished job at a time. Its models are tiny-sd and broken-sd, whose UNet config does not fit its weights."""
    models = tmp_path_factory.mktemp("team-models")
    shutil.copytree(tiny_sd_model, models / "tiny-sd")
    shutil.copytree(tiny_sd_model, models / "broken-sd")
    config = models / "broken-sd" / "unet" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "block_out_channels": [16, 32]}))
    store = tmp_path_factory.mktemp("team-store")
    keys = KeyStore(LocalObjectStore(store))
    secrets = {
        name: keys.create(name, max_concurrent=1 if name == "carol" else None)[1]
        for name in ("alice", "bob", "carol")
    }
    return start_api(with_studio=True, store=str(store), models_dir=models), secrets


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


@browser
def test_generate_shows_queue_progress_and_the_image_with_its_parameters(
    studio_url: str, studio_page
) -> None:
    studio = studio_page(studio_url).open()
    studio.prompt("a red circle to the left of a blue square")
    studio.size("64x64")
    studio.number("steps", 60)  # a few seconds: the worker publishes progress about once a second

    assert studio.generate() == "done"

    log = [entry for entry in studio.status_log() if entry["state"] != "idle"]
    assert log[0]["state"] == "queued" and log[0]["text"].startswith("Queued"), log
    steps = [entry for entry in log if entry["text"].startswith("Step ")]
    assert steps, log
    assert all(entry["bar"] for entry in steps) and any(entry["preview"] for entry in steps)
    assert studio.status()[1].startswith("Done: 1 image in")
    shown = studio.parameters()
    assert shown["Prompt"] == "a red circle to the left of a blue square"
    assert (shown["Size"], shown["Steps"], shown["Sampler"]) == ("64x64", "60", "DPM++ 2M Karras")
    assert studio.captions("results") == [f"a red circle to the left of a blue square · seed {shown['Seed']}"]
    png = studio.download()
    info = read_png_info(png)
    assert info.parameters["seed"] == int(shown["Seed"])
    assert (info.parameters["width"], info.parameters["height"], info.parameters["steps"]) == (64, 64, 60)
    assert Image.open(io.BytesIO(png)).size == (64, 64)


@browser
def test_reusing_the_seed_gives_identical_pixels_and_variations_take_the_next_seeds(
    studio_url: str, studio_page
) -> None:
    studio = studio_page(studio_url).open()
    studio.prompt("a yellow star above a green square")
    studio.number("steps", 2)
    assert studio.generate() == "done"
    first_id, first = studio.image_id(), studio.download()
    seed = read_png_info(first).parameters["seed"]

    studio.page.click("#results-reuse-seed")
    expect(studio.page.locator("#seed input")).to_have_value(str(seed))
    expect(studio.page.locator("#seed-mode input[value=Fixed]")).to_be_checked()
    assert studio.generate(shortcut=False) == "done"

    assert studio.image_id() != first_id  # a new job...
    second = studio.download()
    assert read_png_info(second).parameters["seed"] == seed
    assert np.array_equal(pixels(first), pixels(second))  # ...with the very same pixels

    studio.page.click("#results-variations")
    studio.wait_finished()
    studio.wait_until(lambda: len(studio.captions("results")) == 4, what="four variations")
    assert [caption.rsplit(" ", 1)[1] for caption in studio.captions("results")] == [
        str(seed + n) for n in range(1, 5)
    ]
    expect(studio.page.locator("#count input[type=number]")).to_have_value("4")


@browser
def test_cancel_stops_a_long_job(studio_url: str, studio_page) -> None:
    studio = studio_page(studio_url).open()
    studio.prompt("a very slow painting")
    studio.size("64x64")
    studio.number("steps", 150)
    studio.number("count", 4)
    expect(studio.page.locator("#cancel")).to_be_disabled()
    studio.page.click("#generate")
    studio.wait_state("running")

    studio.page.click("#cancel")

    assert studio.wait_finished(timeout_s=15) == "canceled"
    assert studio.status()[1] == "Canceled."
    expect(studio.page.locator("#generate")).to_be_enabled()
    expect(studio.page.locator("#cancel")).to_be_disabled()
    jobs = httpx.get(f"{studio_url}/v1/jobs", params={"status": "canceled"}, timeout=10).json()["data"]
    assert any(job["id"] for job in jobs), jobs


@browser
def test_history_is_there_after_a_reload_searchable_by_prompt(studio_url: str, studio_page) -> None:
    studio = studio_page(studio_url).open()
    studio.prompt("a lonely purple triangle")
    studio.number("steps", 2)
    studio.number("count", 2)
    assert studio.generate() == "done"

    studio.page.reload()
    studio.ready()
    studio.tab("history")
    studio.wait_until(lambda: any("purple triangle" in c for c in studio.captions("history")), what="history")

    studio.page.fill("#history-query textarea", "PURPLE lonely")
    studio.page.click("#history-search")
    studio.wait_until(lambda: len(studio.captions("history")) == 2, what="the search results")
    assert all(
        caption.startswith("a lonely purple triangle · seed") for caption in studio.captions("history")
    )
    assert "Page 1 · 2 images" in studio.page.locator("#history-page").inner_text()
    expect(studio.page.locator("#history-older")).to_be_disabled()

    studio.page.locator("#history .thumbnail-item").first.click()
    assert studio.parameters("history")["Prompt"] == "a lonely purple triangle"
    studio.page.click("#history-reuse")
    studio.page.wait_for_selector("#tab-generate-button[aria-selected=true]")
    expect(studio.page.locator("#prompt textarea")).to_have_value("a lonely purple triangle")

    studio.tab("history")
    studio.page.fill("#history-query textarea", "no such words anywhere")
    studio.page.press("#history-query textarea", "Enter")
    studio.page.wait_for_selector("#history-page :text('No images match')")
    assert studio.captions("history") == []


@browser
def test_png_info_reads_a_dropped_png_and_sends_its_parameters_to_generate(
    studio_url: str, studio_page
) -> None:
    studio = studio_page(studio_url).open()
    chunk = PngImagePlugin.PngInfo()
    chunk.add_text(
        "parameters",
        "a castle on a hill\nNegative prompt: blurry, text\nSteps: 3, Sampler: Euler a, "
        "CFG scale: 5.5, Seed: 1234, Size: 48x40, Model: tiny-sd, Version: v1.10.1",
    )
    buffer = io.BytesIO()
    Image.new("RGB", (48, 40), "teal").save(buffer, format="PNG", pnginfo=chunk)
    studio.tab("pnginfo")
    expect(studio.page.locator("#png-send")).to_be_disabled()

    studio.drop_png(buffer.getvalue(), "from-a1111.png")

    studio.page.wait_for_selector("#png-parameters table")
    assert "AUTOMATIC1111" in studio.page.locator("#png-parameters .ig-source").inner_text()
    expect(studio.page.locator("#png-raw textarea")).to_have_value(re.compile("Steps: 3, Sampler: Euler a"))
    studio.page.click("#png-send")
    studio.page.wait_for_selector("#tab-generate-button[aria-selected=true]")
    for selector, value in (
        ("#prompt textarea", "a castle on a hill"),
        ("#negative textarea", "blurry, text"),
        ("#steps input[type=number]", "3"),
        ("#guidance input[type=number]", "5.5"),
        ("#scheduler input", "Euler a"),
        ("#size input", "48x40"),
        ("#seed input", "1234"),
    ):
        expect(studio.page.locator(selector)).to_have_value(value)
    expect(studio.page.locator("#seed-mode input[value=Fixed]")).to_be_checked()
    expect(studio.page.locator("#preset input[value=Custom]")).to_be_checked()


@browser
def test_mistakes_are_readable_messages_on_the_page(studio_url: str, studio_page) -> None:
    studio = studio_page(studio_url).open()
    studio.page.click("#generate")
    assert "Type a prompt first." in studio.wait_toast("Type a prompt")

    studio.prompt("a red circle")
    studio.size("60x60")
    assert studio.generate() == "failed"
    text = studio.status()[1]
    assert "width 60 is not allowed for model 'tiny-sd': use a multiple of 8 from 16 to 64" in text
    assert "width 60 is not allowed" in studio.wait_toast("width 60")
    assert "Traceback" not in studio.page.content()
    expect(studio.page.locator("#generate")).to_be_enabled()


@browser
def test_three_users_each_see_only_their_own_history(team: tuple[str, dict[str, str]], studio_page) -> None:
    url, secrets = team
    wrong = studio_page(url)
    wrong.page.goto(url + "/")
    wrong.page.get_by_label("username").fill("alice")
    wrong.page.get_by_label("password").fill(secrets["bob"])  # bob's secret is not alice's
    wrong.page.get_by_role("button", name="Login").click()
    wrong.page.get_by_text("Incorrect credentials").wait_for()

    studios = {name: studio_page(url).sign_in(name, secret) for name, secret in secrets.items()}
    for name, studio in studios.items():
        assert f"Signed in as {name}" in studio.page.locator("#ig-header").inner_text()
        studio.prompt(f"{name}'s private sketch")
        studio.number("steps", 2)
        studio.page.click("#generate")
    for studio in studios.values():
        assert studio.wait_finished() == "done"

    for name, studio in studios.items():
        studio.tab("history")
        studio.wait_until(lambda s=studio: len(s.captions("history")) > 0, what=f"{name}'s history")
        assert [caption.split(" · ")[0] for caption in studio.captions("history")] == [
            f"{name}'s private sketch"
        ]
        studio.page.fill("#history-query textarea", "private sketch")
        studio.page.click("#history-search")
        studio.page.wait_for_selector("#history-page :text('Page 1 · 1 image')")

    studios["alice"].page.get_by_role("link", name="Sign out").click()
    studios["alice"].page.get_by_role("button", name="Login").wait_for()


@browser
def test_a_users_concurrent_job_quota_is_a_readable_message(
    team: tuple[str, dict[str, str]], studio_page
) -> None:
    url, secrets = team
    headers = {"Authorization": f"Bearer {secrets['carol']}"}
    slow = httpx.post(
        f"{url}/v1/jobs",
        headers=headers,
        timeout=10,
        json={"prompt": "slow", "steps": 150, "size": "64x64", "n": 4},
    )
    assert slow.status_code == 202, slow.text
    try:
        studio = studio_page(url).sign_in("carol", secrets["carol"])
        studio.prompt("one more")
        assert studio.generate() == "failed"
        assert "1 unfinished job at once is this key's limit" in studio.status()[1]
    finally:
        httpx.post(f"{url}/v1/jobs/{slow.json()['id']}/cancel", headers=headers, timeout=10)


@browser
def test_a_model_that_fails_to_load_is_a_readable_message(
    team: tuple[str, dict[str, str]], studio_page
) -> None:
    url, secrets = team
    studio = studio_page(url).sign_in("bob", secrets["bob"])
    studio.page.locator("#model input").click()
    studio.page.get_by_role("option", name="broken-sd").click()
    studio.prompt("a red circle")
    studio.number("steps", 2)

    assert studio.generate(timeout_s=60) == "failed"

    assert any(entry["text"].startswith("Retrying after an error") for entry in studio.status_log())
    text = studio.status()[1]
    assert text.startswith("Generation failed:") and "cannot load unet" in text, text
    assert "Traceback" not in studio.page.content()


@browser
def test_a_model_added_to_the_folder_is_offered_on_the_next_page_load(
    start_api: Callable[..., str], tiny_sd_model: Path, tmp_path: Path, studio_page
) -> None:
    models = tmp_path / "models"
    shutil.copytree(tiny_sd_model, models / "tiny-sd")
    studio = studio_page(start_api(with_studio=True, store=str(tmp_path / "store"), models_dir=models)).open()

    def offered() -> list[str]:
        studio.page.locator("#model input").click()
        names = studio.page.get_by_role("option").all_inner_texts()
        studio.page.keyboard.press("Escape")
        return [name.split("\n")[-1].strip() for name in names]  # the selected one is "✓\nname"

    assert offered() == ["tiny-sd"]
    shutil.copytree(tiny_sd_model, models / "added-sd")  # a team drops a new model in, the server keeps running
    studio.open()
    assert sorted(offered()) == ["added-sd", "tiny-sd"]


@browser
def test_compare_shows_two_results_side_by_side_with_their_differences(studio_url: str, studio_page) -> None:
    studio = studio_page(studio_url).open()
    studio.prompt("a white cloud")
    studio.number("steps", 2)
    studio.number("count", 2)
    assert studio.generate() == "done"
    studio.page.click("#results-compare")
    studio.wait_toast("Added as A")
    studio.page.locator("#results .thumbnail-item").nth(1).click()
    studio.wait_until(lambda: studio.parameters()["Seed"] != "", what="the second image")
    studio.page.click("#results-compare")

    studio.page.wait_for_selector("#tab-compare-button[aria-selected=true]")
    studio.page.wait_for_selector("#compare-table table")
    differing = studio.page.locator("#compare-table tr.ig-diff th").all_inner_texts()
    assert differing == ["Seed"]
    boxes = [studio.page.locator(f"#compare-{side} img").bounding_box() for side in "ab"]
    assert boxes[0] and boxes[1] and boxes[0]["x"] + boxes[0]["width"] <= boxes[1]["x"]  # side by side
    assert abs(boxes[0]["y"] - boxes[1]["y"]) < 2


def test_gradio_client_calls_the_studios_named_generate_endpoint(studio_url: str) -> None:
    from gradio_client import Client

    client = Client(studio_url + "/", verbose=False)
    endpoints = client.view_api(return_format="dict", print_info=False)["named_endpoints"]
    assert "/generate" in endpoints
    assert [p["parameter_name"] for p in endpoints["/generate"]["parameters"]] == [
        "prompt",
        "negative",
        "model",
        "size",
        "steps",
        "guidance",
        "scheduler",
        "seed_mode",
        "seed",
        "count",
        "best_of",
    ]

    status, gallery, seed = client.predict(
        "a blue square", "", "tiny-sd", "32x32", 2, 7.5, "ddim", "Fixed", 77, 2, api_name="/generate"
    )

    assert "Done: 2 images" in status and seed == 77
    infos = [read_png_info(Path(item["image"]).read_bytes()) for item in gallery]
    assert [info.parameters["seed"] for info in infos] == [77, 78]
    assert all(
        info.parameters["prompt"] == "a blue square" and info.parameters["cfg_scale"] == 7.5 for info in infos
    )
    assert infos[0].request["request"]["scheduler"] == "ddim"


def test_gradio_client_signs_in_with_an_api_key(team: tuple[str, dict[str, str]]) -> None:
    from gradio_client import Client
    from gradio_client.exceptions import AuthenticationError

    url, secrets = team
    with pytest.raises(AuthenticationError):
        Client(url + "/", verbose=False)
    with pytest.raises(ValueError, match="Could not login"):
        Client(url + "/", auth=("bob", secrets["alice"]), verbose=False)

    client = Client(url + "/", auth=("bob", secrets["bob"]), verbose=False)
    status, gallery, _ = client.predict(
        "bob via the client", "", "tiny-sd", "32x32", 2, 7, "ddim", "Fixed", 5, 1, api_name="/generate"
    )

    assert "Done: 1 image" in status
    [item] = gallery
    job_id = read_png_info(Path(item["image"]).read_bytes()).request["job_id"]
    bob = httpx.get(
        f"{url}/v1/jobs/{job_id}", headers={"Authorization": f"Bearer {secrets['bob']}"}, timeout=10
    )
    alice = httpx.get(
        f"{url}/v1/jobs/{job_id}", headers={"Authorization": f"Bearer {secrets['alice']}"}, timeout=10
    )
    assert (bob.status_code, alice.status_code) == (200, 404)


@browser
def test_the_studio_fits_a_desktop_and_a_phone(studio_url: str, studio_page, tmp_path: Path) -> None:
    folder = Path(SCREENSHOTS) if SCREENSHOTS else tmp_path
    folder.mkdir(parents=True, exist_ok=True)
    for width, height in ((1280, 900), (390, 844)):
        studio = studio_page(studio_url, {"width": width, "height": height}).open()
        studio.prompt("a red circle to the left of a blue square")
        studio.number("steps", 2)
        assert studio.generate() == "done"
        studio.parameters()
        for elem_id in ("prompt", "generate", "cancel", "status", "results", "model", "steps", "seed"):
            box = studio.page.locator(f"#{elem_id}").bounding_box()
            assert box and box["x"] >= 0 and box["x"] + box["width"] <= width, (width, elem_id, box)
        studio.page.screenshot(path=str(folder / f"studio-{width}.png"), full_page=True)
        for tab in ("history", "compare", "pnginfo", "generate"):
            studio.tab(tab)
            if tab == "history":
                studio.page.locator("#history .thumbnail-item").first.wait_for()
            overflow = studio.page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
            assert overflow <= 0, f"{tab} at {width} px: the page is {overflow} px wider than the screen"
