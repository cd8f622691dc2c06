"""API keys: the key store and `image-gen keys`, Bearer auth on every route, keys kept apart (404), per-key rate
limits and concurrent-job quotas (429 with Retry-After), and the loopback-only rule of a server without keys."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from image_gen import cli
from image_gen.api.deps import authenticate
from image_gen.auth import KeyStore, main
from image_gen.errors import ImageGenError
from image_gen.limits import RateLimiter
from image_gen.server import check_exposure
from image_gen.settings import load_settings
from storage.objects import open_store

OPEN_ROUTES = {"/healthz", "/readyz", "/metrics"}
QUEUE_OWNER = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,99}")
LONG_JOB = {"prompt": "long", "steps": 150, "n": 4, "size": "64x64"}


@dataclass
class KeyedServer:
    url: str
    keys: KeyStore
    alice: str
    bob: str
    slow: str
    single: str

    def client(self, secret: str | None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {secret}"} if secret else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=60)


@pytest.fixture(scope="module")
def keyed(start_api: Callable[..., str], tmp_path_factory: pytest.TempPathFactory) -> KeyedServer:
    store = tmp_path_factory.mktemp("keyed-store")
    keys = KeyStore(open_store(store))
    secrets = {
        "alice": keys.create("alice")[1],
        "bob": keys.create("bob")[1],
        "slow": keys.create("slow", rate_per_minute=2)[1],
        "single": keys.create("single", max_concurrent=1)[1],
    }
    return KeyedServer(start_api(store=str(store), auth_cache_s=0.2), keys, **secrets)


def wait_for(client: httpx.Client, job_id: str) -> dict:
    deadline = time.monotonic() + 60
    while (job := client.get(f"/v1/jobs/{job_id}").json())["status"] in ("queued", "running"):
        assert time.monotonic() < deadline, job
        time.sleep(0.05)
    return job


def test_key_store_hashes_secrets_and_verifies_them(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    keys = KeyStore(store, cache_s=0)
    assert not keys.any()
    key, secret = keys.create("ci", rate_per_minute=30, max_concurrent=2)
    assert keys.any() and QUEUE_OWNER.fullmatch(key.owner) and key.owner != "local"
    stored = b"".join(store.get(path).data for path in store.list("auth/"))
    assert secret.encode() not in stored and secret.rsplit("-", 1)[1].encode() not in stored
    assert keys.verify(secret) == key
    assert keys.verify(secret[:-1] + ("A" if secret[-1] != "A" else "B")) is None
    assert keys.verify("igk-000000000000-" + "x" * 43) is None
    assert keys.verify("") is None and keys.verify("Bearer " + secret) is None
    assert [k.id for k in keys.list()] == [key.id]
    assert keys.revoke(key.id).revoked
    assert keys.verify(secret) is None
    assert keys.any(), "a revoked last key keeps the server locked, never opens it"
    other = KeyStore(store)
    assert other.get(key.id).revoked
    with pytest.raises(ImageGenError, match="no key"):
        other.revoke("0123456789ab")


def test_keys_cli_creates_lists_and_revokes(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    store = ["--store", str(tmp_path)]
    assert main([*store, "create", "--name", "ci bot", "--rate", "30", "--max-concurrent", "2"]) == 0
    out, err = capsys.readouterr()
    secret = out.strip()
    assert re.fullmatch(r"igk-[0-9a-f]{12}-[\w-]{43}", secret) and "shown once" in err
    key = KeyStore(open_store(tmp_path)).verify(secret)
    assert key is not None and (key.name, key.rate_per_minute, key.max_concurrent) == ("ci bot", 30.0, 2)
    assert cli.main(["keys", *store, "list", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["id"] == key.id
    assert main([*store, "revoke", key.id]) == 0
    assert f"revoked {key.id}" in capsys.readouterr().out
    assert main([*store, "list"]) == 0
    assert "revoked" in capsys.readouterr().out
    for argv in (["create"], ["create", "--name", "x", "--rate", "-1"], ["revoke", "nope"], ["frobnicate"]):
        assert main([*store, *argv]) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("image-gen keys: error: ") and err.count("\n") == 1, err


def test_serve_refuses_a_public_address_without_keys_unless_insecure(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    public = load_settings(store=str(tmp_path), host="0.0.0.0")
    with pytest.raises(ImageGenError, match="--insecure"):
        check_exposure(public)
    check_exposure(load_settings(store=str(tmp_path), host="127.0.0.1"))
    check_exposure(load_settings(store=str(tmp_path), host="0.0.0.0", insecure=True))
    assert cli.main(["serve", "--host", "0.0.0.0", "--store", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "refusing to listen on 0.0.0.0" in err and err.count("\n") == 1
    with pytest.raises(ImageGenError) as refused:  # and a keyless app behind such an address admits no one
        authenticate(KeyStore(open_store(tmp_path)), public, RateLimiter(), None)
    assert refused.value.code == "invalid_api_key"
    KeyStore(open_store(tmp_path)).create("ops")
    check_exposure(public)


def test_every_route_but_health_and_metrics_needs_a_valid_key(keyed: KeyedServer) -> None:
    schema = httpx.get(f"{keyed.url}/openapi.json").json()
    operations = [
        (method.upper(), re.sub(r"\{[^}]+\}", "x", path))
        for path, item in schema["paths"].items()
        for method in item
    ]
    assert len(operations) >= 15
    revoked = keyed.keys.create("gone")[1]
    keyed.keys.revoke(keyed.keys.verify(revoked).id)
    for secret in (None, "igk-000000000000-" + "A" * 43, "not-a-key", revoked):
        with keyed.client(secret) as client:
            for method, path in operations:
                response = client.request(method, path, json={"prompt": "x"} if method == "POST" else None)
                if path in OPEN_ROUTES:
                    assert response.status_code == 200, (method, path, response.text)
                    continue
                assert response.status_code == 401, (secret, method, path, response.text)
                assert response.headers["www-authenticate"].startswith("Bearer")
                assert response.json()["error"]["code"] in ("missing_api_key", "invalid_api_key")


def test_another_key_gets_404_for_my_job_and_image(keyed: KeyedServer) -> None:
    with keyed.client(keyed.alice) as alice, keyed.client(keyed.bob) as bob:
        job = alice.post("/v1/jobs", json={"prompt": "mine", "steps": 1, "size": "32x32"}).json()
        job = wait_for(alice, job["id"])
        image_url = job["images"][0]["url"]
        assert alice.get(image_url).status_code == 200
        for response in (
            bob.get(f"/v1/jobs/{job['id']}"),
            bob.get(f"/v1/jobs/{job['id']}/events"),
            bob.get(f"/v1/jobs/{job['id']}/webhook"),
            bob.post(f"/v1/jobs/{job['id']}/cancel"),
            bob.get(image_url),
            bob.get(image_url, params={"thumbnail": True}),
        ):
            assert response.status_code == 404, response.request.url
            assert response.json()["error"]["code"] == "not_found"
        assert job["id"] not in [j["id"] for j in bob.get("/v1/jobs").json()["data"]]
        assert job["id"] in [j["id"] for j in alice.get("/v1/jobs").json()["data"]]
        assert bob.get("/sdapi/v1/progress").json()["state"]["job"] == ""


def test_url_format_links_work_without_a_key_but_image_paths_need_one(keyed: KeyedServer) -> None:
    with keyed.client(keyed.alice) as alice:
        response = alice.post(
            "/v1/images/generations",
            json={"prompt": "x", "size": "32x32", "steps": 1, "response_format": "url"},
        )
        url = response.json()["data"][0]["url"]
    assert httpx.get(url).status_code == 200
    assert httpx.get(url.split("?")[0]).status_code == 401


def test_a_revoked_key_stops_working(keyed: KeyedServer) -> None:
    key, secret = keyed.keys.create("temporary")
    with keyed.client(secret) as client:
        assert client.get("/v1/models").status_code == 200
        KeyStore(keyed.keys.store).revoke(key.id)  # as `image-gen keys revoke` in another process would
        time.sleep(0.3)  # the server's auth_cache_s
        assert client.get("/v1/models").status_code == 401


def test_rate_limit_gives_429_with_retry_after(keyed: KeyedServer) -> None:
    with keyed.client(keyed.slow) as client:
        first = client.post("/v1/jobs", json={"prompt": "a", "steps": 1, "size": "32x32"})
        assert first.status_code == 202, first.text
        limited = client.post("/v1/images/generations", json={"prompt": "b", "steps": 1, "size": "32x32"})
        assert limited.status_code == 429
        assert 25 <= int(limited.headers["retry-after"]) <= 30
        error = limited.json()["error"]
        assert (error["type"], error["code"]) == ("rate_limit_error", "rate_limit_exceeded")
        assert client.get(f"/v1/jobs/{first.json()['id']}").status_code == 200, "reads are not generations"
        assert client.post("/v1/jobs", json={"prompt": "b", "steps": 0}).status_code == 400, (
            "bad input: 400 first"
        )
    with keyed.client(keyed.alice) as other:
        assert other.post("/v1/jobs", json={"prompt": "c", "steps": 1, "size": "32x32"}).status_code == 202
        assert 'image_gen_requests_limited_total{reason="rate_limit_exceeded"}' in other.get("/metrics").text


def test_concurrent_job_quota_gives_429_until_a_job_finishes(keyed: KeyedServer) -> None:
    with keyed.client(keyed.single) as client:
        busy = client.post("/v1/jobs", json=LONG_JOB)
        assert busy.status_code == 202
        refused = client.post("/v1/jobs", json={"prompt": "second", "steps": 1, "size": "32x32"})
        assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
        assert refused.json()["error"]["code"] == "concurrency_limit_exceeded"
        client.post(f"/v1/jobs/{busy.json()['id']}/cancel")
        assert wait_for(client, busy.json()["id"])["status"] == "canceled"
        accepted = client.post("/v1/jobs", json={"prompt": "second", "steps": 1, "size": "32x32"})
        assert accepted.status_code == 202, accepted.text
        wait_for(client, accepted.json()["id"])


def test_openai_client_sends_its_api_key_and_maps_our_errors(keyed: KeyedServer) -> None:
    import openai

    client = openai.OpenAI(base_url=f"{keyed.url}/v1", api_key=keyed.alice, max_retries=0)
    result = client.images.generate(prompt="a key", size="32x32", extra_body={"steps": 1})
    assert result.data[0].b64_json
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{keyed.url}/v1", api_key="wrong", max_retries=0).images.generate(prompt="x")
    with pytest.raises(openai.BadRequestError) as bad:
        client.images.generate(prompt="x", size="4096x4096")
    assert bad.value.body["param"] == "size"
    with pytest.raises(openai.RateLimitError):
        slow = openai.OpenAI(base_url=f"{keyed.url}/v1", api_key=keyed.slow, max_retries=0)
        for _ in range(3):
            slow.images.generate(prompt="x", size="32x32", extra_body={"steps": 1})
