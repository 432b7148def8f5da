"""Decoded media on the session clock: RGB video frames and PCM audio chunks.

``Fmp4Decoder`` turns the fragmented MP4 of an MSE stream into frames as the segments arrive: the
bytes go into a blocking reader that a PyAV demuxer pulls from on its own thread, so the event
loop never decodes. Every request's timeline starts at 0 s: ``pts_s`` is the time on that clock.
"""

from __future__ import annotations

import asyncio
import io
import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import av
import numpy as np
from av.audio.resampler import AudioResampler

log = logging.getLogger(__name__)

AUDIO_RATE = 48_000
"""Every ``AudioChunk`` the SDK delivers is mono s16 at this rate (what the server sends)."""


@dataclass(frozen=True)
class VideoFrame:
    """One video frame: ``image`` is ``(height, width, 3)`` uint8 RGB."""

    image: np.ndarray
    pts_s: float

    @property
    def width(self) -> int:
        return int(self.image.shape[1])

    @property
    def height(self) -> int:
        return int(self.image.shape[0])


@dataclass(frozen=True)
class AudioChunk:
    """Mono signed 16-bit PCM at ``sample_rate`` starting at ``pts_s``."""

    samples: np.ndarray
    sample_rate: int
    pts_s: float

    @property
    def duration_s(self) -> float:
        return len(self.samples) / self.sample_rate


MediaItem = VideoFrame | AudioChunk


class AudioNormaliser:
    """Any decoded ``av.AudioFrame`` to mono s16 at ``AUDIO_RATE``, keeping its start time."""

    def __init__(self) -> None:
        self._resampler = AudioResampler(format="s16", layout="mono", rate=AUDIO_RATE)
        self._next_pts: float | None = None

    def convert(self, frame: av.AudioFrame) -> list[AudioChunk]:
        start = float(frame.time) if frame.time is not None else (self._next_pts or 0.0)
        if self._next_pts is None or abs(start - self._next_pts) > 0.05:
            self._next_pts = start
        chunks = []
        for out in self._resampler.resample(frame):
            samples = out.to_ndarray().reshape(-1).astype(np.int16, copy=False)
            chunks.append(AudioChunk(samples, AUDIO_RATE, self._next_pts))
            self._next_pts += len(samples) / AUDIO_RATE
        return chunks


class _ByteFeed(io.RawIOBase):
    """A file the demuxer thread reads from, blocking until the event loop feeds more bytes."""

    def __init__(self) -> None:
        super().__init__()
        self._chunks: deque[memoryview] = deque()
        self._cond = threading.Condition()
        self._eof = False

    def feed(self, data: bytes) -> None:
        with self._cond:
            self._chunks.append(memoryview(data))
            self._cond.notify()

    def finish(self) -> None:
        with self._cond:
            self._eof = True
            self._cond.notify()

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        with self._cond:
            while not self._chunks and not self._eof:
                self._cond.wait()
            if not self._chunks:
                return 0
            head = self._chunks[0]
            n = min(len(buffer), len(head))
            buffer[:n] = head[:n]
            if n == len(head):
                self._chunks.popleft()
            else:
                self._chunks[0] = head[n:]
            return n


class Fmp4Decoder:
    """Feed fMP4 bytes in order with ``feed``; decoded items go to ``emit`` on the event loop.

    ``emit`` is called from the loop (through ``call_soon_threadsafe``) in decode order. At most
    ``max_pending`` decoded items wait for the loop; beyond that the decoder thread pauses.
    """

    def __init__(self, emit: Callable[[MediaItem], None], *, max_pending: int = 50) -> None:
        self._emit = emit
        self._loop = asyncio.get_running_loop()
        self._feed = _ByteFeed()
        self._room = threading.Semaphore(max_pending)
        self._stopped = threading.Event()
        self.error: Exception | None = None
        self._thread = threading.Thread(target=self._run, name="fmp4-decoder", daemon=True)
        self._thread.start()

    def feed(self, data: bytes) -> None:
        self._feed.feed(data)

    async def finish(self) -> None:
        """No more bytes: wait until everything fed has been decoded and emitted."""
        self._feed.finish()
        await asyncio.to_thread(self._thread.join)
        # Items scheduled by the thread before it ended run before this callback.
        done = self._loop.create_future()
        self._loop.call_soon(done.set_result, None)
        await done

    def abort(self) -> None:
        """Drop whatever is not decoded yet; the thread ends soon after."""
        self._stopped.set()
        self._feed.finish()
        self._room.release(1 << 20)

    def _deliver(self, item: MediaItem) -> None:
        self._room.release()
        if not self._stopped.is_set():
            self._emit(item)

    def _post(self, item: MediaItem) -> bool:
        self._room.acquire()
        if self._stopped.is_set():
            return False
        self._loop.call_soon_threadsafe(self._deliver, item)
        return True

    def _run(self) -> None:
        try:
            with av.open(self._feed, mode="r", format="mp4") as container:
                audio = AudioNormaliser()
                for packet in container.demux():
                    if self._stopped.is_set():
                        return
                    for frame in packet.decode():
                        if isinstance(frame, av.VideoFrame):
                            items: list[MediaItem] = [
                                VideoFrame(frame.to_ndarray(format="rgb24"), float(frame.time or 0.0))
                            ]
                        elif isinstance(frame, av.AudioFrame):
                            items = list(audio.convert(frame))
                        else:
                            continue
                        for item in items:
                            if not self._post(item):
                                return
        except Exception as exc:  # a corrupt stream: the request reports it, the loop keeps going
            if not self._stopped.is_set():
                log.warning("fMP4 decoding failed: %r", exc)
                self.error = exc
