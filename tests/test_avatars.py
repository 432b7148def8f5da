"""inference.avatars: one id rule everywhere, the atomic folder swap, the bounded thread-safe
cache, and preparation jobs whose failures say why (a stale avatar is never served as it is)."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import numpy as np
import pytest

from inference.avatars.cache import AvatarCache
from inference.avatars.jobs import AvatarBusy, JobStatus
from inference.avatars.layout import STORE_FILE, AvatarLayout, InvalidAvatarId, replace_dir, validate_avatar_id
from inference.avatars.store import AvatarStore
from inference.engine import AvatarInfo, PreparedAvatar
from inference.lite import LiteRenderer, PreparationError
from inference.lite.avatar import META_FILE
from tests.test_avatar_store import ASSET, BAD_IDS, FixedFaceRenderer

GOOD_IDS = ["a", "0", "astronaut", "my-avatar_2", "a-", "9_", "x" * 64]
MORE_BAD_IDS = [*BAD_IDS, "A", "a.png", ".", "a/", " a", "a\n", "x" * 65, "ümlaut", "a:b"]


@pytest.mark.parametrize("bad", MORE_BAD_IDS)
def test_every_door_rejects_the_same_bad_ids(bad: str, tmp_path: Path) -> None:
    root = tmp_path / "avatars"
    store = AvatarStore(root, FixedFaceRenderer(root))
    renderer = store.renderer
    with pytest.raises(InvalidAvatarId):
        validate_avatar_id(bad)
    with pytest.raises(InvalidAvatarId):
        AvatarLayout(root).folder(bad)
    with pytest.raises(InvalidAvatarId):
        renderer.load_avatar(bad)
    with pytest.raises(InvalidAvatarId):
        renderer.prepare_avatar(bad, "x", ASSET)
    with pytest.raises(InvalidAvatarId):
        store.prepare(bad, "x", ASSET)
    with pytest.raises(InvalidAvatarId):
        store.delete(bad)
    assert store.get(bad) is None and store.info(bad) is None and store.revision(bad) is None
    assert list(root.iterdir()) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["avatars"]


@pytest.mark.parametrize("good", GOOD_IDS)
def test_every_door_accepts_the_same_good_ids(good: str, tmp_path: Path) -> None:
    root = tmp_path / "avatars"
    renderer = FixedFaceRenderer(root)
    store = AvatarStore(root, renderer)
    assert validate_avatar_id(good) == good
    assert AvatarLayout(root).folder(good) == root / good
    assert renderer.load_avatar(good) is None  # valid, not there yet
    info = store.prepare(good, "Name", ASSET)
    assert info.id == good and info.ready
    loaded = renderer.load_avatar(good)  # the renderer's id-based view finds the store's files
    assert loaded is not None and loaded.info.id == good
    assert [i.id for i in store.list()] == [good]


def _folder_with(path: Path, text: str) -> Path:
    path.mkdir(parents=True)
    (path / "data.txt").write_text(text)
    return path


def test_replace_dir_swaps_whole_folders(tmp_path: Path) -> None:
    new = _folder_with(tmp_path / "new", "new")
    old = _folder_with(tmp_path / "dst", "old")
    replace_dir(new, old)
    assert (old / "data.txt").read_text() == "new" and not new.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst"]  # nothing of the old one is left
    fresh = _folder_with(tmp_path / "fresh", "fresh")
    replace_dir(fresh, tmp_path / "absent")
    assert (tmp_path / "absent" / "data.txt").read_text() == "fresh"


def test_replace_dir_that_fails_puts_the_old_folder_back(tmp_path: Path) -> None:
    old = _folder_with(tmp_path / "dst", "old")
    with pytest.raises(OSError):
        replace_dir(tmp_path / "does-not-exist", old)
    assert (old / "data.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst"]


def test_a_failed_preparation_leaves_the_old_avatar_intact(tmp_path: Path) -> None:
    renderer = FixedFaceRenderer()
    store = AvatarStore(tmp_path, renderer)
    store.prepare("olive", "Olive", ASSET)
    before = {p.relative_to(tmp_path): p.read_bytes() for p in (tmp_path / "olive").rglob("*") if p.is_file()}
    revision = store.revision("olive")
    renderer.fail = True  # fails after writing every file of the new preparation
    with pytest.raises(PreparationError):
        store.prepare("olive", "Olive 2", ASSET)
    after = {p.relative_to(tmp_path): p.read_bytes() for p in (tmp_path / "olive").rglob("*") if p.is_file()}
    assert after == before and store.revision("olive") == revision
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    job = store.job("olive")
    assert job is not None and job.status is JobStatus.FAILED and "on purpose" in (job.reason or "")
    assert store.info("olive") == AvatarInfo("olive", "Olive", 1, 512, 512, True)  # the old one serves
    fresh = AvatarStore(tmp_path, LiteRenderer())
    assert fresh.get("olive") is not None


def test_preparation_jobs_report_preparing_then_ready(tmp_path: Path) -> None:
    renderer = FixedFaceRenderer()
    store = AvatarStore(tmp_path, renderer)
    renderer.gate = threading.Event()
    thread = threading.Thread(target=store.prepare, args=("pia", "Pia", ASSET))
    thread.start()
    assert renderer.started.wait(10)
    job = store.job("pia")
    assert job is not None and (job.status, job.reason, job.finished_at) == (JobStatus.PREPARING, None, None)
    with pytest.raises(AvatarBusy):
        store.delete("pia")
    renderer.gate.set()
    thread.join(10)
    done = store.job("pia")
    assert done is not None and done.status is JobStatus.READY and done.finished_at is not None
    assert done.started_at == job.started_at and not done.refresh


def _make_stale(store: AvatarStore, avatar_id: str) -> None:
    meta_path = store.root / avatar_id / "lite" / META_FILE
    meta = json.loads(meta_path.read_text())
    meta["version"] = "stale-version"
    meta_path.write_text(json.dumps(meta))


def test_a_stale_avatar_that_cannot_be_prepared_again_is_not_served(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    renderer = FixedFaceRenderer()
    store = AvatarStore(tmp_path, renderer)
    store.prepare("quinn", "Quinn", ASSET)
    _make_stale(store, "quinn")
    (tmp_path / "quinn" / "source.png").unlink()  # nothing to prepare it again from
    fresh = AvatarStore(tmp_path, renderer)
    with caplog.at_level("WARNING", logger="inference.avatars.store"):
        assert fresh.get("quinn") is None
    job = fresh.job("quinn")
    assert job is not None and job.status is JobStatus.FAILED and job.refresh
    assert job.reason is not None and "stale" in job.reason and "source.png" in job.reason
    assert any(r.levelname == "ERROR" and "quinn" in r.getMessage() for r in caplog.records)
    info = fresh.info("quinn")
    assert info is not None and not info.ready  # so sessions are told it is not ready
    assert [(i.id, i.ready) for i in fresh.list()] == [("quinn", False)]
    # the stale data was left as it was, not loaded "better than none"
    assert json.loads((tmp_path / "quinn" / "lite" / META_FILE).read_text())["version"] == "stale-version"


def test_preparing_stale_data_again_changes_the_revision(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    renderer = FixedFaceRenderer()
    store = AvatarStore(tmp_path, renderer)
    store.prepare("rosa", "Rosa", ASSET)
    first = store.revision("rosa")
    _make_stale(store, "rosa")
    fresh = AvatarStore(tmp_path, renderer)
    with caplog.at_level("WARNING", logger="inference.avatars.store"):
        assert fresh.get("rosa") is not None
    assert any("stale" in r.getMessage() and "rosa" in r.getMessage() for r in caplog.records)
    assert fresh.revision("rosa") not in (None, first)
    job = fresh.job("rosa")
    assert job is not None and job.refresh and job.status is JobStatus.READY


class Token(PreparedAvatar):
    def __init__(self, name: str) -> None:
        self.info = AvatarInfo(name, name, 1, 1, 1, True)

    def idle_frame(self, cycle_index: int) -> np.ndarray:
        return np.zeros((1, 1, 3), np.uint8)


def test_the_cache_is_bounded_least_recently_used_first() -> None:
    cache = AvatarCache(3)
    tokens = {k: Token(k) for k in "abcde"}
    for k in "abc":
        cache.put(k, tokens[k])
    assert cache.get("a") is tokens["a"]  # a is now the most recent
    cache.put("d", tokens["d"])  # b goes
    assert cache.ids() == ["c", "a", "d"] and cache.get("b") is None
    cache.put("e", tokens["e"])
    assert cache.ids() == ["a", "d", "e"] and len(cache) == 3
    cache.discard("d")
    assert cache.ids() == ["a", "e"]
    with pytest.raises(ValueError):
        AvatarCache(0)


def test_the_cache_stays_bounded_and_consistent_under_threads() -> None:
    cache = AvatarCache(4)
    tokens = [Token(f"t{i}") for i in range(32)]
    errors: list[BaseException] = []
    start = threading.Barrier(8)

    def churn(seed: int) -> None:
        try:
            start.wait(10)
            for step in range(2000):
                token = tokens[(seed * 7 + step) % len(tokens)]
                cache.put(token.info.id, token)
                got = cache.get(tokens[(seed + step * 3) % len(tokens)].info.id)
                assert got is None or isinstance(got, Token)
                assert len(cache) <= 4
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=churn, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    ids = cache.ids()
    assert len(ids) == 4 and len(set(ids)) == 4
    assert all(cache.get(i) is next(t for t in tokens if t.info.id == i) for i in ids)


def test_the_store_cache_size_is_its_bound(tmp_path: Path) -> None:
    store = AvatarStore(tmp_path, FixedFaceRenderer(), cache_size=1)
    store.prepare("sam", "Sam", ASSET)
    store.prepare("tia", "Tia", ASSET)
    sam = store.get("sam")
    assert sam is not None and store.get("tia") is not None
    assert store.get("sam") is not sam  # evicted by tia, loaded again
    with pytest.raises(ValueError):
        AvatarStore(tmp_path, FixedFaceRenderer(), cache_size=0)


def test_leftover_stages_from_a_crash_are_cleaned(tmp_path: Path) -> None:
    store = AvatarStore(tmp_path, FixedFaceRenderer())
    store.prepare("uma", "Uma", ASSET)
    stale_stage = tmp_path / ".tmp-uma-crashed"
    stale_stage.mkdir()
    inner = tmp_path / "uma" / ".tmp-lite-crashed"
    inner.mkdir()
    recent = tmp_path / ".tmp-vic-running"
    recent.mkdir()
    for path in (stale_stage, inner):
        os.utime(path, (0, 0))
    AvatarStore(tmp_path, FixedFaceRenderer())
    assert not stale_stage.exists() and not inner.exists() and recent.exists()
    assert (tmp_path / "uma" / STORE_FILE).is_file()
