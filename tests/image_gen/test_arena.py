"""The arena through its REST API: a simulated electorate recovers known strengths through the real vote endpoint,
tokens that are forged, replayed, expired or another voter's count nothing, votes wait for the viewing time and
stop at the daily caps, nothing before the vote names a contender, concurrent voters lose and duplicate no vote,
and the votes export as FastChat battle records.

Apps run in process on the tiny model (`worker_isolation="thread"`); the simulation talks to the app over ASGI,
the concurrency test to two uvicorn servers on 127.0.0.1 sharing one store, like two API processes."""

from __future__ import annotations

import asyncio
import io
import itertools
import json
import random
import shutil
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import Image

from image_gen.api.app import create_app
from image_gen.arena.cli import main as arena_main
from image_gen.arena.contenders import default_contenders
from image_gen.arena.votes import VOTES, VoteLog
from image_gen.errors import ImageGenError
from image_gen.settings import ArenaContender, load_settings
from storage.objects import open_store

TRUTH = {f"contender-{k}": rating for k, rating in enumerate((1180, 1120, 1070, 1020, 970, 920, 870, 820), 1)}
SIMULATED_VOTES = 5000
SIMULATED_VOTERS = 20
TIE_RATE = 0.1
PROMPTS = ("a red circle", "a blue square on a white background")
CHOICE_OF = {"model_a": "a", "model_b": "b", "tie": "tie", "tie (bothbad)": "both_bad"}


def memory_dir() -> Path:
    """A fresh folder in RAM where there is one: thousands of tiny writes without a disk's fsync."""
    shm = Path("/dev/shm")
    return Path(tempfile.mkdtemp(prefix="arena-test-", dir=shm if shm.is_dir() else None))


def arena_settings(models_dir: Path, store: Path, **arena: object):
    return load_settings(
        models_dir=models_dir,
        store=str(store),
        default_model="tiny-sd",
        device="cpu",
        worker_isolation="thread",
        request_timeout_s=60,
        **arena,
    )


def wait_ready(client: httpx.Client, battle: dict, headers: dict[str, str], timeout_s: float = 180) -> dict:
    deadline = time.monotonic() + timeout_s
    while battle["status"] == "generating":
        assert time.monotonic() < deadline, battle
        time.sleep(0.05)
        battle = client.get(f"/v1/arena/battles/{battle['id']}", headers=headers).json()
    assert battle["status"] == "ready", battle
    return battle


def stored_votes(store: Path) -> list[str]:
    return [key for key in open_store(store).list(VOTES) if key.endswith(".json")]


# --- the simulation: 8 contenders of known strength, 5,000 votes -------------------------------------------------


def simulated_choice(rng: np.random.Generator, rating_a: float, rating_b: float) -> str:
    """A voter whose expected score for A (ties half) is Bradley-Terry's P(A beats B): ties 10% of the time."""
    p = 1 / (1 + 10 ** ((rating_b - rating_a) / 400))
    u = rng.random()
    if u < TIE_RATE:
        return "tie" if u < TIE_RATE / 2 else "both_bad"
    return "a" if rng.random() < (p - TIE_RATE / 2) / (1 - TIE_RATE) else "b"


async def simulate(app: FastAPI, store: Path, votes: int, seed: int) -> dict:
    """`votes` battles and votes through the API, in one deterministic order. The simulated voter's eyes read
    who is on which side from the store, as a person would tell it from the images."""
    app.state.arena.rng = random.Random(seed)
    rng = np.random.default_rng(seed)
    eyes = VoteLog(open_store(store))
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app), base_url="http://arena.test", timeout=120
        ) as client,
    ):
        credentials = [
            (await client.post("/v1/arena/voters")).json()["voter"] for _ in range(SIMULATED_VOTERS)
        ]
        for k in range(votes):
            headers = {"X-Arena-Voter": credentials[k % SIMULATED_VOTERS]}
            response = await client.post(
                "/v1/arena/battles", json={"prompt": PROMPTS[k % 2]}, headers=headers
            )
            assert response.status_code == 201, response.text
            battle = response.json()
            deadline = time.monotonic() + 180
            while battle["status"] == "generating":
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
                battle = (await client.get(f"/v1/arena/battles/{battle['id']}", headers=headers)).json()
            record = eyes.battle(battle["id"])
            choice = simulated_choice(rng, TRUTH[record.model_a], TRUTH[record.model_b])
            token = response.json()["token"]
            voted = await client.post(
                "/v1/arena/votes", json={"token": token, "choice": choice}, headers=headers
            )
            assert voted.status_code == 201, voted.text
        return (await client.get("/v1/arena/leaderboard")).json()


@pytest.fixture(scope="module")
def simulated(tiny_models_dir: Path) -> Iterator[tuple[dict, Path, FastAPI, float]]:
    import torch

    store = memory_dir()
    contenders = [{"name": name, "model": "tiny-sd", "steps": k} for k, name in enumerate(TRUTH, 1)]
    settings = arena_settings(
        tiny_models_dir, store, arena_contenders=contenders, arena_min_view_s=0, arena_seeds_per_prompt=1,
        arena_votes_per_day=10_000, arena_votes_per_ip_per_day=100_000, arena_battles_per_minute=1e9,
    )  # fmt: skip
    app = create_app(settings)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    started = time.process_time()
    try:
        board = asyncio.run(simulate(app, store, SIMULATED_VOTES, seed=20260101))
        yield board, store, app, time.process_time() - started
    finally:
        torch.set_num_threads(threads)
        shutil.rmtree(store, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.timeout(1800)  # about 35 s of CPU: on a machine this busy, much longer
def test_simulated_votes_through_the_api_recover_the_true_ranking_inside_the_intervals(simulated) -> None:
    from scipy.stats import kendalltau

    board, store, _, cpu_s = simulated
    rows = {row["contender"]: row for row in board["leaderboard"]}
    names = list(TRUTH)
    truth = np.array([TRUTH[name] for name in names], dtype=float)
    truth += 1000 - truth.mean()  # the board's ratings have mean 1000 (no anchor)
    tau = kendalltau(truth, [rows[name]["rating"] for name in names]).statistic
    covered = [rows[name]["lower"] <= t <= rows[name]["upper"] for name, t in zip(names, truth, strict=True)]
    print(
        f"\nsimulation: tau {tau:.3f}, coverage {np.mean(covered):.0%}, {cpu_s:.1f} s CPU for {SIMULATED_VOTES} votes"
    )
    assert len(stored_votes(store)) == SIMULATED_VOTES
    assert board["votes"] == SIMULATED_VOTES and board["excluded_votes"] == 0 and board["flagged_voters"] == 0
    assert board["rounds"] >= 100
    assert tau >= 0.9
    assert np.mean(covered) >= 0.85


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_pair_sampling_favours_close_pairs_and_compares_every_pair(simulated) -> None:
    _, store, _, _ = simulated
    pairs = Counter(
        frozenset((vote["model_a"], vote["model_b"])) for vote in VoteLog(open_store(store)).votes()
    )
    names = list(TRUTH)
    neighbours = [pairs[frozenset(pair)] for pair in itertools.pairwise(names)]  # 50-60 points apart
    extremes = pairs[frozenset((names[0], names[-1]))]  # 360 points apart
    assert len(pairs) == 28 and max(pairs.values()) < 1.6 * min(pairs.values())  # no pair starved or hogged
    assert np.mean(neighbours) > extremes


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_a_contrarian_voter_is_flagged_left_out_and_can_be_counted_back(simulated) -> None:
    board, store, app, _ = simulated
    client, headers = voter_client(app, "10.9.9.9")  # every image is made by now: no worker needed
    eyes = VoteLog(open_store(store))
    for _ in range(40):
        battle = client.post("/v1/arena/battles", json={"prompt": PROMPTS[0]}, headers=headers).json()
        record = eyes.battle(battle["id"])
        choice = "a" if TRUTH[record.model_a] < TRUTH[record.model_b] else "b"  # always the weaker one
        response = client.post(
            "/v1/arena/votes", json={"token": battle["token"], "choice": choice}, headers=headers
        )
        assert response.status_code == 201, response.text
    counted = SIMULATED_VOTES + 40
    deadline = time.monotonic() + 60  # the leaderboard is recomputed at most every `refresh_s` (5 s)
    while True:
        honest = client.get("/v1/arena/leaderboard").json()
        if honest["votes"] + honest["excluded_votes"] == counted:
            break
        assert time.monotonic() < deadline, honest
        time.sleep(0.5)
    everyone = client.get("/v1/arena/leaderboard", params={"include_flagged": True}).json()
    assert (honest["votes"], honest["excluded_votes"], honest["flagged_voters"]) == (SIMULATED_VOTES, 40, 1)
    assert (everyone["votes"], everyone["excluded_votes"]) == (counted, 0)
    assert [row["contender"] for row in honest["leaderboard"]] == [
        row["contender"] for row in board["leaderboard"]
    ]


# --- anti-abuse ---------------------------------------------------------------------------------------------------

GUARDED = [
    {"name": "alpha-contender", "model": "tiny-sd", "steps": 2},
    {"name": "beta-contender", "model": "tiny-sd", "steps": 3, "guidance_scale": 5.0},
]
MIN_VIEW_S = 30.0


@pytest.fixture(scope="module")
def guarded(
    tiny_models_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[FastAPI, Path]]:
    """An arena that wants 30 s of viewing before a vote, with caps of 3 votes a voter and 5 an address a day."""
    store = tmp_path_factory.mktemp("arena-guarded")
    settings = arena_settings(
        tiny_models_dir, store, arena_contenders=GUARDED, arena_min_view_s=MIN_VIEW_S, arena_seeds_per_prompt=1,
        arena_votes_per_day=3, arena_votes_per_ip_per_day=5, arena_battles_per_minute=1e9, arena_battle_ttl_s=600,
    )  # fmt: skip
    app = create_app(settings)
    with TestClient(app):  # runs the worker while the module's tests use clients of their own addresses
        yield app, store


@pytest.fixture
def later(guarded) -> Iterator[Callable[[float], None]]:
    """Move the arena's clock forward (the viewing time passes, tokens expire) without waiting."""
    app, _ = guarded
    arena = app.state.arena

    def advance(seconds: float) -> None:
        arena.clock = (lambda: time.time() + seconds) if seconds else time.time

    yield advance
    arena.clock = time.time


def vote_after_viewing(
    later: Callable[[float], None], client: TestClient, headers: dict[str, str], token: str, choice: str
) -> httpx.Response:
    """Vote once the viewing time has passed, as far as the arena's clock can tell."""
    later(MIN_VIEW_S + 1)
    try:
        return client.post("/v1/arena/votes", json={"token": token, "choice": choice}, headers=headers)
    finally:
        later(0)


def voter_client(app: FastAPI, address: str) -> tuple[TestClient, dict[str, str]]:
    client = TestClient(app, client=(address, 50000))
    return client, {"X-Arena-Voter": client.post("/v1/arena/voters").json()["voter"]}


def ready_battle(client: TestClient, headers: dict[str, str]) -> dict:
    created = client.post("/v1/arena/battles", json={"prompt": PROMPTS[0]}, headers=headers)
    assert created.status_code == 201, created.text
    return {**wait_ready(client, created.json(), headers), "token": created.json()["token"]}


def assert_error(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code, response.text


def test_forged_replayed_expired_and_other_voters_tokens_are_refused_and_not_counted(guarded, later) -> None:
    app, store = guarded
    alice, alice_headers = voter_client(app, "10.0.1.1")
    mallory, mallory_headers = voter_client(app, "10.0.1.2")
    battle = ready_battle(alice, alice_headers)
    token = battle["token"]
    battle_id, expires, signature = token.split(".")
    forged = [
        f"{battle_id}.{expires}.{'0' * 64}",  # made-up signature
        f"{battle_id}.{int(expires) + 3600}.{signature}",  # a later expiry under the old signature
        f"{battle_id[:-1]}{'0' if battle_id[-1] != '0' else '1'}.{expires}.{signature}",  # another battle
        "not-a-token",
    ]
    before = len(stored_votes(store))
    for fake in forged:
        assert_error(alice.post("/v1/arena/votes", json={"token": fake, "choice": "a"}, headers=alice_headers),
                     403, "invalid_battle_token")  # fmt: skip
    assert_error(mallory.post("/v1/arena/votes", json={"token": token, "choice": "b"}, headers=mallory_headers),
                 403, "invalid_battle_token")  # fmt: skip
    later(2 * 600)
    assert_error(alice.post("/v1/arena/votes", json={"token": token, "choice": "a"}, headers=alice_headers),
                 410, "battle_expired")  # fmt: skip
    assert len(stored_votes(store)) == before
    first = vote_after_viewing(later, alice, alice_headers, token, "a")
    assert first.status_code == 201, first.text
    assert_error(vote_after_viewing(later, alice, alice_headers, token, "b"), 409, "already_voted")
    assert len(stored_votes(store)) == before + 1
    vote = VoteLog(open_store(store)).votes()[-1]
    assert (vote["question_id"], vote["winner"]) == (battle_id, "model_a")


def test_a_vote_within_the_viewing_time_is_refused_and_counts_once_it_has_passed(guarded, later) -> None:
    app, store = guarded
    client, headers = voter_client(app, "10.0.2.1")
    battle = ready_battle(client, headers)
    assert 0 < battle["vote_in_s"] <= MIN_VIEW_S
    before = len(stored_votes(store))
    early = client.post("/v1/arena/votes", json={"token": battle["token"], "choice": "tie"}, headers=headers)
    assert_error(early, 429, "vote_too_early")
    assert 1 <= int(early.headers["Retry-After"]) <= MIN_VIEW_S
    assert len(stored_votes(store)) == before
    later(MIN_VIEW_S + 1)
    assert client.get(f"/v1/arena/battles/{battle['id']}", headers=headers).json()["vote_in_s"] == 0
    on_time = vote_after_viewing(later, client, headers, battle["token"], "tie")
    assert on_time.status_code == 201, on_time.text
    assert len(stored_votes(store)) == before + 1


def test_votes_stop_at_the_daily_caps_of_a_voter_and_of_an_address(guarded, later) -> None:
    app, store = guarded
    address = "10.0.3.1"
    first, first_headers = voter_client(app, address)
    second, second_headers = voter_client(app, address)
    before = len(stored_votes(store))
    for _ in range(3):
        battle = ready_battle(first, first_headers)
        assert vote_after_viewing(later, first, first_headers, battle["token"], "a").status_code == 201
    battle = ready_battle(first, first_headers)
    over = vote_after_viewing(later, first, first_headers, battle["token"], "a")
    assert_error(over, 429, "vote_limit_exceeded")
    assert "a voter" in over.json()["error"]["message"] and int(over.headers["Retry-After"]) > 0
    for expected in (201, 201, 429):  # the address's 4th and 5th votes count, its 6th does not
        battle = ready_battle(second, second_headers)
        response = vote_after_viewing(later, second, second_headers, battle["token"], "b")
        assert response.status_code == expected, response.text
    assert "an address" in response.json()["error"]["message"]
    assert len(stored_votes(store)) == before + 5


def test_a_voter_starting_battles_too_fast_is_slowed_down(tiny_models_dir: Path, tmp_path: Path) -> None:
    settings = arena_settings(tiny_models_dir, tmp_path, arena_contenders=GUARDED, arena_battles_per_minute=6)
    client = TestClient(create_app(settings))
    headers = {"X-Arena-Voter": client.post("/v1/arena/voters").json()["voter"]}
    assert client.post("/v1/arena/battles", json={"prompt": "x"}, headers=headers).status_code == 201
    assert_error(
        client.post("/v1/arena/battles", json={"prompt": "x"}, headers=headers), 429, "rate_limit_exceeded"
    )


def test_nothing_before_the_vote_names_a_contender_and_the_reveal_does(guarded, later) -> None:
    app, _ = guarded
    client, headers = voter_client(app, "10.0.4.1")
    secrets_of_the_battle = [
        b"alpha-contender",
        b"beta-contender",
        b"tiny-sd",
        b"arena.",
    ]  # names, model, job ids
    seen: list[bytes] = []
    created = client.post("/v1/arena/battles", json={"prompt": "a green triangle"}, headers=headers)
    seen += [created.content, json.dumps(dict(created.headers)).encode()]
    battle = wait_ready(client, created.json(), headers)
    status = client.get(f"/v1/arena/battles/{battle['id']}", headers=headers)
    seen += [status.content, json.dumps(dict(status.headers)).encode()]
    for side in ("a", "b"):
        image = client.get(f"/v1/arena/battles/{battle['id']}/images/{side}", headers=headers)
        assert image.headers["content-type"] == "image/png"
        assert not Image.open(io.BytesIO(image.content)).text  # no PNG text chunks: parameters name the model
        seen += [image.content, json.dumps(dict(image.headers)).encode()]
    for secret in secrets_of_the_battle:
        assert not any(secret in body for body in seen), secret
    reveal = vote_after_viewing(later, client, headers, created.json()["token"], "b")
    assert reveal.status_code == 201, reveal.text
    body = reveal.json()
    assert {body["model_a"]["name"], body["model_b"]["name"]} == {"alpha-contender", "beta-contender"}
    assert body["winner"] == "model_b" and body["image_a"].startswith("arena.")


def test_a_voter_needs_a_genuine_credential_and_sees_only_their_own_battles(guarded) -> None:
    app, _ = guarded
    stranger = TestClient(app, client=("10.0.5.9", 50000))
    assert_error(stranger.post("/v1/arena/battles", json={}), 400, "missing_voter")
    client, headers = voter_client(app, "10.0.5.1")
    other, other_headers = voter_client(app, "10.0.5.2")
    forged = headers["X-Arena-Voter"][:-4] + "0000"
    assert_error(
        stranger.post("/v1/arena/battles", json={}, headers={"X-Arena-Voter": forged}), 403, "invalid_voter"
    )
    battle = client.post("/v1/arena/battles", json={"prompt": PROMPTS[0]}, headers=headers).json()
    assert_error(other.get(f"/v1/arena/battles/{battle['id']}", headers=other_headers), 404, "not_found")
    assert_error(
        other.get(f"/v1/arena/battles/{battle['id']}/images/a", headers=other_headers), 404, "not_found"
    )
    cookie_voter = TestClient(app, client=("10.0.5.3", 50000))
    cookie_voter.post("/v1/arena/voters")  # the credential comes back as a cookie too, for browsers
    assert cookie_voter.post("/v1/arena/battles", json={"prompt": PROMPTS[0]}).status_code == 201


def test_a_blank_prompt_takes_one_from_the_built_in_suite(guarded) -> None:
    from eval.suites import load_suite

    app, _ = guarded
    client, headers = voter_client(app, "10.0.6.1")
    battle = client.post("/v1/arena/battles", json={"prompt": "  "}, headers=headers)
    assert battle.status_code == 201
    assert battle.json()["prompt"] in {prompt.prompt for prompt in load_suite()}


def test_each_image_is_generated_once_for_every_battle_that_needs_it(guarded) -> None:
    app, store = guarded
    client, headers = voter_client(app, "10.0.7.1")
    before = list(open_store(store).list("arena/images/"))
    for _ in range(3):
        created = client.post("/v1/arena/battles", json={"prompt": "a yellow star"}, headers=headers).json()
        wait_ready(client, created, headers)
    # One image per contender, prompt and seed (one seed per prompt here): 3 battles, 2 contenders, 2 images.
    assert len(list(open_store(store).list("arena/images/"))) == len(before) + 2


# --- 20 voters at once, two API processes -------------------------------------------------------------------------


@pytest.mark.slow
def test_twenty_concurrent_voters_casting_a_thousand_votes_leave_exactly_a_thousand(
    start_api: Callable[..., str], tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Each voter alternates between two servers on one store; one vote in ten is sent twice at once, to both
    servers (a double click, a retry): exactly one of the two counts."""
    store = memory_dir()
    try:
        options = {
            "store": str(store), "arena_contenders": GUARDED, "arena_min_view_s": 0, "arena_seeds_per_prompt": 1,
            "arena_votes_per_day": 1000, "arena_votes_per_ip_per_day": 10_000, "arena_battles_per_minute": 1e9,
        }  # fmt: skip
        servers = [start_api(**options), start_api(**options, workers_in_process=0)]
        outcomes: Counter[int] = Counter()
        lock = threading.Lock()
        voted: list[str] = []

        def vote(
            voter: int, client: httpx.Client, headers: dict[str, str], battle: dict, twice: bool
        ) -> None:
            body = {"token": battle["token"], "choice": random.choice(("a", "b", "tie", "both_bad"))}
            if twice:
                with ThreadPoolExecutor(2) as pool:
                    codes = sorted(
                        pool.map(lambda url: httpx.post(f"{url}/v1/arena/votes", json=body, headers=headers,
                                                        timeout=120).status_code, servers)
                    )  # fmt: skip
                assert codes == [201, 409], codes
            else:
                codes = [client.post("/v1/arena/votes", json=body, headers=headers).status_code]
                assert codes == [201]
            with lock:
                outcomes.update(codes)
                voted.append(battle["id"])

        def voter(number: int) -> None:
            with httpx.Client(base_url=servers[number % 2], timeout=120) as first, \
                    httpx.Client(base_url=servers[1 - number % 2], timeout=120) as second:  # fmt: skip
                headers = {"X-Arena-Voter": first.post("/v1/arena/voters").json()["voter"]}
                for k in range(50):
                    client = (first, second)[k % 2]
                    created = client.post("/v1/arena/battles", json={"prompt": PROMPTS[0]}, headers=headers)
                    assert created.status_code == 201, created.text
                    battle = {**wait_ready(client, created.json(), headers), "token": created.json()["token"]}
                    vote(number, client, headers, battle, twice=k % 10 == 0)

        with ThreadPoolExecutor(20) as pool:
            list(pool.map(voter, range(20)))
        keys = stored_votes(store)
        assert len(keys) == 1000 and len(set(voted)) == 1000
        assert outcomes == {201: 1000, 409: 100}
        assert {Path(key).stem for key in keys} == set(voted)
        for url in servers:  # each server counts its own votes at once and the other's after a refresh (5 s)
            deadline = time.monotonic() + 60
            while (board := httpx.get(f"{url}/v1/arena/leaderboard", timeout=120).json())["votes"] < 1000:
                assert time.monotonic() < deadline, board
                time.sleep(1)
            assert board["votes"] + board["excluded_votes"] == 1000
    finally:
        shutil.rmtree(store, ignore_errors=True)


# --- export, ratings, configuration -------------------------------------------------------------------------------


def test_votes_export_as_fastchat_battle_records_and_ratings_as_a_leaderboard_file(
    guarded, later, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    app, store = guarded
    for k, choice in enumerate(("a", "b", "tie", "both_bad")):
        client, headers = voter_client(app, f"10.0.8.{k}")
        battle = ready_battle(client, headers)
        assert vote_after_viewing(later, client, headers, battle["token"], choice).status_code == 201
    out = tmp_path / "battles.jsonl"
    assert arena_main(["--store", str(store), "export", "-o", str(out)]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert records and len(records) == len(stored_votes(store))
    for record in records:
        assert {"model_a", "model_b", "winner", "judge", "tstamp", "prompt", "image_a", "image_b"} <= set(
            record
        )
        assert record["winner"] in ("model_a", "model_b", "tie", "tie (bothbad)")
        assert {record["model_a"], record["model_b"]} == {"alpha-contender", "beta-contender"}
        assert "address" not in record and "owner" not in record  # pseudonyms and owners stay in the store
    assert {record["winner"] for record in records} == {"model_a", "model_b", "tie", "tie (bothbad)"}
    assert [r["tstamp"] for r in records] == sorted(r["tstamp"] for r in records)

    capsys.readouterr()
    assert arena_main(["--store", str(store), "ratings", "--json", "--anchor", "alpha-contender"]) == 0
    ratings = json.loads(capsys.readouterr().out)
    rows = {row["contender"]: row for row in ratings["leaderboard"]}
    assert rows["alpha-contender"]["rating"] == 1000.0 and ratings["anchor"] == "alpha-contender"
    assert ratings["votes"] == len(records)
    leaderboard = pytest.importorskip("eval.leaderboard")
    file = tmp_path / "ratings.json"
    file.write_text(json.dumps(ratings))
    assert set(leaderboard.load_ratings(file)) == {"alpha-contender", "beta-contender"}
    assert arena_main(["--store", str(store), "ratings", "--anchor", "nobody"]) == 2


def test_contenders_default_to_every_model_at_each_preset_and_bad_ones_stop_the_server(
    tiny_models_dir: Path, tmp_path: Path
) -> None:
    from pipelines.registry import ModelRegistry

    models = ModelRegistry([tiny_models_dir]).list()
    defaults = {contender.name: contender for contender in default_contenders(models)}
    assert {f"{model.name}@{preset}" for model in models for preset in ("speed", "quality")} == set(defaults)
    tiny_sd = next(model for model in models if model.name == "tiny-sd")
    assert defaults["tiny-sd@speed"].model == "tiny-sd"
    assert defaults["tiny-sd@speed"].steps == tiny_sd.presets["speed"]["steps"]
    assert defaults["tiny-sd@quality"].steps == tiny_sd.presets["quality"]["steps"]
    with pytest.raises(ImageGenError, match="arena contender 'ghost': model 'nope' not found"):
        create_app(
            arena_settings(tiny_models_dir, tmp_path, arena_contenders=[{"name": "ghost", "model": "nope"}])
        )
    with pytest.raises(ImageGenError, match="arena_anchor 'x' is not a contender"):
        create_app(arena_settings(tiny_models_dir, tmp_path, arena_contenders=GUARDED, arena_anchor="x"))
    assert ArenaContender(name="a", model="m").model_dump(exclude_defaults=True) == {
        "name": "a",
        "model": "m",
    }
