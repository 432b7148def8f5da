"""A request's audio as it arrives: bytes buffered and decoded off the event loop, within limits.

Clip mode keeps the upload and decodes it once at ``audio_end``. Live mode decodes raw PCM chunk
by chunk (so speech reaches the model while the user still talks) and other formats utterance by
utterance. Each decode runs in a thread; a lock keeps chunks in order.
"""

from __future__ import annotations

import asyncio
import hashlib

import numpy as np

from inference.audio import AudioError, DecodedAudio, PcmStreamDecoder, decode_audio
from stream_server.protocol import AudioSpec, ErrorCode, ProtocolError

Pcm = tuple[np.ndarray, np.ndarray]


def _protocol_error(exc: AudioError) -> ProtocolError:
    code = ErrorCode.AUDIO_TOO_LONG if exc.code == "audio_too_long" else ErrorCode.BAD_AUDIO
    return ProtocolError(code, exc.message)


class AudioInput:
    def __init__(self, spec: AudioSpec, *, live: bool, max_seconds: float, max_bytes: int) -> None:
        self.spec = spec
        self.live = live
        self.max_seconds = max_seconds
        self.max_bytes = max_bytes
        self.total_bytes = 0
        self._buffer = bytearray()
        self._digest = hashlib.sha256()
        self._lock = asyncio.Lock()
        self._pcm: PcmStreamDecoder | None = None
        if live and spec.format == "pcm_s16le":
            try:
                self._pcm = PcmStreamDecoder(spec.sample_rate or 16_000, spec.channels or 1)
            except AudioError as exc:
                raise _protocol_error(exc) from None

    @property
    def digest(self) -> str:
        return self._digest.hexdigest()

    @property
    def streaming(self) -> bool:
        """Live raw PCM: decoded chunk by chunk as it arrives."""
        return self._pcm is not None

    async def add(self, data: bytes) -> Pcm | None:
        """Take a chunk; returns decoded audio when the chunk could be decoded on its own."""
        self.total_bytes += len(data)
        if self.total_bytes > self.max_bytes:
            raise ProtocolError(
                ErrorCode.AUDIO_TOO_LONG, f"audio is over the limit of {self.max_bytes} bytes"
            )
        if self._pcm is None:
            self._buffer += data
            self._digest.update(data)
            return None
        pcm = self._pcm
        async with self._lock:
            try:
                out = await asyncio.to_thread(pcm.push, data)
            except AudioError as exc:
                raise _protocol_error(exc) from None
            if pcm.seconds > self.max_seconds:
                raise ProtocolError(
                    ErrorCode.AUDIO_TOO_LONG, f"audio is over the limit of {self.max_seconds:.0f} s"
                )
        return out

    async def end(self) -> Pcm:
        """The clip or utterance is complete: decode what is buffered (or flush the PCM stream)."""
        async with self._lock:
            if self._pcm is not None:
                return await asyncio.to_thread(self._pcm.flush)
            data, self._buffer = bytes(self._buffer), bytearray()
            if self.live:
                self.total_bytes = 0
            try:
                decoded: DecodedAudio = await asyncio.to_thread(
                    decode_audio,
                    data,
                    self.spec.format,
                    sample_rate=self.spec.sample_rate,
                    channels=self.spec.channels,
                    max_seconds=self.max_seconds,
                )
            except AudioError as exc:
                raise _protocol_error(exc) from None
            return decoded.features, decoded.output
