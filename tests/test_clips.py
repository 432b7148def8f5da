"""The clip store keeps whole clips only, and no more bytes than it is given."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from stream_server.clips import ClipStore, clip_key


def write(store: ClipStore, key: str, size: int, when: int) -> None:
    writer = store.writer(key, "astronaut")
    writer.write(b"\0" * size)
    writer.commit({"frames": 1})
    path = store.path(key)
    assert path is not None
    os.utime(path, ns=(when, when))


def test_oldest_clips_are_evicted_beyond_the_limit(tmp_path: Path) -> None:
    store = ClipStore(tmp_path, max_bytes=2500)
    keys = [clip_key(n=i) for i in range(3)]
    for i, key in enumerate(keys[:2]):
        write(store, key, 1000, when=10**18 + i)
    assert all(store.exists(k) for k in keys[:2])
    write(store, keys[2], 1000, when=10**18 + 5)
    assert not store.exists(keys[0]) and store.exists(keys[1]) and store.exists(keys[2])
    assert not (tmp_path / f"{keys[0]}.json").exists()
    assert not (tmp_path / "by-avatar" / "astronaut" / keys[0]).exists()


def test_unfinished_clips_are_invisible_and_cleaned(tmp_path: Path) -> None:
    store = ClipStore(tmp_path)
    key = clip_key(n=1)
    writer = store.writer(key, "astronaut")
    writer.write(b"partial")
    assert not store.exists(key)
    writer.discard()
    assert list(tmp_path.iterdir()) == []
    (tmp_path / ".part-crashed.mp4").write_bytes(b"left by a crash")
    ClipStore(tmp_path)
    assert [p for p in tmp_path.iterdir() if p.name.startswith(".part-")] == []


def test_keys_are_validated(tmp_path: Path) -> None:
    store = ClipStore(tmp_path)
    assert not store.exists("../../etc/passwd")
    with pytest.raises(KeyError):
        store.path("../x")


def test_the_same_clip_made_by_two_sessions_at_once_is_stored_once(tmp_path: Path) -> None:
    """Two users with the same avatar and audio make the same key at the same moment."""
    store = ClipStore(tmp_path)
    key = clip_key(n=7)
    failures: list[BaseException] = []

    def make() -> None:
        try:
            for _ in range(200):
                writer = store.writer(key, "astronaut")
                writer.write(b"\1" * 4096)
                writer.commit({"frames": 1})
        except BaseException as exc:  # noqa: BLE001 - the test reports what a thread raised
            failures.append(exc)

    threads = [threading.Thread(target=make) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    found = store.read(key)
    assert found is not None and found[0] == b"\1" * 4096 and found[1]["avatar"] == "astronaut"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".part-")] == []
