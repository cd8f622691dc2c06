"""The arena: blind battles between two contenders, votes that count once, and the ratings they add up to.

A battle goes `new_battle` (a pair favouring few battles and close ratings, sides at random, a prompt and seed,
both images through the job queue, a vote token for this voter) -> `battle` (polled until both images are
ready) -> `image` (each without metadata) -> `vote` (token, viewing time and daily caps checked; stored once) ->
the reveal. Nothing a voter receives before the vote names a contender. `leaderboard` rates the contenders from
every stored vote, leaving out voters flagged as outliers unless asked to include them.

API processes sharing a store share battles and votes; what each keeps in memory (the tallies behind pair
sampling, caps and the leaderboard) is rebuilt from the store and refreshed every `refresh_s`.
"""

from __future__ import annotations

import math
import random
import secrets
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, Literal

import numpy as np

from eval.ratings import (
    BOOTSTRAP_ROUNDS,
    ContenderRating,
    compute_mle_ratings,
    contenders_of,
    fit_strengths,
    leaderboard,
    outlier_judges,
    pair_weights,
    to_ratings,
)
from eval.suites import SuitePrompt, load_suite
from image_gen.arena.contenders import check_contenders, default_contenders, describe
from image_gen.arena.images import BattleImages
from image_gen.arena.tokens import BATTLE_ID, ArenaSigner, InvalidBattleToken, Voter
from image_gen.arena.votes import AlreadyVoted, BattleRecord, VoteLog, utc_day
from image_gen.auth import ServerSecret
from image_gen.errors import ImageGenError
from image_gen.limits import RateLimited, RateLimiter
from image_gen.service import GenerationService
from image_gen.settings import ArenaContender, Settings
from storage.objects import NotFound
from storage.queue import Job

CHOICES = {"a": "model_a", "b": "model_b", "tie": "tie", "both_bad": "tie (bothbad)"}
MAX_PROMPT_CHARS = 1000
# An address may start this many times a voter's battles: an office's voters share one address.
ADDRESS_BATTLE_FACTOR = 10
REFRESH_S = 5.0
SAMPLING_PRIOR = 0.5  # half a win each way for every pair: one virtual tie, for pair sampling only

BattleStatus = Literal["generating", "ready", "failed"]


class ArenaUnavailable(ImageGenError):
    def __init__(self, message: str) -> None:
        super().__init__(message, code="arena_unavailable")


@dataclass(frozen=True)
class BattleView:
    """What a voter may see of a battle before voting: no contender, no model, no job id."""

    id: str
    prompt: str
    status: BattleStatus
    expires_at: float
    vote_in_s: float | None  # seconds until a vote counts, once both images are ready
    token: str | None = None  # only when the battle is created


@dataclass(frozen=True)
class Reveal:
    """The answer to a vote: what was chosen, and who was on each side."""

    battle_id: str
    choice: str
    winner: str
    model_a: dict[str, Any]
    model_b: dict[str, Any]
    image_a: str
    image_b: str


@dataclass(frozen=True)
class ArenaLeaderboard:
    """Ratings with intervals and ranks, and what they were computed from."""

    rows: list[ContenderRating]
    votes: int
    excluded_votes: int
    flagged_voters: list[str]
    include_flagged: bool
    anchor: str | None
    rounds: int
    computed_at: float


def flag_outliers(votes: Sequence[dict[str, Any]]) -> dict[str, float]:
    """The voters whose votes the ratings fitted on every vote explain worse than coin flips would (with the
    evidence against each: `eval.ratings.outlier_judges`)."""
    return outlier_judges(votes, compute_mle_ratings(votes)) if votes else {}


def rate_votes(
    votes: Sequence[dict[str, Any]],
    *,
    contenders: Sequence[str] = (),
    anchor: str | None = None,
    include_flagged: bool = False,
    rounds: int = BOOTSTRAP_ROUNDS,
    computed_at: float | None = None,
) -> ArenaLeaderboard:
    """The leaderboard of the votes: outlier voters are found with ratings fitted on every vote, then left out
    (unless `include_flagged`) of the ratings, intervals and ranks. `contenders` are listed even without votes."""
    names = sorted(set(contenders) | set(contenders_of(votes)))
    flagged = flag_outliers(votes)
    counted = [vote for vote in votes if include_flagged or vote.get("judge") not in flagged]
    rows = leaderboard(counted, contenders=names, rounds=rounds, anchor=anchor if anchor in names else None)
    return ArenaLeaderboard(
        rows=rows,
        votes=len(counted),
        excluded_votes=len(votes) - len(counted),
        flagged_voters=sorted(flagged),
        include_flagged=include_flagged,
        anchor=anchor if anchor in names else None,
        rounds=rounds,
        computed_at=time.time() if computed_at is None else computed_at,
    )


class _Tally:
    """Every vote this process knows, summed the ways the arena asks: wins per pair, votes per voter and per
    address per day. `version` changes with every vote added."""

    def __init__(self) -> None:
        self.battles: set[str] = set()
        self.wins: Counter[tuple[str, str]] = Counter()  # (i, j) -> wins of i over j, a tie half each way
        self.daily: Counter[tuple[str, str, str]] = Counter()  # ("judge" | "address", day, who) -> votes
        self.version = 0

    def add(self, vote: dict[str, Any]) -> None:
        if vote["question_id"] in self.battles:
            return
        self.battles.add(vote["question_id"])
        a, b, winner = vote["model_a"], vote["model_b"], vote["winner"]
        if winner == "model_a":
            self.wins[a, b] += 1
        elif winner == "model_b":
            self.wins[b, a] += 1
        else:
            self.wins[a, b] += 0.5
            self.wins[b, a] += 0.5
        day = utc_day(vote["tstamp"])
        self.daily["judge", day, vote["judge"]] += 1
        if vote.get("address"):
            self.daily["address", day, vote["address"]] += 1
        self.version += 1


class Arena:
    """Battles, votes and ratings for the contenders of `settings`, over the service's store and queue."""

    def __init__(
        self,
        service: GenerationService,
        settings: Settings,
        secret: ServerSecret,
        limiter: RateLimiter,
        *,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.time,
        refresh_s: float = REFRESH_S,
        rounds: int = BOOTSTRAP_ROUNDS,
        suite: Sequence[SuitePrompt] | None = None,
    ) -> None:
        self.service = service
        self.settings = settings
        self.limiter = limiter
        self.images = BattleImages(service)
        configured = settings.arena_contenders or default_contenders(service.models())
        checked = check_contenders(configured, lambda contender: self.images.request(contender, "check", 0))
        self.contenders: dict[str, ArenaContender] = {contender.name: contender for contender in checked}
        if settings.arena_anchor is not None and settings.arena_anchor not in self.contenders:
            raise ImageGenError(
                f"arena_anchor {settings.arena_anchor!r} is not a contender: use one of "
                f"{', '.join(self.contenders) or '(none)'}",
                param="arena_anchor",
            )
        self.log = VoteLog(service.store, battle_ttl_s=settings.arena_battle_ttl_s)
        self.signer = ArenaSigner(secret, lambda: self.clock())  # tests move `clock` to expire tokens
        self.rng = rng or random.SystemRandom()  # the sides must not be predictable from earlier battles
        self.clock = clock
        self.refresh_s = refresh_s
        self.rounds = rounds
        self._suite = list(suite) if suite is not None else None
        self._lock = threading.Lock()
        self._refresh_lock = threading.Lock()
        self._refreshed_at: float | None = None
        self._tally = _Tally()
        self._pending: Counter[tuple[str, str, str]] = Counter()
        self._fitted: tuple[int, np.ndarray] | None = None  # the votes counted, strengths
        self._boards: dict[bool, tuple[int, float, ArenaLeaderboard]] = {}

    # --- voters -------------------------------------------------------------------------------------------------

    def new_voter(self) -> str:
        """A fresh voter credential (a cookie or the X-Arena-Voter header carries it)."""
        return self.signer.new_voter()

    def voter(self, credential: str | None, owner: str, ip: str | None) -> Voter:
        """The voter a request acts as; ImageGenError if it carries no genuine credential."""
        if not credential:
            raise ImageGenError(
                "missing voter: get a credential from POST /v1/arena/voters and send it as the X-Arena-Voter "
                "header (or the ig-arena-voter cookie)",
                param="X-Arena-Voter",
                code="missing_voter",
            )
        voter_id = self.signer.voter_id(credential)
        if voter_id is None:
            raise ImageGenError(
                "invalid voter credential: get a new one from POST /v1/arena/voters",
                param="X-Arena-Voter",
                code="invalid_voter",
            )
        return Voter(voter_id, owner, ip)

    # --- battles ------------------------------------------------------------------------------------------------

    def suite_prompt(self) -> SuitePrompt:
        """A prompt of the built-in suite, at random."""
        if self._suite is None:
            self._suite = load_suite()
        return self.rng.choice(self._suite)

    def new_battle(self, voter: Voter, prompt: str | None = None) -> BattleView:
        """Start a battle on `prompt` (None or blank: one of the suite's) and return it with its vote token."""
        text, prompt_id = self._prompt(prompt)
        first, second = self._pair()
        address = self.signer.address(voter.ip)
        rate = self.settings.arena_battles_per_minute
        self.limiter.take(f"arena-battles:{voter.key}", rate, "battles")
        if address is not None and rate is not None:
            self.limiter.take(f"arena-battles-address:{address}", rate * ADDRESS_BATTLE_FACTOR, "battles")
        seed = self.rng.randrange(self.settings.arena_seeds_per_prompt)
        job_a = self.images.job_for(first, text, seed)
        job_b = self.images.job_for(second, text, seed)
        now = self.clock()
        battle = BattleRecord(
            id=time.strftime("%Y%m%d", time.gmtime(now)) + secrets.token_hex(10),
            owner=voter.owner,
            voter=voter.id,
            address=address,
            prompt=text,
            prompt_id=prompt_id,
            seed=seed,
            model_a=first.name,
            model_b=second.name,
            contender_a=describe(first),
            contender_b=describe(second),
            job_a=job_a,
            job_b=job_b,
            created_at=now,
            expires_at=now + self.settings.arena_battle_ttl_s,
        )
        self.log.save_battle(battle)
        token = self.signer.battle_token(battle.id, voter, battle.expires_at)
        return replace(self._view(battle), token=token)

    def battle(self, voter: Voter, battle_id: str) -> BattleView:
        return self._view(self._battle(voter, battle_id))

    def image(self, voter: Voter, battle_id: str, side: str) -> bytes:
        """Side `a` or `b` of a ready battle, as a PNG without metadata."""
        if side not in ("a", "b"):
            raise ImageGenError(f"side {side!r} is not a or b", param="side")
        battle = self._battle(voter, battle_id)
        self._ready_at(battle)
        return self.images.png(battle.job_a if side == "a" else battle.job_b)

    def _prompt(self, prompt: str | None) -> tuple[str, str | None]:
        text = (prompt or "").strip()
        if not text:
            chosen = self.suite_prompt()
            return chosen.prompt, chosen.id
        if len(text) > MAX_PROMPT_CHARS:
            raise ImageGenError(f"the prompt is over {MAX_PROMPT_CHARS} characters", param="prompt")
        return text, None

    def _pair(self) -> tuple[ArenaContender, ArenaContender]:
        """Two contenders in random order, favouring pairs with few battles and close ratings (`pair_weights`)."""
        names = sorted(self.contenders)
        if len(names) < 2:
            raise ArenaUnavailable(
                "the arena needs at least two contenders: set arena_contenders, or add a model"
            )
        self._refresh_if_stale()
        ratings, counts = self._sampling_state(names)
        weights = pair_weights(ratings, counts).ravel()
        if not weights.sum() > 0:  # every pair's outcome is certain: compare them all alike
            weights = np.triu(np.ones((len(names), len(names))), k=1).ravel()
        cell = self.rng.choices(range(len(weights)), weights=weights.tolist())[0]
        pair = [names[cell // len(names)], names[cell % len(names)]]
        self.rng.shuffle(pair)
        return self.contenders[pair[0]], self.contenders[pair[1]]

    def _sampling_state(self, names: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Current ratings and battle counts of the contenders. The ratings are fitted with one virtual tie per
        pair (SAMPLING_PRIOR): a contender that won its first battle or two has an unbounded maximum-likelihood
        rating, would look decided against everyone, and would never be drawn again. They are refitted once the
        votes grew by 2% since the last fit (at every vote while there are few): sampling needs no more."""
        with self._lock:
            version = self._tally.version
            wins = np.array([[self._tally.wins[a, b] for b in names] for a in names], dtype=np.float64)
            fitted = self._fitted
        if fitted is None or version - fitted[0] >= max(1, version // 50):
            smoothed = wins + SAMPLING_PRIOR * (1 - np.eye(len(names)))
            fitted = (version, fit_strengths(smoothed, None if fitted is None else fitted[1]))
            with self._lock:
                self._fitted = fitted
        return to_ratings(fitted[1]), wins + wins.T

    def _battle(self, voter: Voter, battle_id: str) -> BattleRecord:
        """The voter's battle; another voter's is reported as not found."""
        if BATTLE_ID.fullmatch(battle_id):
            try:
                battle = self.log.battle(battle_id)
            except NotFound:
                battle = None
            if battle is not None and (battle.voter, battle.owner) == (voter.id, voter.owner):
                return battle
        raise ImageGenError(f"no battle {battle_id!r}", param="id", code="not_found")

    def _jobs(self, battle: BattleRecord) -> tuple[Job, Job]:
        return self.images.job(battle.job_a), self.images.job(battle.job_b)

    def _status(self, jobs: tuple[Job, Job]) -> BattleStatus:
        if any(job.status in ("failed", "canceled") for job in jobs):
            return "failed"
        return "ready" if all(job.status == "succeeded" for job in jobs) else "generating"

    def _view(self, battle: BattleRecord) -> BattleView:
        jobs = self._jobs(battle)
        status = self._status(jobs)
        vote_in = None
        if status == "ready":
            ready_at = max(battle.created_at, *(job.updated_at for job in jobs))
            vote_in = max(0.0, ready_at + self.settings.arena_min_view_s - self.clock())
        return BattleView(battle.id, battle.prompt, status, battle.expires_at, vote_in)

    def _ready_at(self, battle: BattleRecord) -> float:
        """When both images were ready; ImageGenError if they are not (yet)."""
        jobs = self._jobs(battle)
        status = self._status(jobs)
        if status == "failed":
            # The job's error may name the model: the voter learns only that this battle cannot go on.
            raise ImageGenError(
                "an image of this battle could not be generated: start another battle", code="battle_failed"
            )
        if status != "ready":
            raise ImageGenError(
                "the images of this battle are still being generated: poll GET /v1/arena/battles/{id}",
                code="battle_not_ready",
            )
        return max(battle.created_at, *(job.updated_at for job in jobs))

    # --- votes --------------------------------------------------------------------------------------------------

    def vote(self, voter: Voter, token: str, choice: str) -> Reveal:
        """Count the voter's choice (`a`, `b`, `tie` or `both_bad`) on the battle the token names, once."""
        if choice not in CHOICES:
            raise ImageGenError(f"choice {choice!r} is not one of {', '.join(CHOICES)}", param="choice")
        battle_id = self.signer.check_battle_token(token, voter)
        try:
            battle = self._battle(voter, battle_id)
        except ImageGenError:
            raise InvalidBattleToken("invalid battle token: its battle does not exist") from None
        if self.log.has_vote(battle_id):
            raise AlreadyVoted(battle_id)
        ready_at = self._ready_at(battle)
        now = self.clock()
        wait = ready_at + self.settings.arena_min_view_s - now
        if wait > 0:
            raise RateLimited(
                f"votes count after both images were shown for {self.settings.arena_min_view_s:g} s: "
                f"look a little longer ({math.ceil(wait)} s)",
                wait,
                code="vote_too_early",
            )
        address = self.signer.address(voter.ip)
        vote = {
            "question_id": battle.id,
            "model_a": battle.model_a,
            "model_b": battle.model_b,
            "winner": CHOICES[choice],
            "judge": voter.id,
            "owner": voter.owner,
            "address": address,
            "anony": True,
            "tstamp": now,
            "prompt": battle.prompt,
            "prompt_id": battle.prompt_id,
            "seed": battle.seed,
            "image_a": f"{battle.job_a}_0",
            "image_b": f"{battle.job_b}_0",
            "view_s": round(now - ready_at, 3),
        }
        with self._vote_slot(voter.id, address, now):
            self.log.record_vote(vote)
            with self._lock:
                self._tally.add(vote)
        return Reveal(
            battle_id=battle.id,
            choice=choice,
            winner=vote["winner"],
            model_a=battle.contender_a,
            model_b=battle.contender_b,
            image_a=vote["image_a"],
            image_b=vote["image_b"],
        )

    @contextmanager
    def _vote_slot(self, judge: str, address: str | None, now: float) -> Iterator[None]:
        """Hold a place under the voter's and the address's daily caps while the vote is stored: exact within a
        process, and across processes up to the votes cast elsewhere since the last refresh."""
        self._refresh_if_stale()
        day = utc_day(now)
        caps = [(("judge", day, judge), self.settings.arena_votes_per_day, "a voter")]
        if address is not None:
            caps.append((("address", day, address), self.settings.arena_votes_per_ip_per_day, "an address"))
        with self._lock:
            for key, cap, who in caps:
                if self._tally.daily[key] + self._pending[key] >= cap:
                    midnight = (math.floor(now / 86400) + 1) * 86400
                    raise RateLimited(
                        f"{cap} votes a day is the limit for {who}: votes count again after midnight UTC",
                        midnight - now,
                        code="vote_limit_exceeded",
                    )
            for key, _, _ in caps:
                self._pending[key] += 1
        try:
            yield
        finally:
            with self._lock:
                for key, _, _ in caps:
                    self._pending[key] -= 1
                    if not self._pending[key]:
                        del self._pending[key]

    # --- standings ----------------------------------------------------------------------------------------------

    def refresh(self) -> None:
        """Read the votes other processes stored since the last refresh."""
        with self._refresh_lock:
            self._read_new_votes()

    def _read_new_votes(self) -> None:
        fresh = self.log.refresh()
        with self._lock:
            for vote in fresh:
                self._tally.add(vote)
        self._refreshed_at = time.monotonic()

    def _refresh_if_stale(self) -> None:
        if self._refreshed_at is None:  # the first look reads everything before anything is counted
            self.refresh()
        elif time.monotonic() - self._refreshed_at >= self.refresh_s and self._refresh_lock.acquire(
            blocking=False
        ):
            try:  # one thread reads; the others carry on with the current tallies meanwhile
                self._read_new_votes()
            finally:
                self._refresh_lock.release()

    def leaderboard(self, *, include_flagged: bool = False) -> ArenaLeaderboard:
        """The ratings from every stored vote; recomputed when votes came in, at most every `refresh_s`."""
        self._refresh_if_stale()
        with self._lock:
            cached = self._boards.get(include_flagged)
            version = self._tally.version
        if cached is not None and (cached[0] == version or time.monotonic() - cached[1] < self.refresh_s):
            return cached[2]
        board = rate_votes(
            self.log.votes(refresh=False),  # the tallies and the log were refreshed together above
            contenders=list(self.contenders),
            anchor=self.settings.arena_anchor,
            include_flagged=include_flagged,
            rounds=self.rounds,
        )
        with self._lock:
            self._boards[include_flagged] = (version, time.monotonic(), board)
        return board
