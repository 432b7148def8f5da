"""MSE transport: frames from an engine stream, encoded off the loop, sent as fMP4 segments.

The sequence on the socket is ``stream`` (mime, size, fps) once the first segment is cut, the init
segment as one binary message, then media segments as they are cut. Encoding runs in a thread; the outbox bounds what
waits for a slow client, and while it is full the engine stream's own buffer fills and its worker
stops rendering for this session.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

from inference.engine import FPS, Frame
from inference.stream import EngineStream, StreamState
from stream_server.clips import ClipWriter
from stream_server.outbox import Outbox
from stream_server.protocol import Progress
from stream_server.settings import StreamSettings
from stream_server.transports.announce import stream_start
from stream_server.transports.fmp4 import FragmentedMp4Muxer, split_boxes

T = TypeVar("T")


@dataclass
class StreamResult:
    frames: int
    state: StreamState
    error: BaseException | None
    clip_key: str | None = None
    """The key the finished clip was stored under, if it was."""


class ProgressReporter:
    """``progress`` messages about twice a second of video, and once at the end."""

    def __init__(self, outbox: Outbox, total: Callable[[], int | None]) -> None:
        self.outbox = outbox
        self.total = total
        self.frames = 0
        self._reported = 0

    def add(self, frames: int) -> None:
        self.frames += frames
        if self.frames - self._reported >= FPS // 2:
            self.flush()

    def flush(self) -> None:
        if self.frames == self._reported and self._reported:
            return
        self._reported = self.frames
        self.outbox.send(Progress(frames=self.frames, total=self.total()).encode())


class MseSender:
    """Encodes one engine stream to fMP4 and sends it; optionally keeps the clip."""

    def __init__(
        self,
        stream: EngineStream,
        outbox: Outbox,
        ready: asyncio.Event,
        settings: StreamSettings,
        *,
        total_frames: Callable[[], int | None] = lambda: None,
        open_clip: Callable[[], ClipWriter | None] = lambda: None,
        on_frames: Callable[[int], None] = lambda n: None,
        first_segment: Callable[[], None] = lambda: None,
    ) -> None:
        self.stream = stream
        self.outbox = outbox
        self.ready = ready
        self.settings = settings
        self.open_clip = open_clip
        self.clip: ClipWriter | None = None
        self.on_frames = on_frames
        self.first_segment = first_segment
        self.frames = 0
        self._encoder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mse-encoder")
        self._init_sent = False
        self._clip_started = False
        self._clip_committed = False
        self.progress = ProgressReporter(outbox, total_frames)

    async def run(self) -> StreamResult:
        width, height = self.stream.avatar.info.width, self.stream.avatar.info.height
        muxer = await self._in_encoder(
            partial(
                FragmentedMp4Muxer,
                width,
                height,
                FPS,
                segment_seconds=self.settings.segment_s,
                crf=self.settings.video_crf,
                preset=self.settings.x264_preset,
                audio_bitrate=self.settings.audio_bitrate,
                threads=1,
            )
        )
        try:
            while True:
                self.ready.clear()
                frames = self.stream.take_frames()
                if frames:
                    await self._send(muxer, await self._in_encoder(self._encode, muxer, frames))
                    self.frames += len(frames)
                    self.on_frames(len(frames))
                    self.progress.add(len(frames))
                elif self.stream.closed:
                    break
                else:
                    await self.ready.wait()
            if self.stream.state is StreamState.FINISHED:
                await self._send(muxer, await self._in_encoder(self._close, muxer))
                self.progress.flush()
                clip_key = None
                if self.clip is not None:
                    meta = {"mime": muxer.mime, "width": muxer.width, "height": muxer.height,
                            "fps": FPS, "frames": self.frames}
                    clip_key = await self._in_encoder(self._commit_clip, meta)
                return StreamResult(self.frames, self.stream.state, None, clip_key)
            return StreamResult(self.frames, self.stream.state, self.stream.error)
        finally:
            # Queued behind any encode still running, so the muxer is never used by two threads.
            self._encoder.submit(self._abandon, muxer)
            self._encoder.shutdown(wait=False)

    async def _in_encoder(self, fn: Callable[..., T], *args: object) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._encoder, fn, *args)

    def _abandon(self, muxer: FragmentedMp4Muxer) -> None:
        muxer.close()
        if self.clip is not None and not self._clip_committed:
            self.clip.discard()

    def _encode(self, muxer: FragmentedMp4Muxer, frames: list[Frame]) -> list[bytes]:
        return self._keep(muxer, muxer.encode(frames))

    def _close(self, muxer: FragmentedMp4Muxer) -> list[bytes]:
        return self._keep(muxer, muxer.close())

    def _keep(self, muxer: FragmentedMp4Muxer, segments: list[bytes]) -> list[bytes]:
        """Append segments to the stored clip (opened with the first segment)."""
        if segments and not self._clip_started:
            self._clip_started = True
            self.clip = self.open_clip()
            if self.clip is not None:
                assert muxer.init_segment is not None
                self.clip.write(muxer.init_segment)
        if self.clip is not None:
            for seg in segments:
                self.clip.write(seg)
        return segments

    def _commit_clip(self, meta: dict[str, object]) -> str:
        assert self.clip is not None
        key = self.clip.commit(meta)
        self._clip_committed = True
        return key

    async def _send(self, muxer: FragmentedMp4Muxer, segments: list[bytes]) -> None:
        if not segments:
            return
        if not self._init_sent:
            assert muxer.init_segment is not None
            self.outbox.send(stream_start("mse", muxer.width, muxer.height, muxer.mime))
            await self.outbox.send_media(muxer.init_segment)
            self._init_sent = True
            self.first_segment()
        for seg in segments:
            await self.outbox.send_media(seg)


async def send_cached_clip(data: bytes, meta: Mapping[str, Any], outbox: Outbox, max_message_bytes: int) -> int:
    """Answer a repeated clip from the cache: ``stream``, the file as init + segment messages."""
    outbox.send(stream_start("mse", meta["width"], meta["height"], meta["mime"]))
    boxes, _ = split_boxes(data)
    chunk = bytearray()
    for kind, box in boxes:
        if kind == b"moof" and chunk:
            await outbox.send_media(bytes(chunk))
            chunk = bytearray()
        chunk += box
        if len(chunk) > max_message_bytes // 2 and kind == b"mdat":
            await outbox.send_media(bytes(chunk))
            chunk = bytearray()
    if chunk:
        await outbox.send_media(bytes(chunk))
    return int(meta["frames"])
