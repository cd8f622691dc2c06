"""Object stores: the same compare-and-swap semantics on a local directory and on S3 (moto over HTTP)."""

from __future__ import annotations

import errno
import multiprocessing
import os
import subprocess
import tempfile
import threading
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import boto3
import pytest
from botocore.awsrequest import AWSResponse

from storage.objects import (
    LocalObjectStore,
    NotFound,
    ObjectStore,
    PreconditionFailed,
    S3ObjectStore,
    StorageError,
    open_store,
)


def race(n: int, attempt) -> list[int]:
    """Start `attempt(i)` on n threads at once; the indexes of those that did not raise PreconditionFailed."""
    barrier = threading.Barrier(n)
    winners: list[int] = []

    def run(i: int) -> None:
        barrier.wait()
        try:
            attempt(i)
        except PreconditionFailed:
            return
        winners.append(i)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return winners


def test_put_then_get_returns_bytes_and_an_etag_that_follows_the_content(store: ObjectStore) -> None:
    first = store.put("images/a.png", b"one", content_type="image/png")
    assert store.get("images/a.png").data == b"one"
    assert store.get("images/a.png").etag == first
    second = store.put("images/a.png", b"two")
    assert second != first
    assert store.get("images/a.png").etag == second
    assert store.exists("images/a.png")


def test_missing_key_raises_not_found(store: ObjectStore) -> None:
    with pytest.raises(NotFound):
        store.get("nothing/here")
    assert not store.exists("nothing/here")
    store.put("nothing/here/deeper", b"x")
    with pytest.raises(NotFound):  # a "directory" is not an object
        store.get("nothing/here")


def test_put_if_absent_creates_once(store: ObjectStore) -> None:
    etag = store.put_if_absent("k", b"first")
    with pytest.raises(PreconditionFailed):
        store.put_if_absent("k", b"second")
    assert store.get("k").data == b"first"
    assert store.get("k").etag == etag


def test_put_if_match_is_compare_and_swap(store: ObjectStore) -> None:
    old = store.put("counter", b"1")
    new = store.put_if_match("counter", b"2", old)
    with pytest.raises(PreconditionFailed):
        store.put_if_match("counter", b"3", old)  # a stale etag loses
    assert store.get("counter").data == b"2"
    assert store.put_if_match("counter", b"3", new) == store.get("counter").etag
    with pytest.raises(NotFound):
        store.put_if_match("gone", b"x", new)


def test_put_if_absent_race_has_exactly_one_winner(store: ObjectStore) -> None:
    for round_ in range(3):
        winners = race(8, lambda i, key=f"race/{round_}": store.put_if_absent(key, f"{i}".encode()))
        assert len(winners) == 1
        assert store.get(f"race/{round_}").data == f"{winners[0]}".encode()


def test_put_if_match_race_has_exactly_one_winner(store: ObjectStore) -> None:
    etag = store.put("cas", b"start")
    winners = race(8, lambda i: store.put_if_match("cas", f"{i}".encode(), etag))
    assert len(winners) == 1
    assert store.get("cas").data == f"{winners[0]}".encode()


def test_delete_if_match_removes_only_the_version_it_read(store: ObjectStore) -> None:
    read = store.put("ledger", b"old")
    store.put("ledger", b"rewritten")  # by its owner, after the reader looked
    with pytest.raises(PreconditionFailed):
        store.delete_if_match("ledger", read)
    assert store.get("ledger").data == b"rewritten"
    store.delete_if_match("ledger", store.get("ledger").etag)
    assert not store.exists("ledger")
    with pytest.raises(NotFound):
        store.delete_if_match("ledger", read)


def test_delete_removes_the_key_and_is_idempotent(store: ObjectStore) -> None:
    store.put("a/b/c", b"x")
    store.delete("a/b/c")
    store.delete("a/b/c")
    assert not store.exists("a/b/c")
    assert list(store.list("a/")) == []
    store.put_if_absent("a/b/c", b"again")  # a deleted key can be created again
    assert store.get("a/b/c").data == b"again"


def test_list_is_in_s3_key_order_with_prefix_start_after_and_limit(store: ObjectStore) -> None:
    keys = ["a-c", "a/b", "a/c/d", "a/c/e", "a0", "b", "ab"]
    for key in keys:
        store.put(key, b"")
    assert list(store.list()) == sorted(keys)  # '-' < '/' < '0' < 'b': directories do not sort first
    assert list(store.list("a/")) == ["a/b", "a/c/d", "a/c/e"]
    assert list(store.list("a/c")) == ["a/c/d", "a/c/e"]
    assert list(store.list("a", start_after="a/c/d")) == ["a/c/e", "a0", "ab"]
    assert list(store.list(start_after="a/")) == ["a/b", "a/c/d", "a/c/e", "a0", "ab", "b"]
    assert list(store.list(limit=2)) == ["a-c", "a/b"]
    assert list(store.list("zzz")) == []


def test_list_follows_pages(store: ObjectStore) -> None:
    if isinstance(store, S3ObjectStore):
        store.page_size = 3
    keys = [f"p/{i:02d}" for i in range(10)]
    for key in keys:
        store.put(key, b"")
    assert list(store.list("p/")) == keys
    assert list(store.list("p/", start_after="p/04", limit=4)) == keys[5:9]
    if isinstance(store, S3ObjectStore):
        store.requests.clear()
        assert len(list(store.list("p/"))) == 10
        assert store.requests["ListObjectsV2"] == 4


def test_s3_list_pages_past_the_1000_keys_s3_returns_at_most(s3_bucket: str) -> None:
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.s3.models import s3_backends

    backend = s3_backends[DEFAULT_ACCOUNT_ID]["aws"]  # seeded in-process: 1,205 PUTs over HTTP take seconds
    keys = [f"many/{i:05d}" for i in range(1205)]
    for key in keys:
        backend.put_object(s3_bucket, key, b"")
    store = S3ObjectStore(s3_bucket)
    assert list(store.list("many/")) == keys
    assert store.requests["ListObjectsV2"] == 2
    assert list(store.list("many/", start_after="many/00998", limit=5)) == keys[999:1004]


def test_url_reads_the_object_without_credentials(store: ObjectStore) -> None:
    store.put("images/cat.png", b"\x89PNG not really", content_type="image/png")
    url = store.url("images/cat.png", expires_s=60)
    assert url.startswith("http://" if isinstance(store, S3ObjectStore) else "file://")
    with urllib.request.urlopen(url) as response:
        assert response.read() == b"\x89PNG not really"


@pytest.mark.parametrize(
    "key", ["", "/abs", "trailing/", "a//b", "../up", "a/../b", "a/./b", ".hidden", "a\\b"]
)
def test_invalid_keys_are_refused_with_the_rule(store: ObjectStore, key: str) -> None:
    with pytest.raises(ValueError, match="segments are non-empty"):
        store.put(key, b"x")


def test_open_store_picks_the_implementation(tmp_path: Path, s3_bucket: str) -> None:
    assert isinstance(open_store(tmp_path / "plain"), LocalObjectStore)
    local = open_store(f"file://{tmp_path}/url")
    assert isinstance(local, LocalObjectStore)
    assert local.root == tmp_path / "url"
    s3 = open_store(f"s3://{s3_bucket}/runs/one")
    assert isinstance(s3, S3ObjectStore)
    s3.put("x", b"1")  # the endpoint came from AWS_ENDPOINT_URL
    assert boto3.client("s3").get_object(Bucket=s3_bucket, Key="runs/one/x")["Body"].read() == b"1"
    with pytest.raises(ValueError, match="s3://bucket/prefix"):
        open_store("gs://bucket/x")


def test_local_key_cannot_also_be_a_directory(tmp_path: Path) -> None:
    store = LocalObjectStore(tmp_path)
    store.put("a/b", b"x")
    with pytest.raises(StorageError, match="directory"):
        store.put("a", b"y")
    store.put("c", b"x")
    with pytest.raises(StorageError, match="directory"):
        store.put("c/d", b"y")


@contextmanager
def read_only(folder: Path) -> Iterator[None]:
    """`folder` and everything in it made read-only: by chmod, or for root, whom permissions do not stop, by
    `chattr +i`; skips the test where neither works."""
    if os.geteuid() == 0:
        on, off = ["chattr", "-R", "+i", str(folder)], ["chattr", "-R", "-i", str(folder)]
    else:
        on, off = ["chmod", "-R", "a-w", str(folder)], ["chmod", "-R", "u+w", str(folder)]
    if subprocess.run(on, capture_output=True).returncode != 0:
        pytest.skip(f"cannot make {folder} read-only here")
    try:
        yield
    finally:
        subprocess.run(off, check=True, capture_output=True)


def test_local_store_raises_storage_error_when_the_file_system_refuses_writes(tmp_path: Path) -> None:
    store = LocalObjectStore(tmp_path / "store")
    etag = store.put("kept", b"x")
    writes = {
        "put": lambda: store.put("new/key", b"y"),
        "put over": lambda: store.put("kept", b"y"),
        "put_if_absent": lambda: store.put_if_absent("new/key", b"y"),
        "put_if_match": lambda: store.put_if_match("kept", b"y", etag),
        "delete": lambda: store.delete("kept"),
    }
    with read_only(tmp_path / "store"):
        for name, write in writes.items():
            with pytest.raises(StorageError, match="cannot") as refused:
                write()
            assert isinstance(refused.value.__cause__, OSError), name
        assert store.get("kept").data == b"x" and store.exists("kept")
        assert list(store.list()) == ["kept"]
    store.put("new/key", b"y")  # writable again: nothing was left half-done
    assert store.get("kept").data == b"x" and store.get("new/key").data == b"y"


@pytest.mark.parametrize("failing", ["mkstemp", "fsync"])
def test_local_store_raises_storage_error_when_the_disk_is_full(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    store = LocalObjectStore(tmp_path / "store")

    def disk_full(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(tempfile if failing == "mkstemp" else os, failing, disk_full)
    with pytest.raises(StorageError, match="No space left"):
        store.put("a", b"x")
    monkeypatch.undo()
    assert not store.exists("a")
    assert os.listdir(store.root / ".objectstore" / "tmp") == []


@pytest.mark.parametrize("denied", ["scandir", "stat"])
def test_local_store_raises_storage_error_when_reads_are_denied(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, denied: str
) -> None:
    store = LocalObjectStore(tmp_path / "store")
    store.put("a/b", b"x")

    def permission_denied(*args: object, **kwargs: object) -> None:
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

    monkeypatch.setattr(os, denied, permission_denied)
    with pytest.raises(StorageError, match="Permission denied"):
        list(store.list("a/")) if denied == "scandir" else store.exists("a/b")


def _increment(root: str, times: int) -> None:
    store = LocalObjectStore(root)
    for _ in range(times):
        while True:
            current = store.get("counter")
            try:
                store.put_if_match("counter", str(int(current.data) + 1).encode(), current.etag)
                break
            except PreconditionFailed:
                continue


def test_local_compare_and_swap_loses_no_update_across_processes(tmp_path: Path) -> None:
    LocalObjectStore(tmp_path).put("counter", b"0")
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_increment, args=(str(tmp_path), 50)) for _ in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)
        assert worker.exitcode == 0
    assert LocalObjectStore(tmp_path).get("counter").data == b"200"


def test_s3_store_counts_requests_per_operation(s3_bucket: str) -> None:
    store = S3ObjectStore(s3_bucket)
    other = S3ObjectStore(s3_bucket, client=store.client)  # sharing a client does not mix the counts
    store.put("a", b"1")
    store.get("a")
    store.exists("a")
    list(store.list())
    store.delete("a")
    other.put("b", b"2")
    assert store.requests == {
        "PutObject": 1,
        "GetObject": 1,
        "HeadObject": 1,
        "ListObjectsV2": 1,
        "DeleteObject": 1,
    }
    assert other.requests == {"PutObject": 1}


def test_s3_conditional_put_retried_after_a_lost_response_still_succeeds(s3_bucket: str) -> None:
    store = S3ObjectStore(s3_bucket)
    retried = []

    def lose_first_response(attempts: int, **_) -> float | None:
        if not retried:  # the first PutObject reached S3, but the client retries as if its response was lost
            retried.append(attempts)
            return 0.0
        return None

    store.client.meta.events.register_first("needs-retry.s3.PutObject", lose_first_response)
    etag = store.put_if_absent("once", b"payload")  # the retry gets 412: the object is ours, so it succeeded
    assert retried == [1]
    assert store.requests["PutObject"] == 2
    assert store.get("once").etag == etag
    with pytest.raises(PreconditionFailed):
        store.put_if_absent("once", b"someone else's payload")


def test_s3_conflict_statuses_map_to_precondition_failed(s3_bucket: str) -> None:
    store = S3ObjectStore(s3_bucket)

    class Body:
        def __init__(self, body: bytes) -> None:
            self.body = body

        def stream(self, **_):
            yield self.body

    def conflict(request, **_) -> AWSResponse:  # moto never answers 409; S3 does under concurrent writes
        body = b"<Error><Code>ConditionalRequestConflict</Code><Message>retry</Message></Error>"
        return AWSResponse(request.url, 409, {"Content-Type": "application/xml"}, Body(body))

    store.client.meta.events.register_first("before-send.s3.PutObject", conflict)
    with pytest.raises(PreconditionFailed, match="ConditionalRequestConflict"):
        store.put_if_match("k", b"x", '"abc"')
    with pytest.raises(NotFound):  # plain 404s are NotFound, other failures StorageError
        store.get("k")
    with pytest.raises(StorageError, match="NoSuchBucket"):
        S3ObjectStore("no-such-bucket-here").get("k")
