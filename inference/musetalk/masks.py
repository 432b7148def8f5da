"""Blending masks: where the generated face replaces the original, as MuseTalk v1.5 ("jaw" mode).

For a square crop 1.5x the face box, the face is parsed (BiSeNet, 19 classes, at 512x512), the skin
region dilated with MuseTalk's cone-and-tail kernel (with cv2's anchor at its centre this grows the
jaw line a few pixels down) and eroded again on the cheeks (outside a central band of
``2 * cheek_width`` columns, 90 px each side in v1.5's scripts), lips and mouth added, the nose left
out; the mask is kept inside the face box and below the crop's middle, then blurred.
MuseTalk v1 used the "raw" mode instead: skin, mouth and lips as parsed, no growing.

Without the parsing weights a geometric stand-in is used: an ellipse over the lower face (from the
nose line to the chin, 90% of the box width), under the same crop, boundary and blur rules.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch

from inference.musetalk.bisenet import BiSeNet
from inference.musetalk.face import Box

EXPAND = 1.5
UPPER_BOUNDARY = 0.5
PARSE_SIZE = 512
CHEEK_WIDTH = 90  # v1.5's inference scripts pass --left/right_cheek_width 90
MASK_MODES = ("jaw", "raw")
SKIN, NOSE_CLASS, MOUTH, UPPER_LIP, LOWER_LIP = 1, 10, 11, 12, 13
_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def crop_box(box: Box, expand: float = EXPAND) -> Box:
    """The square box around ``box`` that MuseTalk parses and blends in."""
    x1, y1, x2, y2 = box
    xc, yc = (x1 + x2) // 2, (y1 + y2) // 2
    s = int(max(x2 - x1, y2 - y1) // 2 * expand)
    return xc - s, yc - s, xc + s, yc + s


def crop_padded(image: np.ndarray, box: Box) -> np.ndarray:
    """``image[y1:y2, x1:x2]`` with black where the box leaves the image."""
    x1, y1, x2, y2 = box
    h, w = image.shape[:2]
    out = np.zeros((y2 - y1, x2 - x1, *image.shape[2:]), dtype=image.dtype)
    sx1, sy1, sx2, sy2 = max(x1, 0), max(y1, 0), min(x2, w), min(y2, h)
    if sx2 > sx1 and sy2 > sy1:
        out[sy1 - y1 : sy2 - y1, sx1 - x1 : sx2 - x1] = image[sy1:sy2, sx1:sx2]
    return out


def _jaw_kernel(cone: int = 21, tail: int = 12) -> np.ndarray:
    """A downward cone then a vertical bar: dilation with it grows the skin region over the jaw."""
    size = cone + tail
    kernel = np.zeros((size, size), dtype=np.uint8)
    centre = size // 2
    for row in range(cone // 2, cone):
        half = row - cone // 2
        kernel[row, centre - half : centre + half + 1] = 1
    base = int(kernel[cone - 1].sum())
    kernel[cone:, max(0, centre - base // 2) : min(size, centre + base // 2 + 1)] = 1
    return kernel


class FaceParser:
    """BiSeNet face parsing turned into blending masks: v1.5's "jaw" mode, or v1's "raw" one."""

    def __init__(
        self, net: BiSeNet | None, device: torch.device, *, mode: str = "jaw", cheek_width: int = CHEEK_WIDTH
    ) -> None:
        if mode not in MASK_MODES:
            raise ValueError(f"unknown mask mode {mode!r}; expected one of {MASK_MODES}")
        self.net = net
        self.device = device
        self.mode = mode
        self.kernel = _jaw_kernel()
        self.cheek_kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (35, 3))
        # The cheeks: columns [0, centre - width] and [centre + width, 512), both ends included as
        # in MuseTalk's filled cv2.rectangle.
        cheeks = np.zeros((PARSE_SIZE, PARSE_SIZE), dtype=np.uint8)
        centre = PARSE_SIZE // 2
        cheeks[:, : centre - cheek_width + 1] = 255
        cheeks[:, centre + cheek_width :] = 255
        self.cheeks = cheeks

    @torch.inference_mode()
    def labels(self, crops: list[np.ndarray]) -> np.ndarray:
        """Class per pixel at 512x512 for RGB crops: ``[N, 512, 512]``."""
        if self.net is None:
            raise RuntimeError("this FaceParser has no network")
        batch = np.stack([parse_input(c) for c in crops])
        x = torch.from_numpy(batch).to(self.device).permute(0, 3, 1, 2).float() / 255.0
        x = (x - _MEAN.to(self.device)) / _STD.to(self.device)
        classes: np.ndarray = self.net(x).argmax(1).cpu().numpy().astype(np.uint8)
        return classes

    def mask(self, labels: np.ndarray) -> np.ndarray:
        """The 0/255 mask of one 512x512 label map in this parser's mode."""
        if self.mode == "raw":
            return np.where(np.isin(labels, (SKIN, MOUTH, UPPER_LIP, LOWER_LIP)), 255, 0).astype(np.uint8)
        return self.jaw_mask(labels)

    def jaw_mask(self, labels: np.ndarray) -> np.ndarray:
        skin = np.where(labels == SKIN, 255, 0).astype(np.uint8)
        dilated = cv2.dilate(skin, self.kernel, iterations=1)
        eroded = cv2.erode(dilated, self.cheek_kernel, iterations=2)
        region = cv2.bitwise_or(cv2.bitwise_and(eroded, self.cheeks), cv2.bitwise_and(dilated, ~self.cheeks))
        keep = ((region == 255) & (labels != NOSE_CLASS)) | np.isin(labels, (MOUTH, UPPER_LIP, LOWER_LIP))
        return np.where(keep, 255, 0).astype(np.uint8)

    def masks(self, crops: list[np.ndarray]) -> list[np.ndarray]:
        """0/255 masks at each crop's own size."""
        out = []
        for crop, labels in zip(crops, self.labels(crops), strict=True):
            out.append(pil_like_resize(self.mask(labels), (crop.shape[1], crop.shape[0]), cv2.INTER_CUBIC))
        return out


def pil_like_resize(image: np.ndarray, size: tuple[int, int], enlarge: int) -> np.ndarray:
    """``image`` resized to ``size`` (w, h) the way MuseTalk's PIL resizes come out: PIL's filters
    average over every source pixel they cover when they shrink, for which ``INTER_AREA`` is cv2's
    nearest match; when enlarging, ``enlarge`` (the same filter as PIL's) is used."""
    shrink = size[0] < image.shape[1] or size[1] < image.shape[0]
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA if shrink else enlarge)


def parse_input(crop: np.ndarray) -> np.ndarray:
    """A crop resized to the parser's 512x512 (PIL's bilinear in MuseTalk)."""
    return pil_like_resize(crop, (PARSE_SIZE, PARSE_SIZE), cv2.INTER_LINEAR)


def geometric_mask(size: int, face: Box) -> np.ndarray:
    """The stand-in for parsing: an ellipse over the lower face, ``face`` given in crop coordinates."""
    x1, y1, x2, y2 = face
    mask = np.zeros((size, size), dtype=np.uint8)
    centre = ((x1 + x2) // 2, (y1 + y2) // 2)
    axes = (max(1, int((x2 - x1) * 0.45)), max(1, (y2 - y1) // 2))
    cv2.ellipse(mask, centre, axes, 0, 0, 360, 255, -1)
    return mask


def face_alpha(parsed: np.ndarray, box: Box, crop: Box) -> np.ndarray:
    """The blending weight over the face box (``[h, w]`` float32 in [0, 1]) from a mask of the crop:
    kept inside the face box and below the crop's middle, then blurred (kernel 10% of the crop)."""
    x1, y1, x2, y2 = box
    cx1, cy1, cx2, _ = crop
    size = cx2 - cx1
    fx1, fy1, fx2, fy2 = x1 - cx1, y1 - cy1, x2 - cx1, y2 - cy1
    mask = np.zeros((size, size), dtype=np.uint8)
    mask[max(fy1, 0) : fy2, max(fx1, 0) : fx2] = parsed[max(fy1, 0) : fy2, max(fx1, 0) : fx2]
    mask[: int(size * UPPER_BOUNDARY)] = 0
    k = int(0.1 * size // 2 * 2) + 1
    blurred = cv2.GaussianBlur(mask, (k, k), 0)
    return crop_padded(blurred, (fx1, fy1, fx2, fy2)).astype(np.float32) / 255.0
