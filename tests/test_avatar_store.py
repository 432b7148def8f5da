"""AvatarStore: listing, LRU loading, preparation (atomic, marked not ready), stale re-preparation,
id validation and the shipped default avatar."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from inference.avatars.jobs import AvatarBusy
from inference.avatars.layout import STORE_FILE, FaceBox, InvalidAvatarId, validate_avatar_id
from inference.avatars.store import DEFAULT_AVATAR_ID, AvatarStore
from inference.engine import PreparedAvatar, Renderer
from inference.lite import LiteRenderer, PreparationError
from inference.lite.avatar import META_FILE

ASSET = Path(__file__).resolve().parent.parent / "inference" / "assets" / "astronaut.png"
ASTRONAUT_FACE = (174.0, 66.0, 98.0, 98.0)

BAD_IDS = [
    "",
    "..",
    "../etc",
    "a/b",
    "a\\b",
    ".hidden",
    "-lead",
    "_lead",
    "Upper",
    "a b",
    "a.b",
    "x" * 65,
    "a\x00",
    "é",
]


class FixedFaceRenderer(LiteRenderer):
    """The lite renderer with the astronaut's face box given, so no detector is needed; can be
    made to wait (to observe a preparation in progress) or to fail half way."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.gate: threading.Event | None = None
        self.started = threading.Event()
        self.fail = False
        self.prepared = 0

    def prepare_avatar_dir(
        self, directory: Path, avatar_id: str, name: str, source: Path | str, **hints: Any
    ):  # type: ignore[override]
        self.started.set()
        if self.gate is not None:
            assert self.gate.wait(10)
        avatar = super().prepare_avatar_dir(directory, avatar_id, name, source, face_box=ASTRONAUT_FACE)
        if self.fail:
            raise PreparationError("failing on purpose after writing the files")
        self.prepared += 1
        return avatar


@pytest.fixture
def renderer() -> FixedFaceRenderer:
    return FixedFaceRenderer()


@pytest.fixture
def store(tmp_path: Path, renderer: FixedFaceRenderer) -> AvatarStore:
    return AvatarStore(tmp_path / "avatars", renderer, cache_size=2)


def leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith("."))


def test_prepare_list_get_round_trip(store: AvatarStore, tmp_path: Path) -> None:
    assert store.list() == []
    info = store.prepare("alice", "Alice", ASSET)
    assert info.id == "alice" and info.name == "Alice" and info.ready
    assert (info.frames, info.width, info.height) == (1, 512, 512)
    assert store.list() == [info]
    avatar = store.get("alice")
    assert avatar is not None and avatar.info.id == "alice"
    assert store.get("alice") is avatar  # cached
    assert store.get("nobody") is None
    # a new store over the same folder finds it on disk
    again = AvatarStore(store.root, LiteRenderer())
    loaded = again.get("alice")
    assert loaded is not None and loaded is not avatar
    assert np.array_equal(loaded.idle_frame(0), avatar.idle_frame(0))
    assert sorted(p.name for p in (store.root / "alice").iterdir()) == ["lite", "source.png", STORE_FILE]
    assert {META_FILE, "geometry.npz", "frames"} <= {
        p.name for p in (store.root / "alice" / "lite").iterdir()
    }
    assert leftovers(store.root) == []


@pytest.mark.parametrize("bad", BAD_IDS)
def test_path_traversal_and_bad_ids_are_rejected(store: AvatarStore, bad: str) -> None:
    with pytest.raises(InvalidAvatarId):
        validate_avatar_id(bad)
    with pytest.raises(InvalidAvatarId):
        store.prepare(bad, "x", ASSET)
    assert store.get(bad) is None
    assert store.info(bad) is None
    assert [p.name for p in store.root.parent.iterdir()] == ["avatars"]
    assert list(store.root.iterdir()) == []


def test_good_ids() -> None:
    for good in ["a", "0", "astronaut", "my-avatar_2", "x" * 64]:
        assert validate_avatar_id(good) == good


def test_renderer_level_ids_cannot_escape_the_root(tmp_path: Path) -> None:
    r = LiteRenderer(tmp_path / "root")
    (tmp_path / "root").mkdir()
    for bad in ("../outside", "..", "a/../../b", "/etc"):
        with pytest.raises(InvalidAvatarId):
            r.load_avatar(bad)
        with pytest.raises(InvalidAvatarId):
            r.prepare_avatar(bad, "x", str(ASSET))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["root"]
    assert list((tmp_path / "root").iterdir()) == []


def test_not_ready_while_preparing(store: AvatarStore, renderer: FixedFaceRenderer) -> None:
    renderer.gate = threading.Event()
    result: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: result.setdefault("info", store.prepare("bob", "Bob", ASSET)))
    thread.start()
    assert renderer.started.wait(10)
    listed = store.list()
    assert [(i.id, i.ready) for i in listed] == [("bob", False)]
    assert store.get("bob") is None and store.is_preparing("bob")
    with pytest.raises(AvatarBusy):
        store.prepare("bob", "Bob again", ASSET)
    renderer.gate.set()
    thread.join(10)
    assert result["info"].ready
    assert [(i.id, i.ready) for i in store.list()] == [("bob", True)]
    assert store.get("bob") is not None


def test_failure_leaves_nothing_and_keeps_the_old_avatar(
    store: AvatarStore, renderer: FixedFaceRenderer
) -> None:
    renderer.fail = True
    with pytest.raises(PreparationError):
        store.prepare("carol", "Carol", ASSET)
    assert not (store.root / "carol").exists()
    assert store.list() == [] and leftovers(store.root) == []
    renderer.fail = False
    store.prepare("carol", "Carol", ASSET)
    before = (store.root / "carol" / STORE_FILE).read_text()
    renderer.fail = True
    with pytest.raises(PreparationError):
        store.prepare("carol", "Carol v2", ASSET)
    assert (store.root / "carol" / STORE_FILE).read_text() == before
    assert [(i.name, i.ready) for i in store.list()] == [("Carol", True)]
    assert store.get("carol") is not None and leftovers(store.root) == []
    with pytest.raises(FileNotFoundError):
        store.prepare("dave", "Dave", store.root / "missing.png")


def test_unusable_source_is_refused(store: AvatarStore, tmp_path: Path) -> None:
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"\x00junk" * 100)
    plain = LiteRenderer()
    s = AvatarStore(tmp_path / "other", plain)
    with pytest.raises(PreparationError):
        s.prepare("junk", "Junk", junk)
    assert s.list() == [] and leftovers(s.root) == []


def test_lru_cache_is_bounded(store: AvatarStore) -> None:
    for name in ("a", "b", "c"):
        store.prepare(name, name.upper(), ASSET)
    a = store.get("a")
    b = store.get("b")
    assert store.get("a") is a  # a is now the most recent
    store.get("c")  # evicts b, the least recently used
    assert store.get("a") is a
    assert store.get("b") is not b
    assert len(store._cache) == 2


def test_stale_avatar_is_prepared_again(store: AvatarStore, renderer: FixedFaceRenderer) -> None:
    store.prepare("erin", "Erin", ASSET)
    assert renderer.prepared == 1
    meta_path = store.root / "erin" / "lite" / META_FILE
    meta = json.loads(meta_path.read_text())
    meta["version"] = "stale-version"
    meta_path.write_text(json.dumps(meta))
    fresh = AvatarStore(store.root, renderer)
    avatar = fresh.get("erin")
    assert avatar is not None and renderer.prepared == 2
    assert json.loads(meta_path.read_text())["version"] == renderer.preparation_version
    assert fresh.get("erin") is avatar and renderer.prepared == 2
    assert [(i.id, i.name, i.ready) for i in fresh.list()] == [("erin", "Erin", True)]


def test_changed_parameters_make_avatars_stale(tmp_path: Path) -> None:
    a = FixedFaceRenderer()
    AvatarStore(tmp_path, a).prepare("f", "F", ASSET)
    b = FixedFaceRenderer(params=a.params.__class__(max_size=256))
    avatar = AvatarStore(tmp_path, b).get("f")
    assert avatar is not None and avatar.info.width == 256 and b.prepared == 1


def test_damaged_avatar_is_prepared_again(store: AvatarStore) -> None:
    store.prepare("gina", "Gina", ASSET)
    (store.root / "gina" / "lite" / "frames" / "000000.png").unlink()
    avatar = AvatarStore(store.root, store.renderer).get("gina")
    assert avatar is not None and avatar.info.frames == 1


def test_ensure_default_prepares_once(store: AvatarStore, renderer: FixedFaceRenderer) -> None:
    info = store.ensure_default()
    assert (info.id, info.name, info.ready) == (DEFAULT_AVATAR_ID, "Astronaut", True)
    assert renderer.prepared == 1
    assert store.ensure_default() == info and renderer.prepared == 1
    assert AvatarStore(store.root, renderer).ensure_default() == info and renderer.prepared == 1


def test_ensure_default_with_the_plain_lite_renderer(tmp_path: Path) -> None:
    """The shipped picture is prepared like any other: its face is found by the Haar detector."""
    s = AvatarStore(tmp_path, LiteRenderer())
    info = s.ensure_default()
    assert info.ready and (info.width, info.height) == (512, 512)
    avatar = s.get(DEFAULT_AVATAR_ID)
    assert avatar is not None
    cx, cy, _ = avatar.mouth[0]  # type: ignore[attr-defined]
    assert abs(cx - 223) < 6 and abs(cy - 146) < 6
    assert json.loads((tmp_path / DEFAULT_AVATAR_ID / STORE_FILE).read_text())["face_box"] is None


def test_engine_pool_gives_the_store_and_the_renderer_one_root(tmp_path: Path) -> None:
    from inference.pool import EngineConfig, EnginePool

    pool = EnginePool(EngineConfig(kind="lite", data_dir=tmp_path))
    renderer = pool.workers[0].renderer
    assert isinstance(renderer, LiteRenderer)
    assert pool.avatars.root == renderer.avatar_root == tmp_path / "avatars"
    pool.avatars.prepare("olga", "Olga", ASSET, face_box=ASTRONAUT_FACE)
    folder = tmp_path / "avatars" / "olga"
    assert sorted(p.name for p in folder.iterdir()) == ["lite", "source.png", STORE_FILE]
    by_id = renderer.load_avatar("olga")  # the renderer's own layout is the store's
    stored = pool.avatars.get("olga")
    assert by_id is not None and stored is not None
    assert np.array_equal(by_id.idle_frame(0), stored.idle_frame(0))


def test_delete(store: AvatarStore) -> None:
    store.prepare("hal", "Hal", ASSET)
    assert store.delete("hal") and store.get("hal") is None and store.list() == []
    assert not store.delete("hal")


def test_concurrent_gets_load_once(store: AvatarStore) -> None:
    store.prepare("ivy", "Ivy", ASSET)
    fresh = AvatarStore(store.root, store.renderer)
    results: list[object] = []
    threads = [threading.Thread(target=lambda: results.append(fresh.get("ivy"))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(results) == 8 and results[0] is not None
    assert all(r is results[0] for r in results)


def test_foreign_folders_are_ignored(store: AvatarStore) -> None:
    (store.root / "notes").mkdir()
    (store.root / "BadName").mkdir()
    (store.root / "file.txt").write_text("x")
    store.prepare("june", "June", ASSET)
    (store.root / "june2").mkdir()
    (store.root / "june2" / STORE_FILE).write_text(json.dumps({"id": "someone-else"}))
    assert [i.id for i in store.list()] == ["june"]


def test_video_source_keeps_its_extension(store: AvatarStore, tmp_path: Path) -> None:
    base = cv2.resize(cv2.imread(str(ASSET)), (256, 256), interpolation=cv2.INTER_AREA)
    path = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 25.0, (256, 256))
    for k in range(3):
        writer.write(np.roll(base, k, axis=1))
    writer.release()
    info = store.prepare("kim", "Kim", path)
    assert info.frames == 3 and (store.root / "kim" / "source.avi").is_file()
    avatar = store.get("kim")
    assert avatar is not None and avatar.cycle_length == 4


# ----- another engine, implementing only the Renderer contract -----


class FixedBox:
    """A face 'detector' that always answers the astronaut's face box."""

    def detect(self, gray: np.ndarray, near: object = None) -> tuple[float, float, float, float]:
        s = gray.shape[1] / 512
        return tuple(v * s for v in ASTRONAUT_FACE)  # type: ignore[return-value]


class PlainRenderer(Renderer):
    """Only the engine interface, with its own name (so its own folder in each avatar)."""

    def __init__(self, root: Path, name: str = "plain") -> None:
        self.name = name
        self.avatar_root = root
        self.inner = LiteRenderer(root, face_detector=FixedBox())
        self.prepared = 0
        self.fail = False

    @property
    def preparation_version(self) -> str:
        return self.inner.preparation_version

    @property
    def avatar_files(self) -> tuple[str, ...]:
        return self.inner.avatar_files

    def prepare_avatar_dir(
        self, directory: Path, avatar_id: str, name: str, source: Path | str, *, face_box: FaceBox | None = None
    ) -> PreparedAvatar:
        if self.fail:
            raise PreparationError("failing on purpose")
        self.prepared += 1
        return self.inner.prepare_avatar_dir(directory, avatar_id, name, source, face_box=face_box)

    def load_avatar_dir(self, directory: Path) -> PreparedAvatar | None:
        return self.inner.load_avatar_dir(directory)

    def recorded_version(self, directory: Path) -> str | None:
        return self.inner.recorded_version(directory)

    def new_featurizer(self, mode: str = "live"):  # type: ignore[override]
        return self.inner.new_featurizer(mode)

    def render(self, requests):  # type: ignore[override]
        return self.inner.render(requests)


def test_plain_renderer_round_trip(tmp_path: Path) -> None:
    r = PlainRenderer(tmp_path)
    store = AvatarStore(tmp_path, r)
    info = store.prepare("lena", "Lena", ASSET)
    assert info.ready and r.prepared == 1
    assert sorted(p.name for p in (tmp_path / "lena").iterdir()) == ["plain", "source.png", STORE_FILE]
    assert store.get("lena") is not None
    assert AvatarStore(tmp_path, r).get("lena") is not None and r.prepared == 1
    # a new source replaces the old one, and other engines' data made from the old one goes
    (tmp_path / "lena" / "other-engine").mkdir()
    clip = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(clip), cv2.VideoWriter_fourcc(*"MJPG"), 25.0, (512, 512))
    for k in range(2):
        writer.write(np.roll(cv2.imread(str(ASSET)), k, axis=1))
    writer.release()
    info = store.prepare("lena", "Lena 2", clip)
    assert info.frames == 2
    assert sorted(p.name for p in (tmp_path / "lena").iterdir()) == ["plain", "source.avi", STORE_FILE]
    assert [i.name for i in store.list()] == ["Lena 2"]
    # failure on a new id leaves nothing
    r.fail = True
    with pytest.raises(PreparationError):
        store.prepare("mia", "Mia", ASSET)
    assert not (tmp_path / "mia").exists() and leftovers(tmp_path) == []


def test_switching_engines_prepares_from_the_stored_source(tmp_path: Path) -> None:
    lite = FixedFaceRenderer()
    AvatarStore(tmp_path, lite).prepare("nora", "Nora", ASSET)
    other = PlainRenderer(tmp_path, name="other")
    store = AvatarStore(tmp_path, other)
    assert [(i.id, i.ready) for i in store.list()] == [("nora", True)]
    avatar = store.get("nora")
    assert avatar is not None and other.prepared == 1
    assert sorted(p.name for p in (tmp_path / "nora").iterdir()) == [
        "lite",
        "other",
        "source.png",
        STORE_FILE,
    ]
    # and back: the lite data is still there, nothing to prepare
    assert AvatarStore(tmp_path, lite).get("nora") is not None and lite.prepared == 1


def test_preparing_again_changes_the_revision_clip_caches_key_on(store: AvatarStore) -> None:
    assert store.revision("alice") is None and store.revision("../x") is None
    store.prepare("alice", "Alice", ASSET)
    first = store.revision("alice")
    assert first is not None and store.info("alice") is not None
    store.prepare("alice", "Alice", ASSET)
    assert store.revision("alice") not in (None, first)
