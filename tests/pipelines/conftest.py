"""Fixtures of the pipelines tests (the tiny models themselves are in tests/conftest.py)."""

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def single_torch_thread() -> Iterator[None]:
    """Tiny models run fastest on one thread: on a small, busy machine torch's thread pool only contends
    (a 32 px generation takes seconds instead of tens of milliseconds)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
