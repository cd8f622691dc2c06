"""Who is using the studio: with API keys configured, the key named at sign-in (password: its secret); without,
the single local user of a loopback server."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import gradio as gr

from image_gen.auth import ApiKey, KeyStore
from image_gen.errors import ImageGenError

LOCAL_OWNER = "local"
RECHECK_S = 5.0  # how long a signed-in key or "no keys configured" is trusted before the store is read again


@dataclass(frozen=True)
class StudioUser:
    """The owner whose jobs and images a request may see, and the key that signed in (None: the local user)."""

    owner: str
    key: ApiKey | None


class StudioLogin:
    """Gradio's `auth` callback, and the map from a signed-in user name to its key.

    The user name is the key's name (or its id, which is unique where two keys share a name); the password is the
    key's secret. Whether to ask for a login is decided when the studio is mounted: keys configured then mean a login
    page. A revoked key's sessions end within `RECHECK_S`. Keys created later, while the studio runs without a
    login, stop the local user until the server restarts and asks for one.
    """

    def __init__(self, keys: KeyStore) -> None:
        self.keys = keys
        self.enabled = keys.any()
        self._signed_in: dict[str, tuple[ApiKey, float]] = {}  # user name -> (key, when last checked)
        self._lock = threading.Lock()
        self._keys_appeared = self.enabled
        self._keys_checked_at = time.monotonic()

    def check(self, username: str, password: str) -> bool:
        """Gradio's auth callback."""
        name = username.strip()
        key = self.keys.verify(password.strip())
        if key is None or name not in (key.name, key.id):
            return False
        with self._lock:
            current = self._signed_in.get(name)
        if current is not None and current[0].owner != key.owner and self._live(current[0]):
            return False  # another live key already signed in under this name: its id tells them apart
        with self._lock:
            self._signed_in[name] = (key, time.monotonic())
        return True

    def user(self, request: gr.Request | None) -> StudioUser:
        """The request's user; raises gr.Error when it has none (signed out, key revoked)."""
        if not self.enabled:
            self._check_still_local()
            return StudioUser(LOCAL_OWNER, None)
        name = getattr(request, "username", None)
        with self._lock:
            entry = self._signed_in.get(name) if name else None
        if entry is None:
            raise gr.Error("Your session has ended: reload the page and sign in again.", title="Signed out")
        key, checked_at = entry
        if time.monotonic() - checked_at >= RECHECK_S:
            if not self._live(key):
                with self._lock:
                    self._signed_in.pop(name, None)
                raise gr.Error("Your API key was revoked: sign in with another one.", title="Signed out")
            with self._lock:
                self._signed_in[name] = (key, time.monotonic())
        return StudioUser(key.owner, key)

    def owner(self, request: gr.Request | None) -> str:
        return self.user(request).owner

    def user_name(self, request: gr.Request | None) -> str | None:
        """The signed-in user's name, None for the local user."""
        return getattr(request, "username", None) if self.enabled else None

    def _live(self, key: ApiKey) -> bool:
        try:
            return not self.keys.get(key.id).revoked
        except ImageGenError:  # deleted from the store
            return False

    def _check_still_local(self) -> None:
        now = time.monotonic()
        if now - self._keys_checked_at >= RECHECK_S:
            self._keys_checked_at = now
            self._keys_appeared = self.keys.any()
        if self._keys_appeared:
            raise gr.Error(
                "API keys were created after the studio started: restart the server to sign in with one.",
                title="Sign-in required",
            )
