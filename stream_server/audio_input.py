"""A request's audio: kept as received while the request waits, decoded once it is granted.

A waiting request holds no decoded audio. Each chunk is checked on arrival (a container's first
bytes must match the declared format) and kept as received in a ``Spool``: in memory up to
``limits.audio_spool_bytes``, in a temporary file beyond, counted against the node's
``UploadBudget``. Each clip or utterance is validated when it ends: decoded in a worker thread
and dropped, which finds undecodable audio before the grant and counts its seconds. When the slot
is granted (``grant``) what was kept is decoded for the engine. From then on live raw PCM is
decoded chunk by chunk and other formats utterance by utterance.

``max_audio_seconds`` and ``max_audio_bytes`` hold for the whole request, across all the
utterances of a live session.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import re
from collections.abc import AsyncIterator

import numpy as np

from inference.audio import AudioError, DecodedAudio, PcmStreamDecoder, decode_audio
from inference.engine import FEATURE_SAMPLES_PER_FRAME
from stream_server import audio_sniff
from stream_server.protocol import AudioSpec, ErrorCode, ProtocolError
from stream_server.spool import Spool
from stream_server.upload_budget import UploadBudget

Pcm = tuple[np.ndarray, np.ndarray]
_ERRNO = re.compile(r"\[Errno -?\d+\] |: '<none>'")


def _in_words(message: str) -> str:
    """FFmpeg's errors carry a number and a file name that mean nothing to the client."""
    return _ERRNO.sub("", message)


def _protocol_error(exc: AudioError) -> ProtocolError:
    code = ErrorCode.AUDIO_TOO_LONG if exc.code == "audio_too_long" else ErrorCode.BAD_AUDIO
    return ProtocolError(code, _in_words(exc.message))


class AudioInput:
    def __init__(
        self,
        spec: AudioSpec,
        *,
        live: bool,
        max_seconds: float,
        max_bytes: int,
        budget: UploadBudget,
        spool_bytes: int,
    ) -> None:
        self.spec = spec
        self.live = live
        self.max_seconds = max_seconds
        self.max_bytes = max_bytes
        self.total_bytes = 0
        self.seconds = 0.0
        """Seconds of audio in the utterances (or the clip) completed so far."""
        self.frames: int | None = None
        """Clip mode: video frames the clip's audio makes, once it is complete and valid."""
        self.complete = False
        """Clip mode: ``audio_end`` has come; further audio is refused."""
        self._rate = spec.sample_rate or 16_000
        self._channels = spec.channels or 1
        if spec.format == "pcm_s16le":
            try:
                PcmStreamDecoder(self._rate, self._channels)
            except AudioError as exc:
                raise _protocol_error(exc) from None
        self._digest = hashlib.sha256()
        self._lock = asyncio.Lock()
        self._spool = Spool(spool_bytes)
        self._claim = budget.claim()
        self._ends: list[int] = []
        """Spool offsets where the kept (completed, validated) utterances end."""
        self._head = b""
        self._head_checked = False
        self._granted = False
        self._closed = False
        self._pcm: PcmStreamDecoder | None = None

    @property
    def digest(self) -> str:
        return self._digest.hexdigest()

    @property
    def raw_pcm(self) -> bool:
        return self.spec.format == "pcm_s16le"

    @property
    def kept_bytes(self) -> int:
        return self._spool.size

    # ----- arrival -----

    async def add(self, data: bytes) -> Pcm | None:
        """Take a chunk; returns decoded audio only for granted live PCM."""
        self.total_bytes += len(data)
        if self.total_bytes > self.max_bytes:
            raise ProtocolError(ErrorCode.AUDIO_TOO_LONG, f"audio is over the limit of {self.max_bytes} bytes")
        if self.raw_pcm and self.total_bytes / (2 * self._channels * self._rate) > self.max_seconds:
            raise self._too_long()
        self._digest.update(data)
        async with self._turn():
            self._sniff(data)
            if self._pcm is not None:
                try:
                    return await asyncio.to_thread(self._pcm.push, data)
                except AudioError as exc:
                    raise _protocol_error(exc) from None
            if not self._granted:
                self._claim.add(len(data))
            await self._spool.append(data)
        return None

    def _sniff(self, data: bytes) -> None:
        if self._head_checked:
            return
        self._head += data[: audio_sniff.HEAD_BYTES - len(self._head)]
        if len(self._head) >= audio_sniff.HEAD_BYTES:
            self._check_head()

    def _check_head(self) -> None:
        self._head_checked = True
        problem = audio_sniff.mismatch(self._head, self.spec.format)
        if problem is not None:
            raise ProtocolError(ErrorCode.BAD_AUDIO, problem)

    # ----- the end of a clip or an utterance -----

    async def end(self) -> Pcm | None:
        """The clip or utterance is complete. Granted: its decoded audio. Waiting: it is
        validated and kept, and ``None`` comes back (``grant`` delivers it later)."""
        if not self.live:
            self.complete = True
        async with self._turn():
            if not self._head_checked:
                self._check_head()
            self._head, self._head_checked = b"", False
            if self._pcm is not None:
                return await asyncio.to_thread(self._pcm.flush)
            start = self._ends[-1] if self._ends else 0
            if not self._granted:
                if not (self.raw_pcm and self.live):
                    await self._decode(start, self._spool.size)
                self._ends.append(self._spool.size)
                return None
            pcm = await self._decode(start, self._spool.size)
            self._spool.reset()
            return pcm

    async def _decode(self, start: int, end: int, *, counted: bool = False) -> Pcm:
        """Decode one kept clip or utterance (a container format) in a worker thread; its
        seconds count against the limit unless they were ``counted`` at validation."""
        left = self.max_seconds if counted else self.max_seconds - self.seconds
        spool, spec = self._spool, self.spec

        def read_and_decode() -> DecodedAudio:
            data = spool.read_blocking(start, end)
            return decode_audio(
                data, spec.format, sample_rate=spec.sample_rate, channels=spec.channels, max_seconds=max(left, 0.0)
            )

        try:
            decoded = await asyncio.to_thread(read_and_decode)
        except AudioError as exc:
            raise (self._too_long() if exc.code == "audio_too_long" else _protocol_error(exc)) from None
        if not counted:
            self.seconds += decoded.duration_s
        if not self.live:
            self.frames = len(decoded.features) // FEATURE_SAMPLES_PER_FRAME
        return decoded.features, decoded.output

    def _too_long(self) -> ProtocolError:
        scope = "this live session's utterances together" if self.live else "this clip"
        return ProtocolError(
            ErrorCode.AUDIO_TOO_LONG, f"the audio of {scope} is over the limit of {self.max_seconds:g} s"
        )

    # ----- the grant -----

    async def grant(self) -> list[Pcm | None]:
        """The slot is granted: what was kept, decoded, in order, each completed clip or
        utterance followed by ``None`` (its end). The budget claim is given back."""
        async with self._turn():
            self._granted = True
            self._claim.release()
            out: list[Pcm | None] = []
            start = 0
            if self.raw_pcm and self.live:
                pcm = self._pcm = PcmStreamDecoder(self._rate, self._channels)
                for end in self._ends:
                    data = await self._spool.read(start, end)
                    out += [await asyncio.to_thread(pcm.push, data), await asyncio.to_thread(pcm.flush), None]
                    start = end
                rest = await self._spool.read(start, self._spool.size)
                if rest:
                    out.append(await asyncio.to_thread(pcm.push, rest))
                self._ends.clear()
                self._spool.reset()
                return out
            for end in self._ends:
                out += [await self._decode(start, end, counted=True), None]
                start = end
            if self._ends:
                rest = await self._spool.read(start, self._spool.size)
                self._ends.clear()
                self._spool.reset()
                if rest:
                    await self._spool.append(rest)
            return out

    # ----- ending -----

    async def interrupt(self) -> None:
        """Live: drop the speech kept while waiting (once granted, the engine drops its own)."""
        async with self._turn():
            if not self._granted:
                self._claim.release()
                self._discard()
                self._head, self._head_checked = b"", False

    def close(self) -> None:
        """The request is over: give back the budget claim now and the spool once no call is
        using it."""
        self._claim.release()
        self._closed = True
        if not self._lock.locked():
            self._discard()

    def _discard(self) -> None:
        self._spool.reset()
        self._ends.clear()

    @contextlib.asynccontextmanager
    async def _turn(self) -> AsyncIterator[None]:
        """One call at a time, in arrival order; none after ``close``."""
        async with self._lock:
            if self._closed:
                raise ProtocolError(ErrorCode.BAD_MESSAGE, "this request has ended")
            try:
                yield
            finally:
                if self._closed:
                    self._discard()
