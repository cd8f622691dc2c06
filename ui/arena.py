"""The arena page for voters, mounted at `/arena`, and its leaderboard at `/arena/leaderboard`.

A voter gets two anonymous images of one prompt (typed, or from the built-in suite), votes "A is better", "B is
better", "Tie" or "Both are bad", and only then learns which contenders made them; then the next battle. Every
handler acts through `Arena` for the voter of its request: the credential in the `ig-arena-voter` cookie (which
`VoterCookie` gives every browser that opens the page without one), on behalf of the signed-in owner. The battle
and its token stay in the server-side session state; the page receives the prompt, two stripped images and, after
the vote, the reveal.
"""

from __future__ import annotations

import asyncio
import io
import math
import warnings
from collections.abc import AsyncIterator, Callable
from html import escape
from http.cookies import SimpleCookie
from typing import Any

import gradio as gr
from fastapi import FastAPI
from fastapi.responses import RedirectResponse
from PIL import Image
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from image_gen.arena import Arena, ArenaLeaderboard, BattleView, Reveal, Voter
from image_gen.arena.tokens import VOTER_COOKIE, VOTER_COOKIE_AGE_S
from image_gen.auth import KeyStore
from image_gen.errors import ImageGenError
from image_gen.types import StorageError
from ui.login import StudioLogin
from ui.styles import CSS, THEME

POLL_S = 0.25
CHOICES = {"a": "A is better", "b": "B is better", "tie": "Tie", "both_bad": "Both are bad"}
WINNER_TEXT = {
    "a": "You chose A",
    "b": "You chose B",
    "tie": "You called it a tie",
    "both_bad": "You found both bad",
}

ARENA_CSS = """
#arena-header { display: flex; align-items: baseline; justify-content: space-between; flex-wrap: wrap; gap: 4px 16px; }
#arena-header h1 { font-size: 1.35rem; font-weight: 700; margin: 0; }
#arena-header .ig-tagline { color: var(--body-text-color-subdued); font-size: .9rem; margin-left: .6rem; }
#arena-header a { font-size: .9rem; margin-left: .8rem; }
.arena-prompt { font-size: 1.05rem; margin: 4px 0; overflow-wrap: anywhere; }
.arena-prompt b { color: var(--body-text-color-subdued); font-weight: 600; margin-right: .4rem; }
#arena-a img, #arena-b img { width: 100%; height: 100%; object-fit: contain; }
.arena-votes button { min-height: 48px; font-size: 1rem; }
.arena-reveal { display: grid; grid-template-columns: 1fr 1fr; gap: 12px; }
.arena-side { padding: 10px 12px; border: 1px solid var(--border-color-primary); border-radius: var(--radius-md); }
.arena-side.arena-won { border-color: #16a34a; background: rgba(22, 163, 74, .08); }
.arena-side .arena-label { color: var(--body-text-color-subdued); font-size: .85rem; }
.arena-side .arena-name { font-size: 1.1rem; font-weight: 700; overflow-wrap: anywhere; }
.arena-side .arena-settings { font-size: .85rem; color: var(--body-text-color-subdued); overflow-wrap: anywhere; }
.arena-choice { grid-column: 1 / -1; font-weight: 600; }
.arena-board { width: 100%; border-collapse: collapse; font-size: .95rem; border: none !important; }
.arena-board tr, .arena-board th, .arena-board td { border: none !important; background: none; }
.arena-board th, .arena-board td { padding: 6px 10px; text-align: right;
  border-bottom: 1px solid var(--border-color-primary) !important; }
.arena-board th { font-weight: 600; color: var(--body-text-color-subdued); }
.arena-board tbody tr:first-child td { font-weight: 700; }
.arena-board th:nth-child(2), .arena-board td:nth-child(2) { text-align: left; }
.arena-board td.arena-ci { color: var(--body-text-color-subdued); white-space: nowrap; }
.arena-note { color: var(--body-text-color-subdued); font-size: .9rem; margin: 6px 0; }
@media (max-width: 640px) {
  #arena-header .ig-tagline { display: none; }
  .arena-reveal { grid-template-columns: 1fr; }
  .arena-board th:nth-child(n+5), .arena-board td:nth-child(n+5) { display: none; }
}
"""


# --- what the page shows (pure functions, escaped throughout) -----------------------------------------------------


def status_html(state: str, text: str) -> str:
    """The status line; `state` (idle, generating, ready, voted, failed) is also its data-state, for tests."""
    return (
        f'<div class="ig-status ig-{"done" if state == "voted" else state}" data-state="{escape(state)}" '
        f'role="status" aria-live="polite"><div class="ig-status-body"><span class="ig-status-text">'
        f"{escape(text)}</span></div></div>"
    )


def prompt_html(prompt: str | None) -> str:
    if not prompt:
        return '<p class="arena-prompt"></p>'
    return f'<p class="arena-prompt"><b>Prompt</b>{escape(prompt)}</p>'


def _settings_text(contender: dict[str, Any]) -> str:
    parts = [str(contender.get("model", ""))]
    if contender.get("steps") is not None:
        parts.append(f"{contender['steps']} steps")
    if contender.get("scheduler"):
        parts.append(str(contender["scheduler"]))
    if contender.get("guidance_scale") is not None:
        parts.append(f"guidance {contender['guidance_scale']:g}")
    if contender.get("width") and contender.get("height"):
        parts.append(f"{contender['width']}x{contender['height']}")
    return " · ".join(parts)


def reveal_html(reveal: Reveal | None) -> str:
    """Who made A and who made B, shown only once the vote is recorded."""
    if reveal is None:
        return ""
    sides = []
    for side, contender in (("a", reveal.model_a), ("b", reveal.model_b)):
        won = " arena-won" if reveal.choice == side else ""
        sides.append(
            f'<div class="arena-side{won}" data-side="{side}"><div class="arena-label">{side.upper()} was</div>'
            f'<div class="arena-name">{escape(str(contender["name"]))}</div>'
            f'<div class="arena-settings">{escape(_settings_text(contender))}</div></div>'
        )
    choice = f'<div class="arena-choice">{escape(WINNER_TEXT[reveal.choice])}. Thank you for voting.</div>'
    return f'<div class="arena-reveal" data-choice="{escape(reveal.choice)}">{choice}{"".join(sides)}</div>'


def leaderboard_html(board: ArenaLeaderboard | None) -> str:
    """The ratings table, with the votes behind it; `data-loaded` says the table is current."""
    if board is None:
        return '<div id="arena-board-body" data-loaded="false"><p class="arena-note">Loading…</p></div>'
    rows = []
    for row in board.rows:
        has_votes = row.battles > 0
        interval = f"{row.lower:.0f} – {row.upper:.0f}" if has_votes else "–"
        win_rate = f"{row.win_rate:.0%}" if has_votes else "–"
        rating = f"{row.rating:.0f}" if has_votes else "–"
        rows.append(
            f'<tr data-contender="{escape(row.contender)}"><td>{row.rank}</td><td>{escape(row.contender)}</td>'
            f'<td>{rating}</td><td class="arena-ci">{interval}</td><td>{row.battles}</td><td>{win_rate}</td></tr>'
        )
    anchor = f"{escape(board.anchor)} is pinned at 1000" if board.anchor else "the mean rating is 1000"
    excluded = (
        f" {board.excluded_votes} vote{'s' if board.excluded_votes != 1 else ''} of "
        f"{len(board.flagged_voters)} voter{'s' if len(board.flagged_voters) != 1 else ''} flagged as outliers "
        "left out."
        if board.excluded_votes
        else ""
    )
    note = (
        f"{board.votes} vote{'s' if board.votes != 1 else ''} counted.{excluded} Bradley-Terry ratings on the Elo "
        f"scale ({anchor}); 95% intervals from {board.rounds} bootstrap rounds. A rank is 1 + the contenders "
        "whose interval lies wholly above."
    )
    return (
        f'<div id="arena-board-body" data-loaded="true" data-votes="{board.votes}">'
        '<table class="arena-board"><thead><tr><th>Rank</th><th>Contender</th><th>Rating</th><th>95% CI</th>'
        f"<th>Battles</th><th>Win rate</th></tr></thead><tbody>{''.join(rows)}</tbody></table>"
        f'<p class="arena-note">{note}</p></div>'
    )


def header_html(page: str) -> str:
    other = '<a href="leaderboard">Leaderboard</a>' if page == "arena" else '<a href="./">Vote</a>'
    return (
        '<div id="arena-header"><div><h1 style="display:inline">image-gen arena</h1>'
        '<span class="ig-tagline">blind votes between two images of one prompt</span></div>'
        f'<div>{other}<a href="/">Studio</a></div></div>'
    )


def battle_image(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as image:
        return image.convert("RGB")


# --- the voter's cookie -------------------------------------------------------------------------------------------


class VoterCookie:
    """ASGI middleware: a browser that opens an arena page without a genuine voter credential gets a new one as a
    cookie, so that per-voter caps follow the browser across reloads. Every other request passes untouched."""

    def __init__(self, app: ASGIApp, arena: Arena, pages: tuple[str, ...]) -> None:
        self.app = app
        self.arena = arena
        self.pages = pages

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "GET" or scope["path"] not in self.pages:
            await self.app(scope, receive, send)
            return
        header = next((value for name, value in scope["headers"] if name == b"cookie"), b"")
        jar: SimpleCookie = SimpleCookie()
        jar.load(header.decode("latin-1"))
        current = jar[VOTER_COOKIE].value if VOTER_COOKIE in jar else None
        if self.arena.signer.voter_id(current) is not None:
            await self.app(scope, receive, send)
            return
        cookie: SimpleCookie = SimpleCookie()
        cookie[VOTER_COOKIE] = self.arena.new_voter()
        cookie[VOTER_COOKIE].update(
            {"path": "/", "max-age": str(VOTER_COOKIE_AGE_S), "httponly": True, "samesite": "Lax"}
        )
        if scope.get("scheme") == "https":
            cookie[VOTER_COOKIE]["secure"] = True
        set_cookie = cookie.output(header="").strip().encode("latin-1")

        async def send_with_cookie(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (b"set-cookie", set_cookie)]}
            await send(message)

        await self.app(scope, receive, send_with_cookie)


# --- the page -----------------------------------------------------------------------------------------------------


def build_arena(arena: Arena, login: StudioLogin) -> gr.Blocks:
    """The arena page and, as a second page of the same app, its leaderboard."""

    def voter(request: gr.Request) -> Voter:
        owner = login.owner(request)
        client = getattr(request, "client", None)
        try:
            return arena.voter(request.cookies.get(VOTER_COOKIE), owner, getattr(client, "host", None))
        except ImageGenError as error:
            raise gr.Error("Your browser has no voter id yet: reload the page.", title="Reload") from error

    vote_buttons_off = [gr.update(interactive=False)] * len(CHOICES)
    vote_buttons_on = [gr.update(interactive=True)] * len(CHOICES)

    async def start(prompt: str, request: gr.Request) -> AsyncIterator[list[Any]]:
        """Start a battle and follow it: outputs are state, status, prompt, image A, image B, reveal, the four
        vote buttons and the next-battle button (disabled while a battle is being set up)."""
        try:
            async for update in follow(voter(request), prompt):
                yield update
        except (ImageGenError, StorageError) as error:
            message = (
                error.message if isinstance(error, ImageGenError) else f"The store is not available: {error}"
            )
            yield [None, status_html("failed", message), gr.skip(), None, None, "", *vote_buttons_off,
                   gr.update(interactive=True)]  # fmt: skip
            raise gr.Error(message, title="No battle") from error

    async def follow(who: Voter, prompt: str) -> AsyncIterator[list[Any]]:
        view = await asyncio.to_thread(arena.new_battle, who, prompt)
        state = {"id": view.id, "token": view.token}
        yield [state, status_html("generating", "Generating both images…"), prompt_html(view.prompt), None, None,
               "", *vote_buttons_off, gr.update(interactive=False)]  # fmt: skip
        while view.status == "generating" and arena.clock() < view.expires_at:
            await asyncio.sleep(POLL_S)
            view = await asyncio.to_thread(arena.battle, who, view.id)
        if view.status == "generating":  # no worker made the images while the token was valid
            yield [None, status_html("failed", "The images took too long: start the next battle."), gr.skip(),
                   None, None, "", *vote_buttons_off, gr.update(interactive=True)]  # fmt: skip
            return
        if view.status == "failed":
            yield [None, status_html("failed", "An image could not be generated: start the next battle."),
                   gr.skip(), None, None, "", *vote_buttons_off, gr.update(interactive=True)]  # fmt: skip
            return
        a, b = await asyncio.to_thread(_images, arena, who, view)
        wait = view.vote_in_s or 0.0
        if wait > 0:
            yield [state, status_html("ready", f"Look at both images: voting opens in {math.ceil(wait)} s."),
                   gr.skip(), a, b, "", *vote_buttons_off, gr.update(interactive=True)]  # fmt: skip
            await asyncio.sleep(wait)
            a, b = gr.skip(), gr.skip()
        yield [state, status_html("ready", "Which image matches the prompt better?"), gr.skip(), a, b, "",
               *vote_buttons_on, gr.update(interactive=True)]  # fmt: skip

    def cast(choice: str) -> Callable[..., list[Any]]:
        def handler(state: dict[str, str] | None, request: gr.Request) -> list[Any]:
            if not state:
                raise gr.Error("Start a battle first.")
            try:
                reveal = arena.vote(voter(request), state["token"], choice)
            except ImageGenError as error:
                if error.code == "vote_too_early":
                    raise gr.Error(error.message, title="A moment, please") from error
                return [None, status_html("failed", error.message), gr.skip(), *vote_buttons_off]
            except StorageError as error:  # the vote may be retried: the battle and token stay
                raise gr.Error(f"The store is not available: {error}", title="Not recorded") from error
            return [None, status_html("voted", "Vote recorded."), reveal_html(reveal), *vote_buttons_off]

        return handler

    with gr.Blocks(title="image-gen arena", fill_width=True, analytics_enabled=False) as demo:
        battle = gr.State(None)
        gr.HTML(header_html("arena"), elem_id="arena-header-block")
        with gr.Row(equal_height=True):
            prompt = gr.Textbox(
                show_label=False,
                placeholder="Type a prompt, or leave it blank for one from the built-in suite",
                max_lines=3,
                max_length=1000,
                scale=5,
                min_width=240,
                container=False,
                elem_id="arena-prompt-input",
            )
            suite_button = gr.Button("Suite prompt", scale=1, min_width=120, elem_id="arena-suite")
            next_button = gr.Button(
                "Next battle", variant="primary", scale=1, min_width=120, elem_id="arena-next"
            )
        status = gr.HTML(status_html("idle", "Starting a battle…"), elem_id="arena-status")
        shown_prompt = gr.HTML(prompt_html(None), elem_id="arena-prompt")
        with gr.Row(equal_height=True):
            image_a = gr.Image(
                label="A", type="pil", interactive=False, height=420, min_width=160, elem_id="arena-a",
                buttons=["fullscreen"],
            )  # fmt: skip
            image_b = gr.Image(
                label="B", type="pil", interactive=False, height=420, min_width=160, elem_id="arena-b",
                buttons=["fullscreen"],
            )  # fmt: skip
        with gr.Row(elem_classes="arena-votes"):
            buttons = [
                gr.Button(text, interactive=False, min_width=120, elem_id=f"vote-{choice.replace('_', '-')}")
                for choice, text in CHOICES.items()
            ]
        reveal = gr.HTML("", elem_id="arena-reveal")

        outputs = [battle, status, shown_prompt, image_a, image_b, reveal, *buttons, next_button]
        private: dict[str, Any] = {"api_visibility": "private", "show_progress": "hidden"}
        demo.load(start, prompt, outputs, concurrency_limit=None, **private)
        suite_button.click(lambda: arena.suite_prompt().prompt, None, prompt, **private)
        next_button.click(start, prompt, outputs, concurrency_limit=None, **private)
        prompt.submit(start, prompt, outputs, concurrency_limit=None, **private)
        for choice, button in zip(CHOICES, buttons, strict=True):
            button.click(cast(choice), battle, [battle, status, reveal, *buttons], **private)

    with demo.route("Leaderboard", "/leaderboard"):
        gr.HTML(header_html("leaderboard"), elem_id="leaderboard-header-block")
        include = gr.Checkbox(
            label="Include the votes of voters flagged as outliers", value=False, elem_id="include-flagged"
        )
        board = gr.HTML(leaderboard_html(None), elem_id="arena-leaderboard")

        def show(include_flagged: bool, request: gr.Request) -> str:
            login.owner(request)
            return leaderboard_html(arena.leaderboard(include_flagged=include_flagged))

        demo.load(show, include, board, **private)
        include.change(show, include, board, **private)
    return demo


def _images(arena: Arena, voter: Voter, view: BattleView) -> tuple[Image.Image, Image.Image]:
    return (battle_image(arena.image(voter, view.id, "a")), battle_image(arena.image(voter, view.id, "b")))


def mount_arena(app: FastAPI, arena: Arena, keys: KeyStore, path: str = "/arena") -> FastAPI:
    """Mount the arena and its leaderboard (before the studio at `/`, which would take every path); a login page
    when API keys are configured, as in the studio."""
    login = StudioLogin(keys)

    async def to_page() -> RedirectResponse:
        return RedirectResponse(f"{path}/")

    app.add_api_route(path, to_page, include_in_schema=False)
    app.add_middleware(VoterCookie, arena=arena, pages=(f"{path}/", f"{path}/leaderboard"))
    with warnings.catch_warnings():  # "SSR mode is not supported with multi-page apps": it is off anyway
        warnings.filterwarnings("ignore", message="SSR mode is not supported")
        return gr.mount_gradio_app(
            app,
            build_arena(arena, login),
            path=path,
            auth=login.check if login.enabled else None,
            auth_message="Sign in with an API key: its name as the user name, its secret as the password.",
            theme=THEME,
            css=CSS + ARENA_CSS,
            footer_links=["api"],
            show_error=False,
            ssr_mode=False,
        )
