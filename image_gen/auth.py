"""API keys: created once, shown once, stored hashed in the object store; and the server secret that signs links.

Keys live at `auth/keys/<id>.json` in the store, so every API process on a shared store sees the same keys. A
secret is `igk-<id>-<43 random url-safe characters>`: the id finds the record in one read and the SHA-256 of the
whole secret is compared in constant time (a slow password hash buys nothing for 256 random bits).
`image-gen keys create|list|revoke` is `main` below.
"""

from __future__ import annotations

import argparse
import builtins
import hashlib
import hmac
import json
import re
import secrets
import sys
import threading
import time
from dataclasses import asdict, dataclass

from image_gen.errors import ImageGenError
from storage.objects import NotFound, ObjectStore, PreconditionFailed, StorageError

KEYS_PREFIX = "auth/keys/"
SERVER_SECRET_KEY = "auth/server-secret"
_SECRET = re.compile(r"igk-([0-9a-f]{12})-[A-Za-z0-9_-]{43}")
_KEY_ID = re.compile(r"[0-9a-f]{12}")
_CAS_TRIES = 8
_NEGATIVE_CACHE_SIZE = 10_000


@dataclass(frozen=True)
class ApiKey:
    """A key's public record. `owner` owns the jobs and images made with it (a valid JobQueue owner name)."""

    id: str
    name: str
    owner: str
    rate_per_minute: float | None
    max_concurrent: int | None
    created_at: float
    revoked: bool = False


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _check_limits(name: str, rate_per_minute: float | None, max_concurrent: int | None) -> None:
    if not name or len(name) > 100 or not name.isprintable():
        raise ImageGenError("a key's name is 1 to 100 printable characters", param="name")
    if rate_per_minute is not None and not 0 < rate_per_minute < float("inf"):
        raise ImageGenError(
            f"rate must be a number > 0 (requests per minute), got {rate_per_minute}", param="rate"
        )
    if max_concurrent is not None and max_concurrent < 1:
        raise ImageGenError(
            f"max concurrent jobs must be at least 1, got {max_concurrent}", param="max_concurrent"
        )


class KeyStore:
    """Create, verify, list and revoke API keys kept in `store`.

    Records read for `verify` are cached for `cache_s` seconds per process, so a revocation made by another
    process takes effect within that time (at once in the process that revoked)."""

    def __init__(self, store: ObjectStore, *, cache_s: float = 5.0) -> None:
        self.store = store
        self.cache_s = cache_s
        self._lock = threading.Lock()
        self._records: dict[str, tuple[float, dict | None]] = {}  # id -> (read at, record or None if absent)
        self._any: tuple[float, bool] | None = None

    def create(
        self, name: str, *, rate_per_minute: float | None = None, max_concurrent: int | None = None
    ) -> tuple[ApiKey, str]:
        """A new key and its secret; the secret is not stored and cannot be shown again."""
        _check_limits(name, rate_per_minute, max_concurrent)
        for _ in range(_CAS_TRIES):
            key_id = secrets.token_hex(6)
            secret = f"igk-{key_id}-{secrets.token_urlsafe(32)}"
            key = ApiKey(
                id=key_id,
                name=name,
                owner=f"key-{key_id}",
                rate_per_minute=None if rate_per_minute is None else float(rate_per_minute),
                max_concurrent=max_concurrent,
                created_at=time.time(),
            )
            record = {**asdict(key), "secret_sha256": _hash(secret)}
            try:
                self.store.put_if_absent(self._path(key_id), json.dumps(record).encode(), "application/json")
            except PreconditionFailed:
                continue  # 48 random bits collided: draw again
            with self._lock:
                self._records[key_id] = (time.monotonic(), record)
                self._any = (time.monotonic(), True)
            return key, secret
        raise ImageGenError("could not allocate a key id", code="conflict")

    def verify(self, secret: str) -> ApiKey | None:
        """The live key this secret belongs to; None for an unknown, malformed or revoked secret."""
        match = _SECRET.fullmatch(secret)
        if match is None:
            return None
        record = self._cached(match.group(1))
        if record is None or record.get("revoked"):
            return None
        if not hmac.compare_digest(record["secret_sha256"], _hash(secret)):
            return None
        return _key(record)

    def cached(self, secret: str) -> ApiKey | None:
        """The live key of a secret whose record this process read within `cache_s`, without touching the store;
        None when that is not known (then `verify` decides). For callers that must not block."""
        match = _SECRET.fullmatch(secret)
        hit = self._records.get(match.group(1)) if match else None
        if (
            hit is None
            or hit[1] is None
            or time.monotonic() - hit[0] >= self.cache_s
            or hit[1].get("revoked")
        ):
            return None
        if not hmac.compare_digest(hit[1]["secret_sha256"], _hash(secret)):
            return None
        return _key(hit[1])

    def get(self, key_id: str) -> ApiKey:
        """The key (revoked or not); ImageGenError `not_found` if there is none."""
        return _key(self._read(key_id)[0])

    def list(self) -> builtins.list[ApiKey]:
        """Every key, revoked ones included, oldest first."""
        keys = []
        for path in self.store.list(KEYS_PREFIX):
            try:
                keys.append(_key(json.loads(self.store.get(path).data)))
            except NotFound:
                continue
        return sorted(keys, key=lambda key: key.created_at)

    def revoke(self, key_id: str) -> ApiKey:
        """Revoke a key for good: its secret stops working; its jobs and images stay, readable by no one."""
        for _ in range(_CAS_TRIES):
            record, etag = self._read(key_id)
            if record.get("revoked"):
                return _key(record)
            record = {**record, "revoked": True, "revoked_at": time.time()}
            try:
                self.store.put_if_match(
                    self._path(key_id), json.dumps(record).encode(), etag, "application/json"
                )
            except PreconditionFailed:
                continue
            with self._lock:
                self._records[key_id] = (time.monotonic(), record)
            return _key(record)
        raise ImageGenError(f"key {key_id}: too many concurrent updates", code="conflict")

    def any(self) -> bool:
        """Whether keys are configured: any key was ever created, revoked ones included, so that revoking the
        last key locks the server rather than opening it."""
        with self._lock:
            if self._any is not None and (self._any[1] or time.monotonic() - self._any[0] < self.cache_s):
                return self._any[1]
        found = next(iter(self.store.list(KEYS_PREFIX, limit=1)), None) is not None
        with self._lock:
            self._any = (time.monotonic(), found)
        return found

    def _path(self, key_id: str) -> str:
        return f"{KEYS_PREFIX}{key_id}.json"

    def _read(self, key_id: str) -> tuple[dict, str]:
        if not _KEY_ID.fullmatch(key_id):
            raise ImageGenError(f"no key {key_id!r}: key ids are 12 hex digits", param="id", code="not_found")
        try:
            stored = self.store.get(self._path(key_id))
        except NotFound:
            raise ImageGenError(f"no key {key_id!r}", param="id", code="not_found") from None
        return json.loads(stored.data), stored.etag

    def _cached(self, key_id: str) -> dict | None:
        now = time.monotonic()
        with self._lock:
            hit = self._records.get(key_id)
        if hit is not None and now - hit[0] < self.cache_s:
            return hit[1]
        try:
            record: dict | None = json.loads(self.store.get(self._path(key_id)).data)
        except NotFound:
            record = None
        with self._lock:
            if (
                len(self._records) >= _NEGATIVE_CACHE_SIZE
            ):  # unknown ids guessed by a client: forget them first
                for stale in [k for k, (_, r) in self._records.items() if r is None]:
                    del self._records[stale]
            self._records[key_id] = (now, record)
        return record


def _key(record: dict) -> ApiKey:
    return ApiKey(**{name: record[name] for name in ApiKey.__dataclass_fields__ if name in record})


class ServerSecret:
    """The server's signing secret: `Settings.secret_key`, else 32 random bytes created once in the store, so
    that every API process on a shared store signs alike. Purpose-specific keys are derived from it."""

    def __init__(self, store: ObjectStore, configured: str | None = None) -> None:
        self.store = store
        self._value = configured.encode() if configured else None
        self._lock = threading.Lock()

    def derive(self, purpose: str) -> bytes:
        return hmac.new(self._secret(), purpose.encode(), hashlib.sha256).digest()

    def _secret(self) -> bytes:
        with self._lock:
            if self._value is None:
                fresh = secrets.token_bytes(32).hex().encode()
                try:
                    self.store.put_if_absent(SERVER_SECRET_KEY, fresh, "text/plain")
                    self._value = fresh
                except PreconditionFailed:
                    self._value = self.store.get(SERVER_SECRET_KEY).data
            return self._value


# --- `image-gen keys` ---------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    from image_gen.cli import ArgumentParser

    parser = ArgumentParser(prog="image-gen keys", description="Create, list and revoke API keys.")
    parser.add_argument(
        "--config", metavar="FILE", help="TOML or JSON settings file (default: $IMAGE_GEN_CONFIG)"
    )
    parser.add_argument(
        "--store", help="object store: path, file://PATH or s3://BUCKET/PREFIX (default: ./data)"
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    create = commands.add_parser("create", help="make a key and print its secret (shown once)")
    create.add_argument("--name", required=True, help="who or what the key is for")
    create.add_argument(
        "--rate", type=float, metavar="R", help="generation requests per minute (default: server's)"
    )
    create.add_argument(
        "--max-concurrent", type=int, metavar="N", help="unfinished jobs at once (default: server's)"
    )
    listing = commands.add_parser("list", help="list the keys (never their secrets)")
    listing.add_argument("--json", action="store_true", help="print JSON")
    revoke = commands.add_parser("revoke", help="revoke a key for good")
    revoke.add_argument("id", help="the key's id (from `image-gen keys list`)")
    return parser


def _limit(value: float | int | None) -> str:
    return "server default" if value is None else f"{value:g}"


def _run(argv: builtins.list[str]) -> int:
    from image_gen.settings import load_settings
    from storage.objects import open_store

    args = _parser().parse_args(argv)
    settings = load_settings(args.config, store=args.store)
    try:
        keys = KeyStore(open_store(settings.store))
    except ValueError as error:
        raise ImageGenError(str(error), param="store") from error
    if args.command == "create":
        key, secret = keys.create(args.name, rate_per_minute=args.rate, max_concurrent=args.max_concurrent)
        print(secret)
        print(
            f"key {key.id} ({key.name}): rate {_limit(key.rate_per_minute)}/min, max concurrent "
            f"{_limit(key.max_concurrent)}. The secret above is shown once: store it now.",
            file=sys.stderr,
        )
    elif args.command == "list":
        listed = keys.list()
        if args.json:
            print(json.dumps([asdict(key) for key in listed], indent=2))
            return 0
        for key in listed:
            created = time.strftime("%Y-%m-%d %H:%M", time.gmtime(key.created_at))
            state = "revoked" if key.revoked else "active"
            print(
                f"{key.id}  {state:7}  {created}  rate {_limit(key.rate_per_minute)}/min  "
                f"concurrent {_limit(key.max_concurrent)}  {key.name}"
            )
    else:
        key = keys.revoke(args.id)
        print(f"revoked {key.id} ({key.name})")
    return 0


def main(argv: builtins.list[str] | None = None) -> int:
    """`image-gen keys ...`; errors print one line and return 2."""
    try:
        return _run(builtins.list(sys.argv[1:] if argv is None else argv))
    except ImageGenError as error:
        message = str(error)
    except StorageError as error:
        message = f"store: {error}"
    print(f"image-gen keys: error: {message}", file=sys.stderr)
    return 2


__all__ = ["ApiKey", "KeyStore", "ServerSecret", "main"]
