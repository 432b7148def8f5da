from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.cluster.redis_helpers import SHARED_URL, delete_prefix, shared_redis_available, unique_prefix


@pytest.fixture(scope="session")
def redis_url() -> str:
    if not shared_redis_available():
        pytest.fail(f"these tests need Redis at {SHARED_URL} (.ci/run starts one)")
    return SHARED_URL


@pytest.fixture
def prefix(redis_url: str) -> Iterator[str]:
    """A namespace of keys of this test alone, deleted afterwards."""
    name = unique_prefix()
    yield name
    delete_prefix(redis_url, name)
