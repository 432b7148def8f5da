"""Face detection for avatar preparation, shared by every engine: OpenCV's Haar cascades.

``FaceDetector`` runs the frontal face cascades shipped inside the OpenCV 4.x wheels
(``cv2.data.haarcascades``): ``haarcascade_frontalface_default.xml`` first and, when it finds
nothing, ``haarcascade_frontalface_alt2.xml``. Of the boxes found it keeps the confident ones (at
least half the neighbours of the best) and picks the largest, or with a hint (the face of a
neighbouring video frame) the one nearest to it.

OpenCV 5 moved ``CascadeClassifier`` out of the main module and no longer ships the cascade files:
``FaceDetectorUnavailable`` then says to install ``opencv-python-headless<5`` (the project pins
a 4.x version).
"""

from __future__ import annotations

import threading
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Protocol

import cv2
import numpy as np

FACE_CASCADES = ("haarcascade_frontalface_default.xml", "haarcascade_frontalface_alt2.xml")
INSTALL_HINT = "install opencv-python-headless<5 (the version this project pins)"

FaceBox = tuple[float, float, float, float]
"""A face box: x, y, width, height in pixels."""


@dataclass(frozen=True)
class FaceReport:
    """How faces were found over an avatar's frames, for the avatar's metadata and its job.

    ``no_face``: frames where no face was found; they keep their place (frames, latents and
    geometry stay index for index) and take a neighbouring frame's box, or are shown unchanged.
    ``fallback``: frames whose face box (or, for the lite engine, mouth) came from a fallback rather
    than the engine's main method. ``method``: the main method (``"landmarks"`` for DWPose,
    ``"features"`` for the offline estimate, ``"proportions"`` for the Haar box, ``"given"``).
    """

    frames: int
    no_face: int
    fallback: int
    method: str

    def to_json(self) -> dict[str, int | str]:
        return asdict(self)


class FaceDetectorUnavailable(RuntimeError):
    """This OpenCV cannot detect faces (no ``cv2.CascadeClassifier`` or no cascade files)."""


class FaceFinder(Protocol):
    """What avatar preparation needs of a face detector (tests give stand-ins)."""

    def detect(self, gray: np.ndarray, near: FaceBox | None = None) -> FaceBox | None: ...


def cascade_file(name: str) -> Path:
    """The path of one of the cascade files shipped with OpenCV (``cv2.data.haarcascades``)."""
    if not hasattr(cv2, "CascadeClassifier"):
        raise FaceDetectorUnavailable(
            f"OpenCV {cv2.__version__} has no cv2.CascadeClassifier (OpenCV 5 moved it out of the "
            f"main module), which avatar preparation needs for face detection: {INSTALL_HINT}"
        )
    folder = getattr(getattr(cv2, "data", None), "haarcascades", None)
    path = Path(folder) / name if folder else None
    if path is None or not path.is_file():
        raise FaceDetectorUnavailable(
            f"OpenCV {cv2.__version__} does not ship the Haar cascade {name} in cv2.data.haarcascades: {INSTALL_HINT}"
        )
    return path


class FaceDetector:
    """Finds the main face of a grayscale image. Safe to share between threads (one detection
    at a time: they run only while avatars are prepared)."""

    def __init__(
        self,
        cascades: tuple[str, ...] = FACE_CASCADES,
        *,
        scale_factor: float = 1.1,
        min_neighbors: int = 3,
        min_face: float = 1 / 12,
    ) -> None:
        self.scale_factor = scale_factor
        self.min_neighbors = min_neighbors
        self.min_face = min_face  # smallest face searched, as a fraction of the image's short side
        self._lock = threading.Lock()
        self._classifiers = []
        for name in cascades:
            path = cascade_file(name)
            classifier = cv2.CascadeClassifier(str(path))
            if classifier.empty():
                raise FaceDetectorUnavailable(f"OpenCV could not load the Haar cascade {path}")
            self._classifiers.append(classifier)

    def detect_all(self, gray: np.ndarray, min_size: int, max_size: int = 0) -> np.ndarray:
        """Faces found by the first cascade that finds any: rows of x, y, w, h, neighbours."""
        for classifier in self._classifiers:
            with self._lock:
                boxes, counts = classifier.detectMultiScale2(
                    gray,
                    scaleFactor=self.scale_factor,
                    minNeighbors=self.min_neighbors,
                    minSize=(min_size, min_size),
                    maxSize=(max_size, max_size) if max_size else (0, 0),
                )
            if len(boxes):
                rows = np.asarray(boxes, np.int64).reshape(-1, 4)
                return np.concatenate([rows, np.asarray(counts, np.int64).reshape(-1, 1)], axis=1)
        return np.zeros((0, 5), np.int64)

    def detect(self, gray: np.ndarray, near: FaceBox | None = None) -> FaceBox | None:
        """The main face (x, y, w, h) of a grayscale image, or ``None``.

        With ``near`` (the face found in a neighbouring video frame) only a window around it and
        sizes close to it are searched, which is faster and keeps to the same face; if nothing is
        found there the whole image is searched.
        """
        h, w = gray.shape[:2]
        if near is not None:
            x, y, bw, bh = near
            pad = bw * 0.6
            x0, y0 = max(0, int(x - pad)), max(0, int(y - pad))
            x1, y1 = min(w, int(x + bw + pad)), min(h, int(y + bh + pad))
            if x1 - x0 >= 24 and y1 - y0 >= 24:
                rows = self.detect_all(gray[y0:y1, x0:x1], int(bw * 0.75), int(bw * 1.35) + 1)
                if len(rows):
                    best = pick(rows, (x + bw / 2 - x0, y + bh / 2 - y0))
                    return (
                        float(best[0] + x0),
                        float(best[1] + y0),
                        float(best[2]),
                        float(best[3]),
                    )
        rows = self.detect_all(gray, max(24, int(min(h, w) * self.min_face)))
        if not len(rows):
            return None
        best = pick(rows, None)
        return (float(best[0]), float(best[1]), float(best[2]), float(best[3]))

    def detect_rgb(self, rgb: np.ndarray, near: FaceBox | None = None) -> FaceBox | None:
        """``detect`` on an RGB frame (made gray and histogram-equalised first)."""
        return self.detect(cv2.equalizeHist(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)), near)


@lru_cache(maxsize=1)
def default_detector() -> FaceDetector:
    """One ``FaceDetector`` with the default settings, made on first use and then shared."""
    return FaceDetector()


def pick(rows: np.ndarray, centre: tuple[float, float] | None) -> np.ndarray:
    """Of rows (x, y, w, h, neighbours), the confident ones (at least half the neighbours of the
    best: a weak hit is usually a false one), then the largest, or with ``centre`` the nearest."""
    confident = rows[rows[:, 4] * 2 >= rows[:, 4].max()]
    if centre is None:
        best = int(np.argmax(confident[:, 2] * confident[:, 3]))
    else:
        cx = confident[:, 0] + confident[:, 2] / 2 - centre[0]
        cy = confident[:, 1] + confident[:, 3] / 2 - centre[1]
        best = int(np.argmin(np.hypot(cx, cy)))
    row: np.ndarray = confident[best]
    return row
