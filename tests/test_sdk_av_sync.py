"""AvAligner: each frame gets exactly the audio of its own 40 ms, however the two streams arrive."""

from __future__ import annotations

import numpy as np

from stream_server.sdk.av_sync import AvAligner
from stream_server.sdk.media import AUDIO_RATE, AudioChunk, VideoFrame

IMAGE = np.zeros((4, 4, 3), dtype=np.uint8)


def ramp(seconds: float) -> np.ndarray:
    """Sample i holds i % 30000, so any window shows where on the clock it came from."""
    return (np.arange(int(AUDIO_RATE * seconds)) % 30_000).astype(np.int16)


def aac_like_chunks(samples: np.ndarray, size: int = 1024) -> list[AudioChunk]:
    return [AudioChunk(samples[i : i + size], AUDIO_RATE, i / AUDIO_RATE) for i in range(0, len(samples), size)]


def test_frames_wait_for_their_audio_and_get_exactly_it() -> None:
    aligner = AvAligner()
    audio = ramp(1.0)
    released = []
    for i in range(25):  # all video first, as over WebRTC when audio lags
        released += aligner.add(VideoFrame(IMAGE, i * 0.04))
    # Only as many frames wait as the aligner allows; older ones go out silent rather than stall.
    assert len(released) == 25 - aligner.max_wait_frames == aligner.audio_missing_frames
    for chunk in aac_like_chunks(audio):
        released += aligner.add(chunk)
    assert [f.pts_s for f in released] == [i * 0.04 for i in range(25)]
    for i, frame in enumerate(released):
        if i >= 25 - aligner.max_wait_frames:
            assert np.array_equal(frame.audio, audio[i * 1920 : (i + 1) * 1920])


def test_late_audio_is_not_waited_for_forever() -> None:
    aligner = AvAligner(max_wait_frames=3)
    released = []
    for i in range(10):
        released += aligner.add(VideoFrame(IMAGE, i * 0.04))
    assert len(released) == 7 and all(not f.speaking and not f.audio.any() for f in released)
    assert aligner.audio_missing_frames == 7


def test_speech_and_silence_are_told_apart_per_frame() -> None:
    aligner = AvAligner()
    loud = (np.sign(np.sin(np.arange(AUDIO_RATE // 5) / 10)) * 8000).astype(np.int16)  # 0.2 s of speech
    samples = np.concatenate([np.zeros(AUDIO_RATE // 5, dtype=np.int16), loud])
    released = []
    for chunk in aac_like_chunks(samples):
        released += aligner.add(chunk)
    for i in range(10):
        released += aligner.add(VideoFrame(IMAGE, i * 0.04))
    assert [f.speaking for f in released] == [False] * 5 + [True] * 5
