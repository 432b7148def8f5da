"""Frames per second of the lite engine on one thread, for the shipped 512 x 512 avatar.

    python -m bench.lite_engine [--seconds 3]      (or python bench/lite_engine.py)

Prints one row per batch size: the renderer alone (talking frames, openness and shape varying),
and the renderer with the featurizer (what a worker spends per second of a session's speech).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # also runnable as a script
os.environ.setdefault("OMP_NUM_THREADS", "1")  # one core: before numpy and OpenCV start their pools
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import cv2
import numpy as np

from inference.avatars.store import DEFAULT_AVATAR_ID, AvatarStore
from inference.engine import FEATURE_SAMPLE_RATE, FEATURE_SAMPLES_PER_FRAME, FrameRequest
from inference.lite import LiteFeatures, LiteRenderer


def speech(seconds: float) -> np.ndarray:
    """Syllables of a buzzy voice: 140 Hz harmonics under a 4 Hz loudness envelope."""
    t = np.arange(int(seconds * FEATURE_SAMPLE_RATE)) / FEATURE_SAMPLE_RATE
    voice = sum(np.sin(2 * np.pi * 140 * k * t) / k for k in range(1, 16))
    envelope = np.clip(np.sin(2 * np.pi * 4 * t), 0, None)
    return (0.25 * voice / np.abs(voice).max() * envelope).astype(np.float32)


def run(batch: int, seconds: float, renderer: LiteRenderer, avatar: object, with_audio: bool) -> float:
    rng = np.random.default_rng(0)
    feats = [
        LiteFeatures(float(o), float(w), -20.0)
        for o, w in zip(rng.uniform(0.1, 1.0, 64), rng.uniform(-1, 1, 64), strict=False)
    ]
    pcm = speech(2.0)
    frames = 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        if with_audio:
            featurizer = renderer.new_featurizer()
            featurizer.push(pcm[: batch * FEATURE_SAMPLES_PER_FRAME + FEATURE_SAMPLES_PER_FRAME])
            batch_feats = featurizer.take(batch)
        else:
            batch_feats = [feats[(frames + k) % len(feats)] for k in range(batch)]
        requests = [FrameRequest(avatar, frames + k, f) for k, f in enumerate(batch_feats)]  # type: ignore[arg-type]
        renderer.render(requests)
        frames += batch
    return frames / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=3.0, help="time per measurement")
    args = parser.parse_args()
    cv2.setNumThreads(1)
    renderer = LiteRenderer()
    with tempfile.TemporaryDirectory() as tmp:
        store = AvatarStore(Path(tmp), renderer)
        store.ensure_default()
        avatar = store.get(DEFAULT_AVATAR_ID)
        assert avatar is not None
        print(
            f"lite engine, {avatar.info.width}x{avatar.info.height} avatar, one thread (cv2.setNumThreads(1))"
        )
        print(f"{'batch':>5}  {'render fps':>10}  {'+featurizer fps':>15}  {'ms/frame':>8}")
        for batch in (1, 8):
            render_fps = run(batch, args.seconds, renderer, avatar, with_audio=False)
            total_fps = run(batch, args.seconds, renderer, avatar, with_audio=True)
            print(f"{batch:>5}  {render_fps:>10.0f}  {total_fps:>15.0f}  {1000 / render_fps:>8.3f}")


if __name__ == "__main__":
    main()
