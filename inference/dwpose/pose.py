"""Whole-body keypoints with DWPose (RTMPose-l, 133 COCO-WholeBody points), as mmpose's top-down
inference computes them for MuseTalk:

1. the person box (MuseTalk passes none, so mmpose takes the whole frame) is padded by 1.25 and
   widened or heightened to the input's 3:4 aspect (``GetBBoxCenterScale``, ``TopdownAffine``);
2. that box is warped to 288 x 384 (bilinear), the RGB crop normalised with ImageNet's mean and std;
3. the network runs on the crop and on its mirror image (``flip_test=True`` in the config); the
   mirror's SimCC vectors are flipped back, left and right points swapped, and the two averaged;
4. each keypoint is the argmax of its x and y vectors divided by the split ratio (2 bins a pixel),
   its score the smaller of the two maxima, mapped back through the box to frame pixels.

The checkpoint (``models/dwpose/dw-ll_ucoco_384.pth`` in MuseTalk's download) is a mmengine file
whose ``state_dict`` is loaded strictly: a key missing or left over is an error naming it. Only the
batch norms' ``num_batches_tracked`` counters (a training statistic) may be absent.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch

from inference.dwpose.network import DWPOSE_L, RTMPose, RTMPoseConfig

WEIGHTS = Path("dwpose") / "dw-ll_ucoco_384.pth"
"""Where MuseTalk's download keeps DWPose, relative to the models folder."""

FACE = slice(23, 91)
"""The 68 face landmarks among the 133 COCO-WholeBody keypoints (dlib's 68-point order)."""

PADDING = 1.25
MEAN = np.array([123.675, 116.28, 103.53], np.float32)  # RGB
STD = np.array([58.395, 57.12, 57.375], np.float32)


class CheckpointError(ValueError):
    """A DWPose checkpoint that does not fit the network (unreadable, or keys that do not match)."""


def _face_mirror() -> list[int]:
    """Mirror partners of dlib's 68 face points (0-based within the face)."""
    pairs = [(i, 16 - i) for i in range(8)]  # jaw
    pairs += [(17 + i, 26 - i) for i in range(5)]  # brows
    pairs += [(31, 35), (32, 34)]  # nostrils
    pairs += [(36, 45), (37, 44), (38, 43), (39, 42), (40, 47), (41, 46)]  # eyes
    pairs += [(48, 54), (49, 53), (50, 52), (55, 59), (56, 58), (60, 64), (61, 63), (65, 67)]  # lips
    mirror = list(range(68))
    for a, b in pairs:
        mirror[a], mirror[b] = b, a
    return mirror


def flip_indices() -> list[int]:
    """For each COCO-WholeBody keypoint, its left-right partner (itself on the midline)."""
    body = [0] + [i + 1 if i % 2 else i - 1 for i in range(1, 17)]
    feet = [20, 21, 22, 17, 18, 19]
    face = [23 + i for i in _face_mirror()]
    hands = [112 + i for i in range(21)] + [91 + i for i in range(21)]
    return body + feet + face + hands


@dataclass(frozen=True)
class CropBox:
    """The region of the frame warped to the network input: centre and size (w, h) in pixels."""

    center: np.ndarray
    size: np.ndarray

    @classmethod
    def around(cls, box: tuple[float, float, float, float], input_size: tuple[int, int]) -> CropBox:
        """From a person box (x1, y1, x2, y2): padded, then grown to the input's aspect ratio."""
        x1, y1, x2, y2 = box
        center = np.array([(x1 + x2) / 2, (y1 + y2) / 2], np.float32)
        w, h = (x2 - x1) * PADDING, (y2 - y1) * PADDING
        aspect = input_size[0] / input_size[1]
        if w > h * aspect:
            h = w / aspect
        else:
            w = h * aspect
        return cls(center, np.array([w, h], np.float32))

    def to_input(self, input_size: tuple[int, int]) -> np.ndarray:
        """The 2 x 3 affine matrix from frame pixels to input pixels."""
        scale = input_size[0] / float(self.size[0])
        tx = input_size[0] / 2 - scale * float(self.center[0])
        ty = input_size[1] / 2 - scale * float(self.center[1])
        return np.array([[scale, 0.0, tx], [0.0, scale, ty]], np.float64)

    def to_frame(self, points: np.ndarray, input_size: tuple[int, int]) -> np.ndarray:
        """Input pixels -> frame pixels (mmpose's ``keypoints / input_size * scale + center - scale / 2``)."""
        size = np.asarray(input_size, np.float32)
        frame: np.ndarray = points / size * self.size + self.center - 0.5 * self.size
        return frame


def decode_simcc(simcc_x: np.ndarray, simcc_y: np.ndarray, split_ratio: float) -> tuple[np.ndarray, np.ndarray]:
    """``[K, Wx]`` and ``[K, Wy]`` SimCC vectors -> ``[K, 2]`` locations in input pixels and ``[K]``
    scores (the smaller of the two peaks); a keypoint whose score is not positive is at (-1, -1)."""
    locs = np.stack([np.argmax(simcc_x, axis=1), np.argmax(simcc_y, axis=1)], axis=-1).astype(np.float32)
    scores = np.minimum(np.max(simcc_x, axis=1), np.max(simcc_y, axis=1))
    locs[scores <= 0] = -1
    return locs / split_ratio, scores


@dataclass(frozen=True)
class Keypoints:
    """133 keypoints of one person in frame pixels, with their scores."""

    points: np.ndarray  # [133, 2] float32, x and y
    scores: np.ndarray  # [133] float32

    @property
    def face(self) -> np.ndarray:
        return self.points[FACE]

    @property
    def face_scores(self) -> np.ndarray:
        return self.scores[FACE]


def load_rtmpose(path: str | Path, config: RTMPoseConfig = DWPOSE_L) -> RTMPose:
    """The network with the checkpoint's weights, loaded strictly by their key names."""
    path = Path(path)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for a file it cannot read safely
        raise CheckpointError(f"cannot read the DWPose checkpoint {path}: {exc}") from exc
    state = checkpoint.get("state_dict") if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} is not a mmpose checkpoint: it has no 'state_dict'")
    model = RTMPose(config)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    wrong = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or wrong:
        parts = [
            f"{label} {len(keys)}: {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}"
            for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
            if keys
        ]
        raise CheckpointError(f"{path} does not fit RTMPose {config}: " + "; ".join(parts))
    model.load_state_dict({**expected, **state}, strict=True)
    return model.eval().requires_grad_(False)


class WholeBodyPose:
    """DWPose on a frame: ``pose(rgb)`` -> ``Keypoints``. One person, the one inside ``box`` (by
    default the whole frame, as in MuseTalk)."""

    def __init__(self, model: RTMPose, device: str | torch.device = "cpu", *, flip_test: bool = True) -> None:
        self.model = model.to(device)
        self.device = torch.device(device)
        self.config = model.config
        self.flip_test = flip_test
        self.flips = torch.as_tensor(flip_indices(), device=self.device)
        if model.config.keypoints != len(flip_indices()) and flip_test:
            raise ValueError(f"flip test needs the 133 COCO-WholeBody keypoints, not {model.config.keypoints}")

    @classmethod
    def from_file(
        cls, path: str | Path, device: str | torch.device = "cpu", config: RTMPoseConfig = DWPOSE_L
    ) -> WholeBodyPose:
        return cls(load_rtmpose(path, config), device)

    def input_image(self, rgb: np.ndarray, crop: CropBox) -> torch.Tensor:
        """The normalised ``[1, 3, H, W]`` network input for ``crop`` of an RGB frame."""
        size = self.config.input_size
        warped = cv2.warpAffine(rgb, crop.to_input(size), size, flags=cv2.INTER_LINEAR)
        image = (warped.astype(np.float32) - MEAN) / STD
        return torch.from_numpy(image).permute(2, 0, 1)[None].to(self.device)

    @torch.inference_mode()
    def simcc(self, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """SimCC x and y vectors of ``[B, 3, H, W]`` inputs, averaged with their mirror images' if
        flip-testing (both passes in one batch)."""
        n = len(images)
        batch = torch.cat([images, images.flip(-1)]) if self.flip_test else images
        pred_x, pred_y = self.model(batch.float())
        if self.flip_test:
            pred_x = (pred_x[:n] + pred_x[n:, self.flips].flip(-1)) * 0.5
            pred_y = (pred_y[:n] + pred_y[n:, self.flips]) * 0.5
        return pred_x.cpu().numpy(), pred_y.cpu().numpy()

    def __call__(self, rgb: np.ndarray, box: tuple[float, float, float, float] | None = None) -> Keypoints:
        return self.many([rgb], [box])[0]

    def many(
        self,
        frames: list[np.ndarray],
        boxes: list[tuple[float, float, float, float] | None] | None = None,
        batch: int = 8,
    ) -> list[Keypoints]:
        """Keypoints of each frame (in the person box given for it, by default the whole frame),
        ``batch`` frames a pass."""
        size = self.config.input_size
        crops = []
        for rgb, box in zip(frames, boxes or [None] * len(frames), strict=True):
            h, w = rgb.shape[:2]
            crops.append(CropBox.around(box or (0.0, 0.0, float(w), float(h)), size))
        out: list[Keypoints] = []
        for start in range(0, len(frames), batch):
            chunk = range(start, min(start + batch, len(frames)))
            images = torch.cat([self.input_image(frames[i], crops[i]) for i in chunk])
            simcc_x, simcc_y = self.simcc(images)
            for k, i in enumerate(chunk):
                locs, scores = decode_simcc(simcc_x[k], simcc_y[k], self.config.split_ratio)
                out.append(Keypoints(crops[i].to_frame(locs, size).astype(np.float32), scores.astype(np.float32)))
        return out
