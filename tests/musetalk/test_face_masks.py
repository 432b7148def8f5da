from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from inference.musetalk.face import (
    HaarFaceDetector,
    box_from_detection,
    detect_boxes,
    fill_gaps,
)
from inference.musetalk.masks import (
    _jaw_kernel,
    crop_box,
    crop_padded,
    face_alpha,
    geometric_mask,
)

ASSETS = Path(__file__).resolve().parents[3] / "shared" / "assets"
ASTRONAUT = Path(__file__).resolve().parents[2] / "inference" / "assets" / "astronaut.png"


def test_box_rule_from_a_detector_box() -> None:
    # nose at 0.53h and chin at 1.05h: top = nose - (chin - nose), bottom = chin + 10 px margin
    assert box_from_detection(100, 200, 80, 100, frame_height=1000) == (100, 201, 180, 315)
    assert box_from_detection(100, 200, 80, 100, frame_height=310)[3] == 310  # margin clipped to frame


def test_fill_gaps_uses_near_boxes_only() -> None:
    a, b = (0, 0, 10, 10), (5, 5, 15, 15)
    boxes = [None, a, None, None, b] + [None] * 8
    filled = fill_gaps(boxes, max_gap=3)
    assert filled[:5] == [a, a, a, b, b]
    assert filled[7] == b and filled[8] is None and filled[12] is None
    assert fill_gaps([None, None]) == [None, None]


def test_crop_box_is_square_and_1_5x() -> None:
    assert crop_box((100, 100, 200, 180)) == (75, 65, 225, 215)


def test_crop_padded_outside_the_image() -> None:
    image = np.arange(5 * 6 * 3, dtype=np.uint8).reshape(5, 6, 3)
    out = crop_padded(image, (-2, -1, 4, 3))
    assert out.shape == (4, 6, 3)
    assert (out[0] == 0).all() and (out[:, :2] == 0).all()
    assert np.array_equal(out[1:, 2:], image[0:3, 0:4])
    assert crop_padded(image, (10, 10, 12, 13)).shape == (3, 2, 3)


def test_face_alpha_keeps_lower_face_only() -> None:
    box = (40, 30, 140, 150)
    crop = crop_box(box)
    size = crop[2] - crop[0]
    alpha = face_alpha(np.full((size, size), 255, np.uint8), box, crop)
    assert alpha.shape == (120, 100) and alpha.dtype == np.float32
    middle = crop[1] + size // 2 - box[1]
    assert alpha[: middle - 10].max() == 0  # above the crop's middle (minus the blur) nothing changes
    assert alpha[middle + 20 : -10, 40:60].min() > 0.9  # the mouth and chin are replaced
    assert 0 < alpha[middle].mean() < 1  # the boundary is blurred


def test_geometric_mask_is_an_ellipse_in_the_box() -> None:
    mask = geometric_mask(200, (50, 40, 150, 160))
    ys, xs = np.nonzero(mask)
    assert xs.min() >= 55 and xs.max() <= 145 and ys.min() >= 40 and ys.max() <= 160


def test_jaw_kernel_shape() -> None:
    kernel = _jaw_kernel()
    assert kernel.shape == (33, 33)
    assert kernel[:10].sum() == 0 and kernel[10, 16] == 1 and kernel[20].sum() == 21 and kernel[32].sum() == 21


@pytest.mark.skipif(not (ASSETS / "yongen.mp4").is_file(), reason="../shared/assets/yongen.mp4 is absent")
def test_haar_detector_on_a_real_video_frame() -> None:
    capture = cv2.VideoCapture(str(ASSETS / "yongen.mp4"))
    ok, frame = capture.read()
    capture.release()
    assert ok
    box = HaarFaceDetector()(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
    assert box is not None
    x1, y1, x2, y2 = box
    assert 150 < x1 < x2 < 500 and 200 < y1 < y2 < 600 and 150 < x2 - x1 < 350


def test_haar_detector_tracks_the_shipped_avatar() -> None:
    """The shared detector (``inference.face``) behind MuseTalk's box rule, frame to frame."""
    rgb = cv2.cvtColor(cv2.imread(str(ASTRONAUT)), cv2.COLOR_BGR2RGB)
    detector = HaarFaceDetector()
    box = detector(rgb)
    assert box is not None
    x1, y1, x2, y2 = box
    assert abs(x1 - 174) < 12 and abs(x2 - 272) < 15
    assert y1 < 80 and abs(y2 - (66 + 1.05 * 98 + 10)) < 15
    frames = [np.roll(rgb, 3 * k, axis=1) for k in range(3)] + [np.full_like(rgb, 128)]
    boxes = detect_boxes(frames, detector)
    assert boxes[3] is None and all(b is not None for b in boxes[:3])
    assert [b[0] - box[0] for b in boxes[:3]] == pytest.approx([0, 3, 6], abs=4)  # type: ignore[index]
    assert detect_boxes(frames, lambda f: (1, 2, 3, 4)) == [(1, 2, 3, 4)] * 4
