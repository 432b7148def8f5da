"""Audio re-timed to video: each video frame paired with the audio of its own frame interval.

Decoded audio and video come in separately (fMP4 interleaving, or two WebRTC tracks with their
own jitter); both carry times on the session clock. ``AvAligner`` places audio samples on that
clock and releases a frame once the audio of ``[pts, pts + 1/fps)`` is there, so whoever plays the
pairs in order keeps sound and picture within one frame. Pure and synchronous: no loop, no I/O.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

from stream_server.sdk.media import AUDIO_RATE, AudioChunk, MediaItem, VideoFrame

SPEECH_LEVEL = 300.0
"""RMS (of 32767) above which a frame's audio counts as speech (about -40 dBFS)."""


@dataclass(frozen=True)
class SyncedFrame:
    image: np.ndarray
    audio: np.ndarray
    """Mono int16 at ``AUDIO_RATE``, exactly one frame interval long."""
    pts_s: float
    speaking: bool


class AvAligner:
    def __init__(self, fps: int = 25, *, max_wait_frames: int = 12, speech_level: float = SPEECH_LEVEL) -> None:
        self.fps = fps
        self.samples_per_frame = AUDIO_RATE // fps
        self.max_wait_frames = max_wait_frames
        self.speech_level = speech_level
        self._video: deque[VideoFrame] = deque()
        self._audio = np.zeros(0, dtype=np.int16)
        self._audio_start: int | None = None  # sample index (on the session clock) of _audio[0]
        self.audio_missing_frames = 0

    def add(self, item: MediaItem) -> list[SyncedFrame]:
        if isinstance(item, VideoFrame):
            self._video.append(item)
        else:
            self._place(item)
        return self._release()

    def reset(self) -> None:
        """A new stream (its clock starts again at 0)."""
        self._video.clear()
        self._audio = np.zeros(0, dtype=np.int16)
        self._audio_start = None

    def _place(self, chunk: AudioChunk) -> None:
        start = round(chunk.pts_s * AUDIO_RATE)
        samples = chunk.samples
        if self._audio_start is None:
            self._audio_start = start
        offset = start - self._audio_start
        if offset < 0:  # before what is kept: only its tail matters
            samples = samples[-offset:]
            offset = 0
        end = offset + len(samples)
        if end > len(self._audio):
            self._audio = np.concatenate([self._audio, np.zeros(end - len(self._audio), dtype=np.int16)])
        self._audio[offset:end] = samples

    def _window(self, pts_s: float) -> np.ndarray | None:
        """The frame's audio, or ``None`` while it has not all arrived."""
        n = self.samples_per_frame
        first = round(pts_s * AUDIO_RATE)
        if self._audio_start is None:
            return None
        offset = first - self._audio_start
        if offset + n > len(self._audio):
            return None
        window = np.zeros(n, dtype=np.int16)
        lo = max(offset, 0)
        window[lo - offset :] = self._audio[lo : offset + n]
        return window

    def _release(self) -> list[SyncedFrame]:
        out = []
        while self._video:
            frame = self._video[0]
            audio = self._window(frame.pts_s)
            if audio is None:
                if len(self._video) <= self.max_wait_frames:
                    break
                audio = np.zeros(self.samples_per_frame, dtype=np.int16)  # the audio is late: show it silent
                self.audio_missing_frames += 1
            self._video.popleft()
            level = float(np.sqrt(np.mean(audio.astype(np.float64) ** 2)))
            out.append(SyncedFrame(frame.image, audio, frame.pts_s, level > self.speech_level))
        self._trim()
        return out

    def _trim(self) -> None:
        if self._audio_start is None:
            return
        keep_from = round(self._video[0].pts_s * AUDIO_RATE) if self._video else None
        if keep_from is None:
            keep_from = self._audio_start + max(len(self._audio) - self.samples_per_frame * self.max_wait_frames, 0)
        drop = min(max(keep_from - self._audio_start, 0), len(self._audio))
        if drop:
            self._audio = self._audio[drop:]
            self._audio_start += drop
