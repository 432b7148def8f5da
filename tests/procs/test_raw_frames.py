"""Raw frames out of a worker process (``open_stream(encode=None)``, what the GPU benchmark reads):
pixels through the stream's shared-memory ring, no array pickled, the ring gone with the stream."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
from PIL import Image

from inference.engine import FEATURE_SAMPLE_RATE, OUTPUT_SAMPLE_RATE
from inference.pool import EngineConfig
from inference.procs.process_pool import RING_PREFIX, ProcessEnginePool
from inference.stream import StreamMode, StreamState

ASTRONAUT = Path(__file__).resolve().parents[2] / "inference" / "assets" / "astronaut.png"


def rings() -> set[str]:
    return {n for n in os.listdir("/dev/shm") if n.startswith(f"{RING_PREFIX}_{os.getpid()}_")}


def test_raw_frames_come_through_a_ring_that_goes_with_the_stream(tmp_path: Path) -> None:
    pool = ProcessEnginePool(EngineConfig(kind="lite", workers=1, data_dir=tmp_path))
    try:
        pool.avatars.prepare("astro", "Astro", ASTRONAUT, face_box=(174.0, 66.0, 98.0, 98.0))
        avatar = pool.avatars.get("astro")
        assert avatar is not None
        stream = pool.open_stream(avatar, StreamMode.CLIP)
        assert len(rings()) == 1
        t = np.arange(FEATURE_SAMPLE_RATE) / FEATURE_SAMPLE_RATE
        voice = (0.4 * np.sign(np.sin(2 * np.pi * 140 * t))).astype(np.float32)
        stream.feed(voice, np.repeat(voice, OUTPUT_SAMPLE_RATE // FEATURE_SAMPLE_RATE))
        stream.end_audio()
        frames = []
        deadline = time.monotonic() + 60
        while not stream.closed and time.monotonic() < deadline:
            frames += stream.take_frames()
            time.sleep(0.01)
        assert stream.state is StreamState.FINISHED, stream.error
        assert [f.index for f in frames] == list(range(25))
        original = np.asarray(Image.open(ASTRONAUT).convert("RGB"))
        assert all(f.image.shape == original.shape and f.audio.shape == (1920,) for f in frames)
        # the picture is the avatar's (all but the mouth), not a blank or a stale slot
        assert np.abs(frames[-1].image.astype(np.int16) - original).mean() < 10
        assert rings() == set(), "the ring is unlinked once the stream has ended"
    finally:
        pool.stop()
