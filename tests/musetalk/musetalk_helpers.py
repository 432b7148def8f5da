"""Synthetic inputs for the MuseTalk tests."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

FACE_BOX = (40, 30, 140, 150)


def fixed_detector(frame: np.ndarray) -> tuple[int, int, int, int] | None:
    """A stand-in for the Haar detector: synthetic faces sit at a known place."""
    return FACE_BOX


def face_image(seed: int, size: tuple[int, int] = (180, 200)) -> np.ndarray:
    """A synthetic RGB "face": a skin-coloured ellipse with eyes and a mouth on a noisy background."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 255, (*size, 3), dtype=np.uint8)
    colour = tuple(int(c) for c in rng.integers(60, 240, 3))
    cv2.ellipse(image, (90, 90), (48, 62), 0, 0, 360, colour, -1)
    cv2.circle(image, (72, 75), 6, (20, 20, 20), -1)
    cv2.circle(image, (108, 75), 6, (20, 20, 20), -1)
    cv2.ellipse(image, (90, 125), (18, 6), 0, 0, 360, (150, 30, 40), -1)
    return image


def write_image(path: Path, rgb: np.ndarray) -> Path:
    cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    return path


def write_video(path: Path, frames: list[np.ndarray], fps: int = 25) -> Path:
    h, w = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
    for frame in frames:
        writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    writer.release()
    return path


def speech_like(seconds: float, seed: int = 0) -> np.ndarray:
    """A voiced, amplitude-modulated signal with a little noise, 16 kHz float32."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(16000 * seconds)) / 16000
    base = 0.3 * np.sin(2 * np.pi * (140 + 20 * seed) * t) * (1 + np.sin(2 * np.pi * 3 * t))
    return (base + 0.05 * rng.standard_normal(len(t))).astype(np.float32)
