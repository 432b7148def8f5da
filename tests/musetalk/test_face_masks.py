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
    LOWER_LIP,
    MOUTH,
    NOSE_CLASS,
    SKIN,
    UPPER_LIP,
    FaceParser,
    _jaw_kernel,
    crop_box,
    crop_padded,
    face_alpha,
    geometric_mask,
    parse_input,
    pil_like_resize,
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


@pytest.mark.assets
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


def test_v15_cheeks_are_90_px_either_side_of_the_centre() -> None:
    """v1.5's scripts build ``FaceParsing(left_cheek_width=90, right_cheek_width=90)``: filled
    rectangles from column 0 to 256 - 90 and from 256 + 90 to the edge, both ends included."""
    cheeks = FaceParser(None, "cpu").cheeks
    assert cheeks[:, 166].all() and not cheeks[:, 167].any()
    assert not cheeks[:, 345].any() and cheeks[:, 346].all()
    assert FaceParser(None, "cpu", cheek_width=80).cheeks[:, 176].all()


def synthetic_labels() -> np.ndarray:
    """A face parse: skin over rows 100-299, the nose inside it, lips and mouth below the skin."""
    labels = np.zeros((512, 512), np.uint8)
    labels[100:300, 100:412] = SKIN
    labels[150:250, 236:276] = NOSE_CLASS
    labels[320:330, 206:306] = UPPER_LIP
    labels[330:336, 206:306] = MOUTH
    labels[336:346, 206:306] = LOWER_LIP
    return labels


def test_jaw_mask_grows_the_skin_over_the_jaw_but_not_on_the_cheeks() -> None:
    labels = synthetic_labels()
    mask = FaceParser(None, "cpu").mask(labels)
    assert set(np.unique(mask)) == {0, 255}
    assert not mask[150:250, 236:276].any()  # the nose stays
    assert mask[320:346, 206:306].all()  # lips and mouth are replaced
    # below the skin (rows 300+) the cone grows it six rows; on the cheeks the erosion takes the
    # last two back, so those rows cover exactly the central band (columns 167-345)
    assert mask[300:306, 256].all() and not mask[306:320].any()
    assert np.array_equal(np.nonzero(mask[305])[0], np.arange(167, 346))
    assert mask[303, 140] == 255 and mask[304, 140] == 0
    # on the cheeks the skin's border is eroded away (35x3 ellipse, twice), in the band it is not
    assert mask[200, 130] == 255 and mask[200, 110] == 0 and mask[200, 380] == 255 and mask[200, 400] == 0


def test_raw_mask_is_skin_mouth_and_lips_as_parsed() -> None:
    labels = synthetic_labels()
    mask = FaceParser(None, "cpu", mode="raw").mask(labels)
    expected = np.isin(labels, (SKIN, MOUTH, UPPER_LIP, LOWER_LIP))
    assert np.array_equal(mask == 255, expected)
    with pytest.raises(ValueError, match="mask mode"):
        FaceParser(None, "cpu", mode="neck")


def test_resizes_follow_pil_when_shrinking_and_enlarging() -> None:
    """MuseTalk resizes the crop to 512 with PIL's bilinear filter and the mask back with PIL's
    bicubic one; both average when they shrink."""
    from PIL import Image

    rgb = cv2.cvtColor(cv2.imread(str(ASTRONAUT)), cv2.COLOR_BGR2RGB)
    for size in (300, 900):
        crop = cv2.resize(rgb, (size, size), interpolation=cv2.INTER_CUBIC)
        ref = np.asarray(Image.fromarray(crop).resize((512, 512), Image.BILINEAR)).astype(int)
        assert np.abs(parse_input(crop).astype(int) - ref).mean() < 0.7, size
    mask = np.zeros((512, 512), np.uint8)
    cv2.ellipse(mask, (256, 300), (150, 120), 0, 0, 360, 255, -1)
    for size in (300, 700):
        ref = np.asarray(Image.fromarray(mask).resize((size, size), Image.BICUBIC)).astype(int)
        got = pil_like_resize(mask, (size, size), cv2.INTER_CUBIC).astype(int)
        assert np.abs(got - ref).mean() < 0.1, size


@pytest.mark.parametrize("box", [(60, 50, 160, 170), (-30, -20, 70, 100), (150, 100, 260, 230)])
def test_paste_equals_musetalks_pil_blending(box: tuple[int, int, int, int]) -> None:
    """``paste_face`` against MuseTalk's ``get_image_blending`` done with PIL: the face resized
    into the face box of a crop of the frame (black outside it), that crop pasted back through the
    crop-sized mask. Equal to rounding, also where the boxes leave the frame."""
    from PIL import Image

    from inference.musetalk.blend import paste_face

    rng = np.random.default_rng(1)
    frame = rng.integers(0, 256, (200, 240, 3), dtype=np.uint8)
    face = rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)
    crop = crop_box(box)
    size = crop[2] - crop[0]
    mask = np.zeros((size, size), np.uint8)
    cv2.ellipse(mask, (size // 2, size // 2 + 20), (size // 3, size // 4), 0, 0, 360, 255, -1)
    mask = cv2.GaussianBlur(mask, (int(0.1 * size // 2 * 2) + 1,) * 2, 0)
    x1, y1, x2, y2 = box
    resized = cv2.resize(face, (x2 - x1, y2 - y1))
    body = Image.fromarray(frame)
    large = body.crop(crop)
    large.paste(Image.fromarray(resized), (x1 - crop[0], y1 - crop[1], x2 - crop[0], y2 - crop[1]))
    body.paste(large, crop[:2], Image.fromarray(mask))
    reference = np.asarray(body)
    alpha = crop_padded(mask, (x1 - crop[0], y1 - crop[1], x2 - crop[0], y2 - crop[1])).astype(np.float32) / 255
    ours = paste_face(frame, face, box, alpha[..., None])
    assert np.abs(ours.astype(int) - reference.astype(int)).max() <= 1
    assert not np.array_equal(ours, frame)


def test_face_alpha_equals_musetalks_prepare_material() -> None:
    """``face_alpha`` against MuseTalk's ``get_image_prepare_material`` after parsing, with PIL: the
    parsed mask cut to the face box, pasted on black, rows above the crop's middle cleared, blurred
    with a kernel of 10% of the crop; compared over the face box, where the blend uses it."""
    from PIL import Image

    box = (47, 33, 151, 171)
    crop = crop_box(box)
    size = crop[2] - crop[0]
    rng = np.random.default_rng(2)
    parsed = np.where(rng.random((size, size)) < 0.6, 255, 0).astype(np.uint8)
    parsed = cv2.GaussianBlur(parsed, (9, 9), 0)
    x, y, x1, y1 = box
    xs, ys = crop[:2]
    inner = (x - xs, y - ys, x1 - xs, y1 - ys)
    small = Image.fromarray(parsed).crop(inner)
    mask = Image.new("L", (size, size), 0)
    mask.paste(small, inner)
    top = int(size * 0.5)
    lower = Image.new("L", (size, size), 0)
    lower.paste(mask.crop((0, top, size, size)), (0, top))
    kernel = int(0.1 * size // 2 * 2) + 1
    reference = cv2.GaussianBlur(np.array(lower), (kernel, kernel), 0)
    ours = face_alpha(parsed, box, crop)
    assert np.array_equal(np.round(ours * 255).astype(np.uint8), reference[inner[1] : inner[3], inner[0] : inner[2]])
