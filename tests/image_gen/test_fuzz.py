"""Schemathesis over the served OpenAPI document: every operation, well over 500 generated requests (valid and
invalid, then stateful sequences that follow the ids the API returns), with a valid key: no 5xx, no response that
breaks the schema, invalid input rejected with a 4xx.

The server is the product as served (API, studio, in-process worker on the tiny model); its key has a concurrent
-job quota and the server caps steps and images (max_steps, max_images), so generated requests finish in a
fraction of a second on a busy CPU instead of queueing behind 150-step batches of 10 images."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from image_gen.auth import KeyStore
from storage.objects import open_store

pytestmark = pytest.mark.slow

# Every check but positive_data_acceptance: the schema cannot say which sizes, models or schedulers the served
# models take, so the server rightly refuses some schema-valid requests with a 400.
CHECKS = ["all"]
EXCLUDED_CHECKS = ["positive_data_acceptance"]
MIN_CASES = 500


def test_schemathesis_finds_no_server_error_and_no_schema_violation(
    start_api: Callable[..., str], tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
) -> None:
    store = tmp_path_factory.mktemp("fuzz-store")
    _, secret = KeyStore(open_store(store)).create("fuzz", max_concurrent=2)
    url = start_api(with_studio=True, store=str(store), max_steps=4, max_images=2)
    command = [
        str(Path(sys.executable).with_name("st")), "run", f"{url}/openapi.json",
        "--header", f"Authorization: Bearer {secret}",
        "--checks", ",".join(CHECKS), "--exclude-checks", ",".join(EXCLUDED_CHECKS),
        "--max-examples", "15",
        "--seed", os.environ.get("SCHEMATHESIS_SEED", "20260101"),
        "--workers", "1",  # ast.parse in two threads breaks on CPython 3.11.7 (gh-106905) inside hypothesis
        "--request-timeout", "90",
        "--report", "json", "--report-dir", str(tmp_path),
    ]  # fmt: skip
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    output = result.stdout[-8000:] + result.stderr[-2000:]
    reports = list(tmp_path.glob("json-*.json"))
    assert reports, output
    report = json.loads(reports[0].read_text())
    assert not report["failures"] and not report["errors"], output
    assert report["operations"]["tested"] == report["operations"]["total"] >= 18, report["operations"]
    assert report["test_cases"]["generated"] >= MIN_CASES, report["test_cases"]
    assert all(
        report["phases"][phase]["status"] == "success" for phase in ("coverage", "fuzzing", "stateful")
    )
    assert result.returncode == 0, output
