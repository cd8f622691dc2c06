"""Storage fixtures: every store test runs against the local store and against S3 (moto over HTTP)."""

from __future__ import annotations

from pathlib import Path

import pytest

from storage.objects import LocalObjectStore, ObjectStore, S3ObjectStore


class FakeClock:
    """A clock the test advances by hand, so that leases and backoff expire without sleeping."""

    def __init__(self, now: float = 1_750_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ObjectStore:
    """A fresh empty store: a directory, or a prefix in a fresh moto bucket (endpoint from AWS_ENDPOINT_URL)."""
    if request.param == "local":
        return LocalObjectStore(tmp_path / "store")
    return S3ObjectStore(request.getfixturevalue("s3_bucket"), prefix="image-gen/test")
