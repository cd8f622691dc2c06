"""Studio sign-in: an API key's name and secret, the owner each signed-in name maps to, and when that ends."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import gradio as gr
import pytest

from image_gen.auth import KeyStore
from storage.objects import LocalObjectStore
from ui import login as login_module
from ui.login import LOCAL_OWNER, StudioLogin


def _request(username: str | None) -> gr.Request:
    return SimpleNamespace(username=username)  # type: ignore[return-value]


@pytest.fixture
def keys(tmp_path: Path) -> KeyStore:
    return KeyStore(LocalObjectStore(tmp_path), cache_s=0)


def test_without_keys_everyone_is_the_local_user_until_keys_appear(keys: KeyStore, monkeypatch) -> None:
    monkeypatch.setattr(login_module, "RECHECK_S", 0.0)
    login = StudioLogin(keys)
    assert not login.enabled
    assert login.owner(_request(None)) == LOCAL_OWNER

    keys.create("alice")

    with pytest.raises(gr.Error, match="restart the server"):
        login.owner(_request(None))


def test_the_user_name_is_the_keys_name_and_the_password_its_secret(keys: KeyStore) -> None:
    alice, alice_secret = keys.create("alice")
    _, bob_secret = keys.create("bob")
    login = StudioLogin(keys)
    assert login.enabled

    assert not login.check("alice", bob_secret)
    assert not login.check("alice", "igk-000000000000-" + "x" * 43)
    assert login.check(" alice ", alice_secret + "\n")

    assert login.owner(_request("alice")) == alice.owner
    with pytest.raises(gr.Error, match="sign in again"):
        login.owner(_request("bob"))  # never signed in
    with pytest.raises(gr.Error, match="sign in again"):
        login.owner(_request(None))


def test_two_keys_with_one_name_sign_in_apart_by_id(keys: KeyStore) -> None:
    first, first_secret = keys.create("design team")
    second, second_secret = keys.create("design team")
    login = StudioLogin(keys)
    assert login.check("design team", first_secret)

    assert not login.check("design team", second_secret)  # the name is taken by a live key's session
    assert login.check(second.id, second_secret)

    assert login.owner(_request("design team")) == first.owner
    assert login.owner(_request(second.id)) == second.owner


def test_a_revoked_keys_session_ends(keys: KeyStore, monkeypatch) -> None:
    monkeypatch.setattr(login_module, "RECHECK_S", 0.0)
    alice, secret = keys.create("alice")
    login = StudioLogin(keys)
    assert login.check("alice", secret)

    keys.revoke(alice.id)

    with pytest.raises(gr.Error, match="revoked"):
        login.owner(_request("alice"))
    assert not login.check("alice", secret)
