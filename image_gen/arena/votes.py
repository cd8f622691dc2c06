"""Battles and votes in the object store, one object each, and the JSONL export of the votes.

Layout (docs/arena.md):
- `arena/battles/<day>/<battle id>.json`: who the battle was issued to, its prompt and seed, and which contender
  is on which side; read only by the server.
- `arena/votes/<day>/<battle id>.json`: the vote, a FastChat battle record. It is created only if absent, so one
  battle has at most one vote however many requests race to cast it, and a vote the store acknowledged is never
  lost: there is no second copy to disagree with.

`<day>` is the UTC day the battle was created, which its id starts with, so a reader can skip the days it has
read in full.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, TextIO

from image_gen.errors import ImageGenError
from storage.objects import NotFound, ObjectStore, PreconditionFailed

BATTLES = "arena/battles/"
VOTES = "arena/votes/"
EXPORT_FIELDS = (
    "question_id", "model_a", "model_b", "winner", "judge", "anony", "tstamp", "prompt", "prompt_id", "seed",
    "image_a", "image_b", "view_s",
)  # fmt: skip
_SETTLE_S = 3600.0  # clock skew between processes allowed for when deciding that a day's votes are all in


class AlreadyVoted(ImageGenError):
    def __init__(self, battle_id: str) -> None:
        super().__init__(
            f"battle {battle_id} already has its vote: a battle token is good for one vote",
            param="token",
            code="already_voted",
        )


def day_of(battle_id: str) -> str:
    """`2026-01-31` for a battle id starting `20260131`."""
    return f"{battle_id[:4]}-{battle_id[4:6]}-{battle_id[6:8]}"


def utc_day(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d")


@dataclass(frozen=True)
class BattleRecord:
    """A battle as stored: never sent to the voter before the vote (it names the contenders)."""

    id: str
    owner: str
    voter: str
    address: str | None
    prompt: str
    prompt_id: str | None
    seed: int
    model_a: str
    model_b: str
    contender_a: dict[str, Any]
    contender_b: dict[str, Any]
    job_a: str
    job_b: str
    created_at: float
    expires_at: float

    @classmethod
    def from_json(cls, data: bytes) -> BattleRecord:
        record = json.loads(data)
        return cls(**{name: record[name] for name in cls.__dataclass_fields__})


def battle_key(battle_id: str) -> str:
    return f"{BATTLES}{day_of(battle_id)}/{battle_id}.json"


def vote_key(battle_id: str) -> str:
    return f"{VOTES}{day_of(battle_id)}/{battle_id}.json"


@dataclass
class _Reading:
    """What this process has read of the votes: every record by key, and the last day known to be complete."""

    records: dict[str, dict[str, Any]] = field(default_factory=dict)
    complete_through: str | None = None


class VoteLog:
    """Battle and vote records in `store`; `votes` reads each vote object once per process."""

    def __init__(self, store: ObjectStore, *, battle_ttl_s: float = 1800.0) -> None:
        self.store = store
        self.battle_ttl_s = battle_ttl_s
        self._reading = _Reading()
        self._lock = threading.Lock()
        self._refreshing = threading.Lock()

    def save_battle(self, battle: BattleRecord) -> None:
        self.store.put_if_absent(battle_key(battle.id), json.dumps(vars(battle)).encode(), "application/json")

    def battle(self, battle_id: str) -> BattleRecord:
        """The battle; raises storage's NotFound."""
        return BattleRecord.from_json(self.store.get(battle_key(battle_id)).data)

    def record_vote(self, vote: dict[str, Any]) -> None:
        """Store the vote of battle `vote["question_id"]`; raises AlreadyVoted if it has one."""
        key = vote_key(vote["question_id"])
        try:
            self.store.put_if_absent(key, json.dumps(vote).encode(), "application/json")
        except PreconditionFailed:
            raise AlreadyVoted(vote["question_id"]) from None
        with self._lock:
            self._reading.records[key] = vote

    def has_vote(self, battle_id: str) -> bool:
        with self._lock:
            if vote_key(battle_id) in self._reading.records:
                return True
        return self.store.exists(vote_key(battle_id))

    def refresh(self, now: float | None = None) -> list[dict[str, Any]]:
        """Read the votes stored since the last call (by any process); returns them. Days that ended more than a
        battle's lifetime ago (and an hour of clock skew) are listed once, then skipped."""
        with self._refreshing:
            started = time.time() if now is None else now
            with self._lock:
                after = self._reading.complete_through
                known = set(self._reading.records)
            start_after = (
                f"{VOTES}{after}/~" if after else None
            )  # '~' sorts after every battle id of that day
            fresh = {}
            for key in self.store.list(VOTES, start_after=start_after):
                if key in known or not key.endswith(".json"):
                    continue
                try:
                    fresh[key] = json.loads(self.store.get(key).data)
                except NotFound:  # deleted by an operator meanwhile
                    continue
            settled = datetime.fromtimestamp(started - self.battle_ttl_s - _SETTLE_S, UTC) - timedelta(days=1)
            with self._lock:
                new = [record for key, record in fresh.items() if key not in self._reading.records]
                self._reading.records.update(fresh)
                self._reading.complete_through = settled.strftime("%Y-%m-%d")
            return new

    def votes(self, *, refresh: bool = True) -> list[dict[str, Any]]:
        """Every vote stored (with `refresh`; else every vote read so far), oldest first."""
        if refresh:
            self.refresh()
        with self._lock:
            records = list(self._reading.records.values())
        return sorted(records, key=lambda record: (record["tstamp"], record["question_id"]))

    def export(self, out: TextIO, votes: Iterable[dict[str, Any]] | None = None) -> int:
        """Write the votes (default: all) as JSONL battle records, oldest first; returns how many."""
        count = 0
        for vote in export_records(self.votes() if votes is None else votes):
            out.write(json.dumps(vote, ensure_ascii=False) + "\n")
            count += 1
        return count


def export_records(votes: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """The votes as FastChat battle records (EXPORT_FIELDS): the address pseudonym and owner stay in the store."""
    for vote in votes:
        yield {name: vote.get(name) for name in EXPORT_FIELDS}
