"""The lite engine: featurizer contract, avatar preparation, rendering, and a run through the real
frame worker."""

from __future__ import annotations

import json
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from inference import face
from inference.engine import (
    FEATURE_SAMPLE_RATE,
    FEATURE_SAMPLES_PER_FRAME,
    OUTPUT_SAMPLES_PER_FRAME,
    FrameRequest,
)
from inference.face import FaceDetector
from inference.lite import (
    FaceDetectorUnavailable,
    LiteAvatar,
    LiteFeatures,
    LiteFeaturizer,
    LiteRenderer,
    PreparationError,
    PrepareParams,
)
from inference.lite.avatar import META_FILE
from inference.lite.prepare import fill_boxes
from inference.stream import StreamMode, StreamState
from inference.worker import FrameWorker

ASSET = Path(__file__).resolve().parent.parent / "inference" / "assets" / "astronaut.png"
ASTRONAUT_FACE = (174.0, 66.0, 98.0, 98.0)  # x, y, w, h in the 512 x 512 picture
N = FEATURE_SAMPLES_PER_FRAME
LOUD = LiteFeatures(open=1.0, width=0.0, level_db=-14.0)
SILENT = LiteFeatures(open=0.0, width=0.0, level_db=-90.0)


def speech_like(seconds: float, level: float = 0.3, seed: int = 0) -> np.ndarray:
    """A buzzy voiced sound (harmonics of 140 Hz, vowel-like formant bumps) with some noise."""
    t = np.arange(int(seconds * FEATURE_SAMPLE_RATE)) / FEATURE_SAMPLE_RATE
    sig = sum(np.sin(2 * np.pi * 140 * k * t) / k * (1.5 if 4 <= k <= 8 else 1.0) for k in range(1, 20))
    sig = sig / np.abs(sig).max() * level
    sig += np.random.default_rng(seed).normal(0, 0.01, len(t))
    return sig.astype(np.float32)


def tone(hz: float, seconds: float, level: float = 0.3) -> np.ndarray:
    t = np.arange(int(seconds * FEATURE_SAMPLE_RATE)) / FEATURE_SAMPLE_RATE
    return (level * np.sin(2 * np.pi * hz * t)).astype(np.float32)


def push_chunked(f: LiteFeaturizer, pcm: np.ndarray, seed: int = 1) -> None:
    rng = np.random.default_rng(seed)
    pos = 0
    while pos < len(pcm):
        step = int(rng.integers(1, 1500))
        f.push(pcm[pos : pos + step])
        pos += step


class BoxDetector:
    """A stand-in face detector: the astronaut's box (scaled to the image it is given), except on
    uniform frames, where there is no face."""

    def __init__(self, box: tuple[float, float, float, float], size: int) -> None:
        self.box, self.size = box, size
        self.calls = 0

    def detect(self, gray: np.ndarray, near: object = None) -> tuple[float, float, float, float] | None:
        self.calls += 1
        if gray.std() < 3:
            return None
        s = gray.shape[1] / self.size
        return tuple(v * s for v in self.box)  # type: ignore[return-value]


# ----- fixtures -----


@pytest.fixture(scope="module")
def renderer() -> LiteRenderer:
    return LiteRenderer()


@pytest.fixture(scope="module")
def astronaut(tmp_path_factory: pytest.TempPathFactory, renderer: LiteRenderer) -> LiteAvatar:
    folder = tmp_path_factory.mktemp("avatars") / "astronaut"
    return renderer.prepare_avatar_dir(folder, "astronaut", "Astronaut", ASSET, face_box=ASTRONAUT_FACE)


def write_video(path: Path, frames: list[np.ndarray], fps: float = 25.0) -> Path:
    h, w = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (w, h))
    assert writer.isOpened()
    for rgb in frames:
        writer.write(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    writer.release()
    return path


def shifted_astronauts(count: int, size: int, blank: int | None = None) -> list[np.ndarray]:
    base = cv2.cvtColor(cv2.imread(str(ASSET)), cv2.COLOR_BGR2RGB)
    base = cv2.resize(base, (size, size), interpolation=cv2.INTER_AREA)
    frames = []
    for k in range(count):
        if k == blank:
            frames.append(np.full_like(base, 128))
            continue
        m = np.float32([[1, 0, k % 3], [0, 1, k % 2]])
        frames.append(cv2.warpAffine(base, m, (size, size), borderMode=cv2.BORDER_REPLICATE))
    return frames


# ----- featurizer -----


@pytest.mark.parametrize("n", [0, 1, N - 1, N, N + 1, 2 * N, 12_345, 16_000, 16_001])
def test_utterance_of_n_samples_gives_n_div_640_frames(n: int) -> None:
    f = LiteFeaturizer()
    push_chunked(f, speech_like(n / FEATURE_SAMPLE_RATE + 0.001)[:n])
    assert f.pending() == n // N
    f.finish()
    assert f.ready() == n // N
    assert len(f.take(f.ready())) == n // N
    assert f.pending() == 0


def test_ready_lags_push_by_one_frame_until_finish() -> None:
    f = LiteFeaturizer()
    f.push(speech_like(0.2)[: 3 * N])
    assert (f.ready(), f.pending()) == (2, 3)
    f.take(1)
    assert (f.ready(), f.pending()) == (1, 2)
    f.push(np.zeros(N // 2, np.float32))  # an incomplete frame changes nothing
    assert (f.ready(), f.pending()) == (1, 2)
    f.finish()
    assert (f.ready(), f.pending()) == (2, 2)
    with pytest.raises(ValueError):
        f.take(3)


def test_multiple_utterances_and_reset() -> None:
    f = LiteFeaturizer()
    a, b = speech_like(0.5)[:7_000], speech_like(0.5)[:3_300]
    push_chunked(f, a)
    f.finish()
    push_chunked(f, b)  # push after finish: a new utterance
    f.finish()
    assert f.ready() == 7_000 // N + 3_300 // N
    f.take(f.ready())
    f.push(speech_like(0.3))
    assert f.pending() > 0
    f.reset()
    assert (f.ready(), f.pending()) == (0, 0)
    f.finish()  # nothing left of the dropped audio, not even its partial frame
    assert f.ready() == 0
    f.push(np.zeros(2 * N, np.float32))
    f.finish()
    assert f.ready() == 2


def test_loudness_and_viseme_cues() -> None:
    f = LiteFeaturizer()
    f.push(speech_like(0.4))
    f.push(np.zeros(FEATURE_SAMPLE_RATE // 2, np.float32))
    f.finish()
    feats = f.take(f.ready())
    assert len(feats) == 22
    assert max(x.open for x in feats[:10]) > 0.7
    assert feats[0].open > 0.3  # fast attack
    assert all(x.open == 0.0 for x in feats[-5:])  # released back to rest in silence
    assert feats[-1].silent and not feats[5].silent

    def shape(pcm: np.ndarray) -> float:
        g = LiteFeaturizer()
        g.push(pcm)
        g.finish()
        return float(np.mean([x.width for x in g.take(g.ready())[5:]]))

    assert shape(tone(300, 0.5)) < -0.6  # low: round "oo"
    assert shape(tone(3000, 0.5)) > 0.6  # high: wide "ee"
    assert abs(shape(tone(1000, 0.5))) < 0.3  # in between: open "aa"


def test_lookahead_opens_the_mouth_before_the_sound() -> None:
    f = LiteFeaturizer()
    f.push(np.concatenate([np.zeros(4 * N, np.float32), speech_like(0.2)]))
    f.finish()
    feats = f.take(f.ready())
    assert feats[2].open == 0.0
    assert feats[3].open > 0.1  # the frame before the onset


def test_featurizer_ignores_non_finite_samples() -> None:
    f = LiteFeaturizer()
    pcm = speech_like(0.1)
    pcm[::7] = np.nan
    f.push(pcm)
    f.finish()
    assert all(np.isfinite(x.open) and np.isfinite(x.width) for x in f.take(f.ready()))


# ----- rendering -----


def mouth_box(avatar: LiteAvatar, frame: int = 0) -> tuple[slice, slice]:
    cx, cy, half = avatar.mouth[frame]
    fw = avatar.face[frame, 2]
    return slice(int(cy - 0.05 * fw), int(cy + 0.12 * fw)), slice(int(cx - half), int(cx + half))


def test_loud_opens_the_mouth_and_leaves_the_rest_alone(
    renderer: LiteRenderer, astronaut: LiteAvatar
) -> None:
    idle = astronaut.idle_frame(0)
    loud = renderer.render_one(astronaut, 0, LOUD)
    rows, cols = mouth_box(astronaut)
    diff = np.abs(loud.astype(int) - idle.astype(int))
    assert diff[rows, cols].mean() > 25
    # the inside of the mouth is dark
    assert loud[rows, cols].mean() < idle[rows, cols].mean() - 20
    # above the nose, and left and right of the face, nothing changed
    x, y, w, h = astronaut.face[0]
    assert np.array_equal(loud[: int(y + 0.5 * h)], idle[: int(y + 0.5 * h)])
    assert np.array_equal(loud[:, : int(x - 0.1 * w)], idle[:, : int(x - 0.1 * w)])
    assert np.array_equal(loud[:, int(x + 1.1 * w) :], idle[:, int(x + 1.1 * w) :])
    # openness is monotone: a half-open mouth changes less
    half = renderer.render_one(astronaut, 0, LiteFeatures(0.4, 0.0, -30.0))
    assert 0 < np.abs(half.astype(int) - idle.astype(int))[rows, cols].mean() < diff[rows, cols].mean()


def test_silence_gives_the_idle_frame_as_a_new_array(renderer: LiteRenderer, astronaut: LiteAvatar) -> None:
    before = astronaut.frames.copy()
    for features in (SILENT, None, LiteFeatures(0.01, 0.5, -50.0)):
        out = renderer.render([FrameRequest(astronaut, 0, features)])[0]
        assert np.array_equal(out, astronaut.idle_frame(0))
        assert out is not astronaut.idle_frame(0) and not np.shares_memory(out, astronaut.frames)
    out = renderer.render([FrameRequest(astronaut, 0, LOUD)])[0]
    out[:] = 0  # drawing on an output never reaches the avatar
    assert np.array_equal(astronaut.frames, before)
    assert not astronaut.frames.flags.writeable


def test_visemes_change_the_mouth_shape(renderer: LiteRenderer, astronaut: LiteAvatar) -> None:
    rows, cols = mouth_box(astronaut)
    idle = astronaut.idle_frame(0).astype(int)
    wide = renderer.render_one(astronaut, 0, LiteFeatures(0.8, 1.0, -20.0))
    round_ = renderer.render_one(astronaut, 0, LiteFeatures(0.8, -1.0, -20.0))
    open_ = renderer.render_one(astronaut, 0, LiteFeatures(0.8, 0.0, -20.0))
    assert not np.array_equal(wide, round_) and not np.array_equal(wide, open_)

    def dark_width(img: np.ndarray) -> int:
        dark = img[rows, cols].mean(axis=2) < idle[rows, cols].mean(axis=2) - 40
        return int(dark.any(axis=0).sum())

    assert dark_width(round_) < dark_width(open_) <= dark_width(wide) + 2


# ----- what a user sees: the face talks -----

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts" / "lite"
GENERATED_FACE = (156.0, 150.0, 200.0, 200.0)  # the drawn face's box, Haar proportions
GENERATED_LIPS = (256, 310, 42)  # centre x, parting row, half width of the drawn lips
LEVELS = {"silence": SILENT, "mid": LiteFeatures(0.5, 0.0, -30.0), "loud": LOUD}


def draw_face() -> np.ndarray:
    """A 512 x 512 RGB face drawn with OpenCV: skin ellipse, eyes, nose shading, red lips parted
    by a dark line at row 310, the lip line where a Haar box of ``GENERATED_FACE`` puts it."""
    img = np.full((512, 512, 3), (120, 130, 150), np.uint8)
    cv2.ellipse(img, (256, 250), (105, 138), 0, 0, 360, (226, 184, 156), -1)
    for ex in (211, 301):
        cv2.ellipse(img, (ex, 226), (17, 8), 0, 0, 360, (250, 250, 250), -1)
        cv2.circle(img, (ex, 226), 6, (70, 50, 40), -1)
    cv2.ellipse(img, (256, 272), (14, 8), 0, 0, 180, (196, 150, 126), 3)
    cv2.ellipse(img, (256, 304), (42, 8), 0, 180, 360, (178, 62, 72), -1)
    cv2.ellipse(img, (256, 310), (40, 11), 0, 0, 180, (192, 78, 84), -1)
    cv2.rectangle(img, (222, 305), (290, 309), (178, 62, 72), -1)
    cv2.line(img, (216, 310), (296, 310), (112, 42, 48), 2)
    return cv2.GaussianBlur(img, (3, 3), 0)


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory, renderer: LiteRenderer) -> LiteAvatar:
    path = tmp_path_factory.mktemp("drawn") / "face.png"
    cv2.imwrite(str(path), cv2.cvtColor(draw_face(), cv2.COLOR_RGB2BGR))
    return renderer.prepare_avatar_dir(path.parent / "avatar", "drawn", "Drawn", path, face_box=GENERATED_FACE)


@pytest.fixture(params=["astronaut", "generated"])
def face_avatar(request: pytest.FixtureRequest) -> tuple[str, LiteAvatar]:
    return request.param, request.getfixturevalue(request.param)


def lower_face(avatar: LiteAvatar, band: int = 2) -> tuple[slice, slice]:
    """The lower face below the face box's middle, from cheek to cheek and down past the chin,
    widened by ``band`` pixels."""
    x, y, w, h = (float(v) for v in avatar.face[0])
    return (
        slice(max(0, int(y + 0.45 * h) - band), int(y + 1.45 * h) + band),
        slice(max(0, int(x - 0.05 * w) - band), int(x + 1.05 * w) + band),
    )


def open_rows(image: np.ndarray, avatar: LiteAvatar) -> np.ndarray:
    """Row numbers, in the middle of the mouth, that are dark: between parted lips."""
    cx, cy, half = (float(v) for v in avatar.mouth[0])
    rest = avatar.idle_frame(0)
    rows, cols = lower_face(avatar, band=0)
    skin = float(np.median(rest[rows, cols].max(axis=2)))
    fw = float(avatar.face[0, 2])
    top, bottom = int(cy - 0.15 * fw), int(cy + 0.3 * fw)  # from under the nose to the chin
    middle = image[top:bottom, int(cx - 0.3 * half) : int(cx + 0.3 * half) + 1].max(axis=2)
    return top + np.flatnonzero((middle < 0.5 * skin).mean(axis=1) > 0.5)


def mouth_rows(image: np.ndarray, avatar: LiteAvatar) -> int:
    """How many rows, in the middle of the mouth, are lips or the dark between them."""
    cx, cy, half = (float(v) for v in avatar.mouth[0])
    fw = float(avatar.face[0, 2])
    rows = slice(int(cy - 0.15 * fw), int(cy + 0.3 * fw))
    cols = slice(int(cx - 0.3 * half), int(cx + 0.3 * half) + 1)
    red = cv2.cvtColor(np.ascontiguousarray(image[rows, cols]), cv2.COLOR_RGB2LAB)[..., 1].astype(float)
    rest = cv2.cvtColor(np.ascontiguousarray(avatar.idle_frame(0)[rows, cols]), cv2.COLOR_RGB2LAB)[..., 1]
    skin = float(np.median(rest))
    lips = red > skin + 0.4 * (float(np.percentile(rest, 99)) - skin)
    dark = image[rows, cols].max(axis=2) < 0.5 * float(np.median(image[rows, cols].max(axis=2)))
    return int(((lips | dark).mean(axis=1) > 0.5).sum())


def test_talking_changes_only_the_lower_face(renderer: LiteRenderer, face_avatar: tuple[str, LiteAvatar]) -> None:
    _, avatar = face_avatar
    rest = avatar.idle_frame(0)
    rows, cols = lower_face(avatar)
    for features in (LOUD, LiteFeatures(1.0, 1.0, -14.0), LiteFeatures(1.0, -1.0, -14.0), LEVELS["mid"]):
        frame = renderer.render_one(avatar, 0, features)
        changed = np.abs(frame.astype(int) - rest.astype(int)).max(axis=2) > 0
        assert changed[rows, cols].sum() > 100  # the mouth moved...
        changed[rows, cols] = False
        assert not changed.any()  # ... and nothing outside the lower face


def test_the_mouth_opens_with_loudness_where_the_lips_are(
    renderer: LiteRenderer, face_avatar: tuple[str, LiteAvatar]
) -> None:
    name, avatar = face_avatar
    frames = {level: renderer.render_one(avatar, 0, f) for level, f in LEVELS.items()}
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    for level, frame in frames.items():
        cv2.imwrite(str(ARTIFACTS / f"{name}_{level}.png"), cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    rows, cols = lower_face(avatar, band=10)
    side_by_side = np.hstack([frames[level][rows, cols] for level in LEVELS])
    cv2.imwrite(str(ARTIFACTS / f"{name}_side_by_side.png"), cv2.cvtColor(side_by_side, cv2.COLOR_RGB2BGR))

    assert np.array_equal(frames["silence"], avatar.idle_frame(0))  # silence: the mouth at rest
    heights = {level: len(open_rows(frame, avatar)) for level, frame in frames.items()}
    assert heights["silence"] < heights["mid"] < heights["loud"], heights
    extents = {level: mouth_rows(frame, avatar) for level, frame in frames.items()}
    assert extents["silence"] < extents["mid"] < extents["loud"], extents

    # the opening is between the lips: its top at the parting line, centred on the mouth
    opening = open_rows(frames["loud"], avatar)
    fw = float(avatar.face[0, 2])
    if name == "generated":
        cx, parting, half = GENERATED_LIPS
    else:  # measured on the picture: the upper teeth's lower edge, under row 148
        cx, parting, half = 223, 148, 19
    assert abs(opening.min() - parting) <= 0.03 * fw + 1, (opening.min(), parting)
    skin = float(np.median(avatar.idle_frame(0)[rows, cols].max(axis=2)))
    darkened = (frames["loud"][opening, cols].max(axis=2) < 0.5 * skin) & (
        avatar.idle_frame(0)[opening, cols].max(axis=2) >= 0.5 * skin
    )
    dark_cols = cols.start + np.flatnonzero(darkened.any(axis=0))
    assert abs(0.5 * (dark_cols.min() + dark_cols.max()) - cx) < 0.15 * half * 2
    assert dark_cols.max() - dark_cols.min() <= 2 * half + 2  # no wider than the lips


def test_no_flat_shape_and_no_hard_edges(renderer: LiteRenderer, face_avatar: tuple[str, LiteAvatar]) -> None:
    """The opening is shaded (not one flat colour) and its edges blend into the lips."""
    _, avatar = face_avatar
    loud = renderer.render_one(avatar, 0, LOUD)
    opening = open_rows(loud, avatar)
    cx, _, half = (float(v) for v in avatar.mouth[0])
    column = loud[opening.min() - 3 : opening.max() + 4, int(cx)].astype(float).mean(axis=1)
    inside = loud[opening, int(cx - 0.3 * half) : int(cx + 0.3 * half) + 1].astype(float).mean(axis=2)
    assert inside.std() > 4  # a gradient, not a flat fill
    steps = np.abs(np.diff(column))
    assert steps.max() < 0.6 * (column.max() - column.min())  # edges take more than one pixel


def test_mixed_avatar_batch(renderer: LiteRenderer, astronaut: LiteAvatar, tmp_path: Path) -> None:
    small_src = tmp_path / "small.png"
    img = cv2.resize(cv2.imread(str(ASSET)), (300, 300), interpolation=cv2.INTER_AREA)
    cv2.imwrite(str(small_src), cv2.flip(img, 1))
    x, y, w, h = (v * 300 / 512 for v in ASTRONAUT_FACE)
    small = renderer.prepare_avatar_dir(
        tmp_path / "small", "small", "Small", small_src, face_box=(300 - x - w, y, w, h)
    )
    requests = [
        FrameRequest(astronaut, 0, LOUD),
        FrameRequest(small, 0, LOUD),
        FrameRequest(small, 0, SILENT),
        FrameRequest(astronaut, 0, LiteFeatures(0.5, -0.5, -25.0)),
    ]
    out = renderer.render(requests)
    assert [o.shape for o in out] == [(512, 512, 3), (300, 300, 3), (300, 300, 3), (512, 512, 3)]
    for req, image in zip(requests, out, strict=True):
        assert np.array_equal(image, renderer.render_one(req.avatar, req.cycle_index, req.features))  # type: ignore[arg-type]
        assert np.array_equal(image[:60], req.avatar.idle_frame(0)[:60])
    assert np.array_equal(out[2], small.idle_frame(0))


def test_renderer_rejects_foreign_avatars(renderer: LiteRenderer) -> None:
    class Other:
        pass

    with pytest.raises(TypeError):
        renderer.render([FrameRequest(Other(), 0, LOUD)])  # type: ignore[arg-type]


# ----- preparation -----


def test_prepare_and_load_round_trip(renderer: LiteRenderer, tmp_path: Path) -> None:
    folder = tmp_path / "astro"
    made = renderer.prepare_avatar_dir(folder, "astro", "Astro", ASSET, face_box=ASTRONAUT_FACE)
    loaded = renderer.load_avatar_dir(folder)
    assert loaded is not None
    assert loaded.info == made.info
    assert loaded.info.frames == 1 and loaded.cycle_length == 1
    assert (loaded.info.width, loaded.info.height) == (512, 512)
    assert np.array_equal(loaded.frames, made.frames)
    assert np.allclose(loaded.mouth, made.mouth) and np.allclose(loaded.face, made.face)
    # the lips were found where they are in the picture
    cx, cy, half = loaded.mouth[0]
    assert abs(cx - 223) < 6 and abs(cy - 146) < 6 and 14 < half < 26
    assert np.array_equal(renderer.render_one(loaded, 3, LOUD), renderer.render_one(made, 3, LOUD))


def test_stale_version_is_not_loaded(renderer: LiteRenderer, tmp_path: Path) -> None:
    folder = tmp_path / "astro"
    renderer.prepare_avatar_dir(folder, "astro", "Astro", ASSET, face_box=ASTRONAUT_FACE)
    assert renderer.avatar_problem(folder) is None
    other = LiteRenderer(params=PrepareParams(max_size=256))
    assert other.preparation_version != renderer.preparation_version
    problem = other.avatar_problem(folder)
    assert problem is not None and problem.startswith("stale") and other.load_avatar_dir(folder) is None
    assert other.recorded_version(folder) == renderer.preparation_version  # left as it was
    assert renderer.load_avatar_dir(folder) is not None
    meta = json.loads((folder / META_FILE).read_text())
    meta["version"] = "0" * 16
    (folder / META_FILE).write_text(json.dumps(meta))
    assert renderer.load_avatar_dir(folder) is None


def test_resize_to_max_size(tmp_path: Path) -> None:
    r = LiteRenderer(params=PrepareParams(max_size=200))
    avatar = r.prepare_avatar_dir(tmp_path / "a", "a", "A", ASSET, face_box=ASTRONAUT_FACE)
    assert max(avatar.info.width, avatar.info.height) <= 200
    assert avatar.info.width % 2 == 0 and avatar.info.height % 2 == 0
    assert abs(avatar.face[0, 2] - 98 * 200 / 512) < 1
    assert r.render_one(avatar, 0, LOUD).shape == (avatar.info.height, avatar.info.width, 3)


def test_video_avatar_loops_forward_then_backward_and_survives_a_faceless_frame(tmp_path: Path) -> None:
    count, size, blank = 6, 256, 3
    source = write_video(tmp_path / "clip.avi", shifted_astronauts(count, size, blank=blank))
    detector = BoxDetector(ASTRONAUT_FACE, 512)
    r = LiteRenderer(face_detector=detector)  # type: ignore[arg-type]
    avatar = r.prepare_avatar_dir(tmp_path / "vid", "vid", "Video", source)
    assert avatar.info.frames == count and avatar.cycle_length == 2 * count - 2
    assert detector.calls == count
    # frames stay in order: the blank one is still at its place
    means = [float(avatar.frames[k].std()) for k in range(count)]
    assert means[blank] < 5 and all(m > 30 for k, m in enumerate(means) if k != blank)
    # the faceless frame borrows its neighbours' geometry; nothing jumps
    assert np.all(np.isfinite(avatar.face)) and np.all(np.isfinite(avatar.mouth))
    assert np.abs(np.diff(avatar.mouth[:, :2], axis=0)).max() < 6
    # forward then backward, no jump at either end
    order = [avatar.frame_index(i) for i in range(2 * avatar.cycle_length)]
    assert order[: avatar.cycle_length] == [0, 1, 2, 3, 4, 5, 4, 3, 2, 1]
    assert order[avatar.cycle_length :] == order[: avatar.cycle_length]
    assert np.array_equal(avatar.idle_frame(7), avatar.frames[3])
    for i in range(avatar.cycle_length):
        out = r.render_one(avatar, i, LOUD)
        assert out.shape == (size, size, 3)
        assert np.array_equal(out[:40], avatar.idle_frame(i)[:40])
    loaded = r.load_avatar_dir(tmp_path / "vid")
    assert loaded is not None and np.array_equal(loaded.frames, avatar.frames)
    stored = np.load(tmp_path / "vid" / "geometry.npz", allow_pickle=False)
    assert list(stored["detected"]) == [k != blank for k in range(count)]


def test_fill_boxes_uses_the_nearest_faces() -> None:
    nan = np.nan
    boxes = np.array([[nan] * 4, [10, 10, 50, 50], [nan] * 4, [14, 10, 50, 50], [nan] * 4])
    filled = fill_boxes(boxes)
    assert filled[:, 0].tolist() == [10, 10, 12, 14, 14]
    with pytest.raises(PreparationError):
        fill_boxes(np.full((3, 4), nan))


def test_source_without_a_face_or_unreadable_is_refused(tmp_path: Path) -> None:
    r = LiteRenderer(face_detector=BoxDetector(ASTRONAUT_FACE, 512))  # type: ignore[arg-type]
    blank = tmp_path / "blank.png"
    cv2.imwrite(str(blank), np.full((64, 64, 3), 200, np.uint8))
    with pytest.raises(PreparationError):
        r.prepare_avatar_dir(tmp_path / "x", "x", "X", blank)
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"not a video at all" * 10)
    with pytest.raises(PreparationError):
        r.prepare_avatar_dir(tmp_path / "y", "y", "Y", junk)


def test_haar_cascade_finds_the_astronaut(tmp_path: Path) -> None:
    avatar = LiteRenderer().prepare_avatar_dir(tmp_path / "a", "a", "A", ASSET)  # default detector
    x, y, w, _h = avatar.face[0]
    assert abs(x - 174) < 15 and abs(y - 66) < 15 and 80 < w < 120
    cx, cy, _ = avatar.mouth[0]
    assert abs(cx - 223) < 8 and abs(cy - 146) < 8


def test_haar_cascade_tracks_a_video_with_a_faceless_frame(tmp_path: Path) -> None:
    detector = FaceDetector()
    source = write_video(tmp_path / "clip.avi", shifted_astronauts(4, 256, blank=2))
    r = LiteRenderer(face_detector=detector)
    avatar = r.prepare_avatar_dir(tmp_path / "v", "v", "V", source)
    assert avatar.info.frames == 4
    detected = np.load(tmp_path / "v" / "geometry.npz", allow_pickle=False)["detected"]
    assert list(detected) == [True, True, False, True]
    assert np.abs(avatar.face[:, :2] - avatar.face[0, :2]).max() < 6


# ----- through the real frame worker -----


def test_clip_through_the_frame_worker(renderer: LiteRenderer, astronaut: LiteAvatar) -> None:
    pcm16 = np.concatenate([speech_like(0.5), np.zeros(FEATURE_SAMPLE_RATE // 2, np.float32)])
    pcm48 = np.repeat(pcm16, 3)
    worker = FrameWorker(renderer)
    worker.start()
    try:
        stream = worker.open_stream(astronaut, StreamMode.CLIP)
        stream.feed(pcm16[:5000], pcm48[:15000])
        stream.feed(pcm16[5000:], pcm48[15000:])
        stream.end_audio()
        frames = []
        deadline = time.monotonic() + 20
        while not stream.closed and time.monotonic() < deadline:
            frames.extend(stream.take_frames())
            time.sleep(0.005)
        frames.extend(stream.take_frames())
    finally:
        worker.stop()
    assert stream.state is StreamState.FINISHED, stream.error
    assert [f.index for f in frames] == list(range(25))
    assert all(f.speech for f in frames)
    assert all(f.audio.shape == (OUTPUT_SAMPLES_PER_FRAME,) for f in frames)
    assert np.array_equal(np.concatenate([f.audio for f in frames]), pcm48)
    idle = astronaut.idle_frame(0)
    rows, cols = mouth_box(astronaut)
    moved = [np.abs(f.image.astype(int) - idle.astype(int))[rows, cols].mean() for f in frames]
    assert min(moved[1:12]) > 5  # talking
    assert all(np.array_equal(f.image, idle) for f in frames[-5:])  # silent again: at rest


@pytest.mark.parametrize("crop", [(slice(0, 160), slice(0, 512)), (slice(60, 512), slice(200, 512))])
def test_mouth_at_the_edge_of_the_picture(tmp_path: Path, crop: tuple[slice, slice]) -> None:
    rows, cols = crop
    img = cv2.imread(str(ASSET))[rows, cols]
    path = tmp_path / "crop.png"
    cv2.imwrite(str(path), img)
    x, y, w, h = ASTRONAUT_FACE
    box = (x - cols.start, y - rows.start, w, h)
    r = LiteRenderer()
    avatar = r.prepare_avatar_dir(tmp_path / "c", "c", "C", path, face_box=box)
    for feats in (LOUD, LiteFeatures(0.7, 1.0, -20.0), LiteFeatures(0.7, -1.0, -20.0)):
        out = r.render_one(avatar, 0, feats)
        assert out.shape == avatar.frames[0].shape
        assert not np.array_equal(out, avatar.frames[0])


def test_the_detector_picks_the_confident_largest_or_the_nearest_face() -> None:
    gray = cv2.equalizeHist(cv2.cvtColor(cv2.imread(str(ASSET)), cv2.COLOR_BGR2GRAY))
    small = cv2.resize(gray, (320, 320), interpolation=cv2.INTER_AREA)
    detector = FaceDetector()
    rows = detector.detect_all(small, 26)
    assert len(rows) >= 1 and rows.shape[1] == 5
    x, y, w, _h = detector.detect(small)  # type: ignore[misc]
    s = 320 / 512
    assert abs(x - 174 * s) < 10 and abs(y - 66 * s) < 10 and abs(w - 98 * s) < 12
    # a weak hit is dropped even when it is larger; among confident ones the largest or nearest wins
    rows = np.array([[10, 10, 40, 40, 30], [100, 100, 80, 80, 4], [200, 10, 50, 50, 20]])
    assert face.pick(rows, None).tolist() == [200, 10, 50, 50, 20]
    assert face.pick(rows, (25.0, 25.0)).tolist() == [10, 10, 40, 40, 30]
    # with a hint the search stays near it, and falls back to the whole picture
    near = detector.detect(gray, near=(170.0, 70.0, 100.0, 100.0))
    assert near is not None and abs(near[0] - 174) < 12 and abs(near[1] - 66) < 12
    far = detector.detect(gray, near=(400.0, 400.0, 60.0, 60.0))
    assert far is not None and abs(far[0] - 174) < 12


def test_the_alt2_cascade_is_the_fallback() -> None:
    gray = cv2.equalizeHist(cv2.cvtColor(cv2.imread(str(ASSET)), cv2.COLOR_BGR2GRAY))
    detector = FaceDetector()
    assert len(detector._classifiers) == 2
    _default, alt2 = detector._classifiers

    class Blind:
        def detectMultiScale2(self, *args: object, **kwargs: object) -> tuple[tuple, tuple]:
            return (), ()

    detector._classifiers = [Blind(), alt2]  # type: ignore[list-item]
    box = detector.detect(gray)
    assert box is not None and abs(box[0] - 174) < 12 and abs(box[2] - 98) < 15


def test_opencv_without_face_detection_fails_clearly(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    face.default_detector.cache_clear()
    monkeypatch.delattr(cv2, "CascadeClassifier")
    with pytest.raises(FaceDetectorUnavailable, match=r"opencv-python-headless<5"):
        FaceDetector()
    with pytest.raises(FaceDetectorUnavailable, match=r"CascadeClassifier"):
        LiteRenderer().prepare_avatar_dir(tmp_path / "a", "a", "A", ASSET)
    monkeypatch.undo()
    monkeypatch.setattr(cv2.data, "haarcascades", str(tmp_path / "nothing-here"))
    with pytest.raises(FaceDetectorUnavailable, match=r"frontalface_default.*headless<5"):
        FaceDetector()
    # a known face box still works without a detector
    known = LiteRenderer().prepare_avatar_dir(tmp_path / "b", "b", "B", ASSET, face_box=ASTRONAUT_FACE)
    assert known.info.frames == 1
    face.default_detector.cache_clear()
