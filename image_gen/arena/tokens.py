"""Arena credentials, all HMACs under keys derived from the server secret, so every API process on a shared store
checks what any of them issued and nothing needs storing:

- a voter credential `igv-<id>-<signature>`: an anonymous voter's identity, kept in a cookie or sent as the
  `X-Arena-Voter` header; per-voter caps count against its id;
- a battle token `<battle id>.<expiry>.<signature>`: the right to vote once on one battle, bound to the voter (and
  owner) it was issued to. Single use is the store's job: a vote is created only if absent.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

from image_gen.auth import ServerSecret
from image_gen.errors import ImageGenError

VOTER_COOKIE = "ig-arena-voter"
VOTER_COOKIE_AGE_S = 365 * 86400
_VOTER = re.compile(r"igv-([0-9a-f]{24})-([0-9a-f]{32})")
_TOKEN = re.compile(r"(\d{8}[0-9a-f]{20})\.(\d{1,12})\.([0-9a-f]{64})")
BATTLE_ID = re.compile(r"\d{8}[0-9a-f]{20}")


@dataclass(frozen=True)
class Voter:
    """Who votes: the voter id from their credential, the owner (API key or user) they act for, and the address
    the request came from (None when unknown)."""

    id: str
    owner: str
    ip: str | None = None

    @property
    def key(self) -> str:
        return f"{self.owner}/{self.id}"


class InvalidBattleToken(ImageGenError):
    def __init__(
        self, message: str = "invalid battle token: forged, altered, or issued to another voter"
    ) -> None:
        super().__init__(message, param="token", code="invalid_battle_token")


class ArenaSigner:
    """Issues and checks voter credentials and battle tokens; hashes addresses for the records."""

    def __init__(self, secret: ServerSecret, clock: Callable[[], float] = time.time) -> None:
        self._secret = secret
        self._clock = clock
        self._keys: dict[str, bytes] = {}

    def _mac(self, purpose: str, message: str) -> str:
        key = self._keys.get(purpose)
        if key is None:  # derived on first use: the secret may be created in the store then
            key = self._keys[purpose] = self._secret.derive(f"arena-{purpose}")
        return hmac.new(key, message.encode(), hashlib.sha256).hexdigest()

    def new_voter(self) -> str:
        """A fresh voter credential."""
        voter_id = secrets.token_hex(12)
        return f"igv-{voter_id}-{self._mac('voter', voter_id)[:32]}"

    def voter_id(self, credential: str | None) -> str | None:
        """The voter id of a genuine credential, else None."""
        match = _VOTER.fullmatch(credential or "")
        if match is None:
            return None
        voter_id, signature = match.groups()
        return voter_id if hmac.compare_digest(self._mac("voter", voter_id)[:32], signature) else None

    def battle_token(self, battle_id: str, voter: Voter, expires_at: float) -> str:
        expires = int(expires_at)
        return f"{battle_id}.{expires}.{self._mac('battle', f'{battle_id}|{voter.key}|{expires}')}"

    def check_battle_token(self, token: str, voter: Voter) -> str:
        """The battle a token names, if this server issued it to `voter` and it has not expired; raises
        InvalidBattleToken (403) or ImageGenError `battle_expired` (410) otherwise."""
        match = _TOKEN.fullmatch(token)
        if match is None:
            raise InvalidBattleToken("invalid battle token: not one this server issues")
        battle_id, expires, signature = match.groups()
        if not hmac.compare_digest(self._mac("battle", f"{battle_id}|{voter.key}|{expires}"), signature):
            raise InvalidBattleToken()
        if int(expires) < self._clock():
            raise ImageGenError(
                "this battle has expired: start a new one", param="token", code="battle_expired"
            )
        return battle_id

    def address(self, ip: str | None) -> str | None:
        """A pseudonym of an IP address for the records: the per-address caps need equality, not the address."""
        return None if ip is None else self._mac("address", ip)[:20]
