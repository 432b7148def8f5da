"""MuseTalk's landmark face box, the offline fallback, and preparation on frames without a face."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from musetalk_helpers import write_video

from inference.dwpose import Keypoints
from inference.face_features import find_lips
from inference.musetalk import MuseTalkRenderer
from inference.musetalk.face import (
    EXTRA_MARGIN,
    FeatureFaceDetector,
    FoundFace,
    HaarFaceDetector,
    LandmarkFaceDetector,
    box_from_landmarks,
    find_faces,
    with_margin,
)
from inference.musetalk.models import MuseTalkModels

ASTRONAUT = Path(__file__).resolve().parents[2] / "inference" / "assets" / "astronaut.png"


def astronaut() -> np.ndarray:
    return cv2.cvtColor(cv2.imread(str(ASTRONAUT)), cv2.COLOR_BGR2RGB)


def face_landmarks(x1: float, x2: float, nose_y: float, chin_y: float) -> np.ndarray:
    """68 points spanning x1..x2, nose landmark 29 at ``nose_y``, the chin (point 8) lowest."""
    points = np.zeros((68, 2), np.float32)
    points[:, 0] = np.linspace(x1, x2, 68)
    points[:, 1] = np.linspace(nose_y - 40, chin_y - 5, 68)
    points[29, 1] = nose_y
    points[8, 1] = chin_y
    return points


def test_the_rule_mirrors_the_nose_over_the_chin() -> None:
    assert box_from_landmarks(face_landmarks(100.9, 220.4, 150.7, 230.2)) == (100, 70, 220, 230)  # int truncation
    assert box_from_landmarks(face_landmarks(100, 220, 50, 140)) == (100, 0, 220, 140)  # top clamped at 0


def test_the_rule_gives_up_where_musetalk_falls_back() -> None:
    flat = face_landmarks(100, 220, 150, 230)
    flat[:, 0] = 120
    assert box_from_landmarks(flat) is None  # no width
    assert box_from_landmarks(face_landmarks(-3, 220, 150, 230)) is None  # x1 < 0
    low = face_landmarks(100, 220, 150, 230)
    low[:, 1] = 150
    assert box_from_landmarks(low) is None  # no height


def test_the_margin_goes_below_the_chin_inside_the_frame() -> None:
    assert with_margin((100, 70, 220, 230), (300, 400, 3), EXTRA_MARGIN) == (100, 70, 220, 240)
    assert with_margin((100, 70, 420, 295), (300, 400, 3), EXTRA_MARGIN) == (100, 70, 400, 300)


class FixedPose:
    """Keypoints as DWPose would give them (the network itself is tested in test_dwpose)."""

    def __init__(self, face: np.ndarray, score: float) -> None:
        self.points = np.zeros((133, 2), np.float32)
        self.points[23:91] = face
        self.scores = np.full(133, score, np.float32)

    def many(self, frames: list[np.ndarray]) -> list[Keypoints]:
        return [Keypoints(self.points, self.scores) for _ in frames]


def test_landmark_detector_uses_the_rule_then_musetalks_fallback() -> None:
    rgb = astronaut()
    good = LandmarkFaceDetector(FixedPose(face_landmarks(180, 270, 110, 180), 0.8))
    assert find_faces([rgb], good) == [FoundFace((180, 40, 270, 190), "landmarks")]
    degenerate = LandmarkFaceDetector(FixedPose(face_landmarks(-5, 270, 110, 180), 0.8))
    found = find_faces([rgb], degenerate)[0]
    assert found is not None and found.method == "features"  # the offline estimate, as MuseTalk its S3FD box
    assert find_faces([rgb], LandmarkFaceDetector(FixedPose(face_landmarks(180, 270, 110, 180), 0.1))) == [None]


def test_the_fallback_keeps_the_jaw_that_the_haar_proportions_cut() -> None:
    """On the shipped portrait the chin is at y = 178 (dlib's 68 landmarks, bench/face_boxes.py):
    the Haar proportions end the box at 175, above the chin; the lip- and chin-anchored estimate
    ends it below the chin, with MuseTalk's 10 px margin, and keeps the lips inside."""
    rgb = astronaut()
    before = find_faces([rgb], HaarFaceDetector())[0]
    after = find_faces([rgb], FeatureFaceDetector())[0]
    assert before is not None and after is not None and after.method == "features"
    assert before.box[3] < 178 <= after.box[3] - 5
    face = HaarFaceDetector().find(rgb)
    assert face is not None
    lips = find_lips(rgb, face)
    assert lips is not None and after.box[0] < lips[0] < after.box[2] and after.box[1] < lips[1] < after.box[3]


def test_frames_without_a_face_keep_their_place_and_are_reported(models: MuseTalkModels, tmp_path: Path) -> None:
    """A video of the astronaut moving right 6 px a frame, with blank frames 4..5 (near faces: they
    take a neighbour's box) and 12..23 (too far from any face: shown unchanged). Every frame keeps
    its latent, the faces after the gaps are where they are on their own frames, and the avatar's
    metadata says how many frames had no face."""
    base = astronaut()
    blank = np.full_like(base, 128)
    frames = [blank if 4 <= i <= 5 or 12 <= i <= 23 else np.roll(base, 6 * i, axis=1) for i in range(28)]
    renderer = MuseTalkRenderer(models, tmp_path / "avatars", detector=FeatureFaceDetector())
    avatar = renderer.prepare_avatar("gaps", "Gaps", str(write_video(tmp_path / "g.mp4", frames)))
    data = avatar.data
    assert len(data.frames) == data.latents.shape[0] == len(data.boxes) == len(data.alphas) == 28
    assert data.faces is not None
    assert (data.faces.frames, data.faces.no_face, data.faces.method) == (28, 14, "features")
    shown_unchanged = [i for i, b in enumerate(data.boxes) if b is None]
    assert shown_unchanged == list(range(17, 19))  # 12..16 and 19..23 are within 5 frames of a face
    assert data.latents[17:19].abs().sum() == 0 and data.latents[24].abs().sum() > 0
    first = data.boxes[0]
    assert first is not None
    for i in [*range(4), *range(6, 12), *range(24, 28)]:
        box = data.boxes[i]
        assert box is not None and abs(box[0] - first[0] - 6 * i) <= 3, i  # no shift of boxes against frames
    assert data.boxes[4] == data.boxes[3] and data.boxes[5] == data.boxes[6]
    meta = json.loads((tmp_path / "avatars" / "gaps" / "musetalk" / "avatar.json").read_text())
    assert meta["faces"] == {"frames": 28, "no_face": 14, "fallback": data.faces.fallback, "method": "features"}
    loaded = renderer.load_avatar("gaps")
    assert loaded is not None and loaded.face_report == data.faces


@pytest.mark.parametrize("weights", [False, True])
def test_renderer_picks_dwpose_when_its_weights_are_there(
    models_dir: Path, weights: bool, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from inference.dwpose import TINY, WEIGHTS
    from inference.dwpose.tiny import write_tiny_dwpose
    from inference.musetalk import load_models

    folder = tmp_path / "models"
    folder.symlink_to(models_dir)
    if weights:
        (tmp_path / "dw").mkdir()
        # the tiny checkpoint is not DWPose-l's: loading it must fail loudly, naming the file
        write_tiny_dwpose(tmp_path / "dw" / WEIGHTS, config=TINY)
        folder = tmp_path / "with-dwpose"
        folder.mkdir()
        for entry in models_dir.iterdir():
            (folder / entry.name).symlink_to(entry)
        (folder / "dwpose").symlink_to(tmp_path / "dw" / "dwpose")
    renderer = MuseTalkRenderer(load_models(folder, device="cpu", dtype="fp32"), tmp_path / "avatars")
    if weights:
        assert renderer.dwpose_weights == folder / WEIGHTS
        with pytest.raises(ValueError, match="does not fit RTMPose"):
            _ = renderer.detector
    else:
        assert isinstance(renderer.detector, FeatureFaceDetector)
        assert "DWPose's weights" in caplog.text
