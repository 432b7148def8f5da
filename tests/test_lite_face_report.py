"""Lite avatar preparation on a video with frames where there is no face: the geometry stays frame
for frame, and the avatar's metadata says how many frames had no face or a fallback mouth."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np

from inference.lite import LiteRenderer
from inference.lite.avatar import META_FILE
from inference.lite.prepare import PrepareParams, frames_without_face, prepare_frames

ASSET = Path(__file__).resolve().parent.parent / "inference" / "assets" / "astronaut.png"


def write_video(path: Path, frames: list[np.ndarray]) -> Path:
    h, w = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 25, (w, h))
    for frame in frames:
        writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    writer.release()
    return path


def test_frames_without_a_face_are_counted_and_keep_their_place(tmp_path: Path) -> None:
    """The astronaut moves 10 px a frame; frames 5..8 are blank. The Haar detector (the real one)
    finds no face there: they take their neighbours' boxes, and the count says 4."""
    base = cv2.cvtColor(cv2.imread(str(ASSET)), cv2.COLOR_BGR2RGB)
    blank = set(range(5, 9))
    frames = [np.full_like(base, 90) if i in blank else np.roll(base, 10 * i, axis=1) for i in range(24)]
    source = write_video(tmp_path / "gaps.avi", frames)
    prepared = prepare_frames(source, PrepareParams())
    assert len(prepared.frames) == len(prepared.face) == len(prepared.mouth) == 24
    assert (prepared.faces.frames, prepared.faces.no_face, prepared.faces.method) == (24, 4, "haar")
    assert 0 <= prepared.faces.fallback <= 20
    assert [bool(d) for d in prepared.detected] == [i not in blank for i in range(24)]
    # faces after the gap are on their own frames: the box moves with the face, not a frame late
    # (frames 9..18: away from the ends, where the temporal smoothing reflects the motion)
    x = prepared.face[:, 0] + prepared.face[:, 2] / 2
    for i in range(9, 19):
        assert abs((x[i] - x[4]) - 10 * (i - 4)) < 5, i
    avatar = LiteRenderer().prepare_avatar_dir(tmp_path / "a", "gaps", "Gaps", source)
    meta = json.loads((tmp_path / "a" / META_FILE).read_text())
    assert meta["faces"] == prepared.faces.to_json()
    assert avatar.face_report == prepared.faces


def test_no_face_follows_the_nearest_key_frame() -> None:
    boxes = np.full((7, 4), np.nan)
    boxes[[0, 6]] = 1.0
    is_key = np.array([1, 0, 0, 1, 0, 0, 1], bool)
    assert frames_without_face(boxes, is_key).tolist() == [False, False, True, True, True, False, False]
