"""Shared route dependencies: the service, settings and key store, the caller (API key auth and its request rate),
and the submission of generations (generation rate, concurrent-job quota, webhooks)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, TypeVar

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.concurrency import run_in_threadpool

from image_gen.api.submission import Submission
from image_gen.auth import ApiKey, KeyStore
from image_gen.errors import ImageGenError
from image_gen.limits import RateLimiter
from image_gen.server import is_loopback
from image_gen.service import GenerationService
from image_gen.settings import Settings
from image_gen.webhooks import WebhookDispatcher
from storage.objects import LocalObjectStore

LOCAL_OWNER = "local"
T = TypeVar("T")

bearer = HTTPBearer(
    auto_error=False,
    description="an API key from `image-gen keys create` (not needed while the server has no keys)",
)


@dataclass(frozen=True)
class Caller:
    """Who is calling: the owner of the jobs and images they make, and their key (None on a server without keys,
    where everyone is the single local user)."""

    owner: str
    key: ApiKey | None


# The getters are `async` because they do no I/O: FastAPI then calls them in the event loop instead of sending
# each to the thread pool, a hop per dependency per request.
async def get_service(request: Request) -> GenerationService:
    return request.app.state.service


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_keys(request: Request) -> KeyStore:
    return request.app.state.keys


async def get_limiter(request: Request) -> RateLimiter:
    return request.app.state.limiter


async def get_submission(request: Request) -> Submission:
    return request.app.state.submission


async def get_webhooks(request: Request) -> WebhookDispatcher:
    return request.app.state.webhooks


Service = Annotated[GenerationService, Depends(get_service)]
AppSettings = Annotated[Settings, Depends(get_settings)]
Keys = Annotated[KeyStore, Depends(get_keys)]
Limiter = Annotated[RateLimiter, Depends(get_limiter)]
Submit = Annotated[Submission, Depends(get_submission)]
Webhooks = Annotated[WebhookDispatcher, Depends(get_webhooks)]
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]


def authenticate(
    keys: KeyStore, settings: Settings, limiter: RateLimiter, credentials: Credentials
) -> Caller:
    """The caller of a request: with keys configured, the key in `Authorization: Bearer`; without, the local
    user, unless the server listens beyond loopback without `insecure` (it then admits no one)."""
    if not keys.any():
        if is_loopback(settings.host) or settings.insecure:
            return Caller(LOCAL_OWNER, None)
        raise ImageGenError(
            "this server has no API keys and is not on loopback: create one with `image-gen keys create`",
            code="invalid_api_key",
        )
    if credentials is None:
        raise ImageGenError(
            "missing API key: send the header `Authorization: Bearer <key>`", code="missing_api_key"
        )
    key = keys.verify(credentials.credentials)
    if key is None:
        raise ImageGenError("invalid API key (unknown, malformed or revoked)", code="invalid_api_key")
    limiter.take(f"requests:{key.id}", settings.requests_per_minute, "requests")
    return Caller(key.owner, key)


async def get_caller(keys: Keys, settings: AppSettings, limiter: Limiter, credentials: Credentials) -> Caller:
    """A key this process verified lately is taken from memory in the event loop; anything else is verified
    against the store in the thread pool."""
    key = keys.cached(credentials.credentials) if credentials is not None else None
    if key is None:
        return await run_in_threadpool(authenticate, keys, settings, limiter, credentials)
    limiter.take(f"requests:{key.id}", settings.requests_per_minute, "requests")
    return Caller(key.owner, key)


def get_optional_caller(
    keys: Keys, settings: AppSettings, limiter: Limiter, credentials: Credentials
) -> Caller | None:
    """The caller, or None for a request without credentials on a server with keys (e.g. a signed image link)."""
    if credentials is None and keys.any():
        return None
    return authenticate(keys, settings, limiter, credentials)


CurrentCaller = Annotated[Caller, Depends(get_caller)]
OptionalCaller = Annotated[Caller | None, Depends(get_optional_caller)]


async def read_store(service: GenerationService, read: Callable[..., T], *args: object) -> T:
    """`read(*args)`, a function that only reads the store: in the event loop on a local store, whose reads are
    page-cache file reads shorter than a hop to the thread pool (under load, a hop waits for the GIL: milliseconds);
    in the thread pool on S3, whose reads are network round trips that must not stall the loop."""
    if isinstance(service.store, LocalObjectStore):
        return read(*args)
    return await run_in_threadpool(read, *args)
