"""The arena page in Debian's chromium: a voter sees two anonymous images, votes, sees who made them, gets the next
battle; the leaderboard page shows the ratings. No contender name reaches the browser before the vote, in the
page or in any response. Screenshots of both pages go to docs/screenshots/."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from image_gen.arena.votes import VoteLog
from storage.objects import open_store

pytestmark = pytest.mark.browser

SCREENSHOTS = Path(__file__).resolve().parents[2] / "docs" / "screenshots"
CONTENDERS = [
    {"name": "alpha-contender", "model": "tiny-sd", "steps": 2},
    {"name": "beta-contender", "model": "tiny-sd", "steps": 4},
    {"name": "gamma-contender", "model": "tiny-sd", "steps": 6, "guidance_scale": 4.0},
]
NAMES = [contender["name"] for contender in CONTENDERS]
STRENGTH = {"alpha-contender": 900.0, "beta-contender": 1000.0, "gamma-contender": 1100.0}


@pytest.fixture(scope="module")
def arena_server(start_api: Callable[..., str], tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    store = tmp_path_factory.mktemp("arena-ui-store")
    url = start_api(
        with_studio=True, store=str(store), arena_contenders=CONTENDERS, arena_min_view_s=1,
        arena_seeds_per_prompt=1,
    )  # fmt: skip
    return url, store


# Gradio streams every update of the page (status, prompt, images, reveal) over a fetch of `queue/data`, whose body
# Playwright cannot read back: this copies what the page receives into `window.igStreamed` as it arrives.
RECORD_STREAMS = """
(() => {
  window.igStreamed = "";
  const original = window.fetch;
  window.fetch = async (...args) => {
    const response = await original(...args);
    const url = args[0] instanceof Request ? args[0].url : String(args[0]);
    if (url.includes("queue/data") && response.body) {
      const reader = response.clone().body.getReader();
      const decoder = new TextDecoder();
      (async () => {
        for (;;) {
          const {done, value} = await reader.read();
          if (done) break;
          window.igStreamed += decoder.decode(value, {stream: true});
        }
      })();
    }
    return response;
  };
})();
"""


def seed_votes(store: Path, count: int) -> None:
    """Votes of the last hour between the contenders, as another API process would store them, for a leaderboard
    worth a screenshot (stronger contenders win more)."""
    rng = random.Random(3)
    log = VoteLog(open_store(store))
    today, now = time.strftime("%Y%m%d", time.gmtime()), time.time()
    for k in range(count):
        a, b = rng.sample(NAMES, 2)
        p = 1 / (1 + 10 ** ((STRENGTH[b] - STRENGTH[a]) / 400))
        u = rng.random()
        winner = "tie" if u < 0.1 else "model_a" if rng.random() < p else "model_b"
        log.record_vote({
            "question_id": f"{today}{k:020x}", "model_a": a, "model_b": b, "winner": winner,
            "judge": f"seeded-{k % 12}", "owner": "local", "address": None, "anony": True,
            "tstamp": now - 3600 + k, "prompt": "a seeded prompt", "prompt_id": None, "seed": 0,
            "image_a": "seeded_0", "image_b": "seeded_0", "view_s": 5.0,
        })  # fmt: skip


def test_vote_see_the_reveal_and_get_the_next_battle(arena_server, studio_page) -> None:
    url, _ = arena_server
    studio = studio_page(url)
    page = studio.page
    bodies: list[bytes] = []
    page.on("response", lambda response: bodies.append(_body(response)))
    page.add_init_script(RECORD_STREAMS)
    page.goto(url + "/arena")
    page.wait_for_selector("#arena-status [data-state=ready]", timeout=120_000)
    page.wait_for_selector("#arena-a img")
    page.wait_for_selector("#arena-b img")
    page.wait_for_selector("#vote-a:not([disabled])", timeout=30_000)  # after the minimum viewing time
    prompt = page.inner_text("#arena-prompt").strip()
    assert prompt.startswith("Prompt")  # a suite prompt: the box was blank
    assert any(cookie["name"] == "ig-arena-voter" for cookie in page.context.cookies())

    page.wait_for_timeout(200)  # let the last responses land before reading them
    streamed = page.evaluate("window.igStreamed")
    assert "Which image matches the prompt better?" in streamed  # the recorder saw the battle's updates
    before_vote = page.content().encode() + b"".join(bodies) + streamed.encode()
    for name in NAMES:
        assert name.encode() not in before_vote, name
    assert b"tiny-sd" not in before_vote

    page.click("#vote-b")
    page.wait_for_selector("#arena-reveal .arena-reveal[data-choice=b]")
    reveal = page.inner_text("#arena-reveal")
    shown = [name for name in NAMES if name in reveal]
    assert len(shown) == 2, reveal
    streamed = page.evaluate("window.igStreamed")
    assert all(name in streamed for name in shown)  # the recorder would have seen a name sent before the vote
    assert "You chose B" in reveal
    assert page.locator(".arena-side.arena-won[data-side=b]").count() == 1
    for button in ("#vote-a", "#vote-b", "#vote-tie", "#vote-both-bad"):
        assert page.locator(button).is_disabled()
    page.wait_for_timeout(300)
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / "arena.png"), full_page=True)

    page.fill("#arena-prompt-input textarea", "a red circle above a blue square")
    page.click("#arena-next")
    page.wait_for_function(
        "() => document.querySelector('#arena-reveal').innerText.trim() === ''"
        " && document.querySelector('#arena-prompt').innerText.includes('a red circle above a blue square')",
        timeout=60_000,
    )
    page.wait_for_selector("#vote-a:not([disabled])", timeout=120_000)
    page.click("#vote-tie")
    page.wait_for_selector("#arena-reveal .arena-reveal[data-choice=tie]")


def test_the_leaderboard_page_shows_ratings_intervals_and_ranks(arena_server, studio_page) -> None:
    url, store = arena_server
    seed_votes(store, 300)
    page = studio_page(url).page
    page.goto(url + "/arena/leaderboard")
    page.wait_for_selector("#arena-board-body[data-loaded=true]", timeout=60_000)
    deadline = time.monotonic() + 30  # the server reads votes stored by others at most every 5 s
    while int(page.get_attribute("#arena-board-body", "data-votes") or 0) < 300:
        assert time.monotonic() < deadline
        page.wait_for_timeout(1000)
        page.reload()
        page.wait_for_selector("#arena-board-body[data-loaded=true]", timeout=60_000)
    rows = page.locator("#arena-board-body tbody tr")
    assert rows.count() == 3
    assert [rows.nth(i).get_attribute("data-contender") for i in range(3)] == [
        "gamma-contender", "beta-contender", "alpha-contender"
    ]  # fmt: skip
    assert "–" in rows.nth(0).locator("td.arena-ci").inner_text()
    page.screenshot(path=str(SCREENSHOTS / "arena-leaderboard.png"), full_page=True)
    page.check("#include-flagged input")
    page.wait_for_function("() => document.querySelector('#arena-board-body')?.dataset.loaded === 'true'")
    assert page.locator("#arena-board-body tbody tr").count() == 3


def _body(response) -> bytes:  # type: ignore[no-untyped-def]
    try:
        return response.body()
    except Exception:  # redirects and event streams have no body to read back
        return b""


def test_a_battle_whose_images_never_come_ends_at_its_expiry(
    start_api: Callable[..., str], studio_page
) -> None:
    url = start_api(
        with_studio=True, arena_contenders=CONTENDERS, workers_in_process=0, arena_battle_ttl_s=2
    )  # no worker: the images are never made
    page = studio_page(url).page
    page.goto(url + "/arena")
    page.wait_for_selector("#arena-status [data-state=generating]", timeout=60_000)
    page.wait_for_selector("#arena-status [data-state=failed]", timeout=30_000)
    assert "took too long" in page.inner_text("#arena-status")
    assert page.locator("#vote-a").is_disabled() and not page.locator("#arena-next").is_disabled()
