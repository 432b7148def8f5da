"""The avatar cache levels one by one: hot avatars outlast cold ones, the disk budget drops the
coldest prepared data (prepared again from the source when used), progress reaches the job, the
preparer runs one job at a time, and the pool sends a stream where its avatar is held."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np

from inference.avatars.cache import DeviceAvatarCache, HostAvatarCache
from inference.avatars.hot import HotAvatars
from inference.avatars.jobs import JobStatus
from inference.avatars.preparer import AvatarPreparer
from inference.avatars.store import AvatarStore
from inference.engine import AvatarInfo, PreparedAvatar
from inference.lite import LiteRenderer
from inference.pool import EngineConfig, EnginePool
from inference.stream import StreamMode
from tests.test_avatar_store import ASSET, FixedFaceRenderer


class Token(PreparedAvatar):
    def __init__(self, name: str, size: int = 100) -> None:
        self.info = AvatarInfo(name, name, 1, 1, 1, True)
        self.pixels = np.zeros(size, np.uint8)

    def idle_frame(self, cycle_index: int) -> np.ndarray:
        return np.zeros((1, 1, 3), np.uint8)


def test_hot_avatars_are_evicted_last() -> None:
    hot = {"h"}
    cache = DeviceAvatarCache(2, lambda avatar_id: avatar_id in hot)
    tokens = {k: Token(k) for k in "hcd"}
    cache.put("h", tokens["h"])
    cache.put("c", tokens["c"])
    assert cache.put("d", tokens["d"]) == [tokens["c"]]  # h is older but hot: c goes
    assert cache.ids() == ["h", "d"] and cache.stats.evictions == 1
    hot.clear()
    cache.put("c", tokens["c"])
    assert cache.ids() == ["d", "c"]  # no longer hot: least recently used first


def test_the_host_cache_is_bounded_in_bytes() -> None:
    cache = HostAvatarCache(250)
    for name in "abc":
        cache.put(name, Token(name, 100))
    assert cache.ids() == ["b", "c"]
    assert cache.get("a") is None and cache.get("b") is not None
    assert (cache.stats.hits, cache.stats.misses, cache.stats.evictions) == (1, 1, 1)
    big = Token("big", 1000)
    cache.put("big", big)  # alone over the budget: kept, the others go
    assert cache.ids() == ["big"] and cache.peek("big") is big


def test_the_disk_budget_drops_the_coldest_data_and_it_comes_back(tmp_path: Path) -> None:
    probe = AvatarStore(tmp_path / "probe", FixedFaceRenderer())
    probe.prepare("p", "P", ASSET)
    one = sum(f.stat().st_size for f in (tmp_path / "probe" / "p" / "lite").rglob("*") if f.is_file())
    renderer = FixedFaceRenderer()
    store = AvatarStore(tmp_path / "avatars", renderer, host_cache_bytes=1, disk_bytes=int(one * 1.5))
    store.prepare("old", "Old", ASSET)
    store.prepare("new", "New", ASSET)
    assert not (tmp_path / "avatars" / "old" / "lite").exists()  # the colder one's data went
    assert (tmp_path / "avatars" / "new" / "lite").is_dir()
    assert store.disk_stats.evictions == 1
    assert [a.id for a in store.list() if a.ready] == ["new", "old"]  # still listed, still usable
    prepared = renderer.prepared
    again = store.get("old")
    assert again is not None and renderer.prepared == prepared + 1  # prepared again from its source
    job = store.job("old")
    assert job is not None and job.refresh and job.status is JobStatus.READY


def test_preparation_reports_progress_and_runs_one_at_a_time(tmp_path: Path) -> None:
    renderer = FixedFaceRenderer()
    store = AvatarStore(tmp_path, renderer)
    seen: list[float] = []
    original = store.jobs.report

    def record(job, done: int, total: int) -> None:  # type: ignore[no-untyped-def]
        original(job, done, total)
        current = store.jobs.get(job.avatar_id)
        assert current is not None
        seen.append(current.progress)

    store.jobs.report = record  # type: ignore[method-assign]
    renderer.gate = threading.Event()
    preparer = AvatarPreparer(store, max_pending=2)
    source_a, source_b = tmp_path / "a.png", tmp_path / "b.png"
    for source in (source_a, source_b):
        source.write_bytes(ASSET.read_bytes())
    first = preparer.submit("a", "A", source_a)
    second = preparer.submit("b", "B", source_b)
    assert first.status is second.status is JobStatus.PREPARING
    assert renderer.started.wait(10)
    time.sleep(0.2)
    assert store.job("b") is not None and store.job("b").progress == 0.0  # type: ignore[union-attr]
    assert renderer.prepared == 0
    renderer.gate.set()
    deadline = time.monotonic() + 30
    while store.is_preparing("b"):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert store.job("a").status is store.job("b").status is JobStatus.READY  # type: ignore[union-attr]
    assert seen and seen == sorted(seen) and seen[-1] == 1.0
    assert not source_a.exists() and not source_b.exists()  # the uploads are removed

    renderer.gate = threading.Event()
    renderer.started.clear()
    for avatar_id in ("c", "d"):
        (tmp_path / f"{avatar_id}.png").write_bytes(ASSET.read_bytes())
        preparer.submit(avatar_id, avatar_id.upper(), tmp_path / f"{avatar_id}.png")
    assert renderer.started.wait(10)
    threading.Timer(0.3, renderer.gate.set).start()
    preparer.shutdown()  # c is running: it finishes; d never ran: it fails, saying why
    assert store.job("c").status is JobStatus.READY  # type: ignore[union-attr]
    waiting = store.job("d")
    assert waiting is not None and waiting.status is JobStatus.FAILED and "upload it again" in (waiting.reason or "")
    assert not (tmp_path / "d.png").exists()


def test_a_stream_goes_to_the_worker_that_holds_its_avatar(tmp_path: Path) -> None:
    config = EngineConfig(kind="lite", workers=2, data_dir=tmp_path, device_cache=1)
    pool = EnginePool(config, [LiteRenderer(tmp_path / "avatars") for _ in range(2)])
    pool.avatars.prepare("a", "A", ASSET, face_box=(174.0, 66.0, 98.0, 98.0))
    pool.avatars.prepare("b", "B", ASSET, face_box=(174.0, 66.0, 98.0, 98.0))
    a, b = pool.avatars.get("a"), pool.avatars.get("b")
    assert a is not None and b is not None
    first = pool.open_stream(a, StreamMode.CLIP)  # worker 0 (both idle)
    assert pool.holders("a") == [0]
    second = pool.open_stream(a, StreamMode.CLIP)  # worker 0 holds a and has one stream more: still 0
    assert pool.holders("a") == [0] and pool.workers[0].active_streams == 2
    third = pool.open_stream(a, StreamMode.CLIP)  # two more than worker 1 now: worker 1
    assert pool.holders("a") == [0, 1]
    fourth = pool.open_stream(b, StreamMode.CLIP)  # worker 1 is least loaded; b evicts a there
    assert pool.holders("a") == [0] and pool.holders("b") == [1]
    pool.forget("a")
    assert pool.holders("a") == []
    assert HotAvatars().hottest(3) == []
    for stream in (first, second, third, fourth):
        stream.cancel()
