"""MSE transport: frames from an engine stream, encoded off the loop, sent as fMP4 segments.

The sequence on the socket is ``stream`` (mime, size, fps) once the first segment is cut, the init
segment as one binary message, then media segments as they are cut.

The encoder thread takes frames from the engine stream itself (``EngineStream.wait_frames``),
encodes them (``encode_loop``) and keeps the stored clip; only encoded segments and frame counts
reach the event loop. In process mode (``engine.process_mode = "process"``) the worker process
encodes with the same loop, and this thread only relays its segments (``RemoteStream.wait_segments``)
and keeps the clip, acknowledging each batch once the loop has it.

The thread waits until the loop has put each batch of segments into the outbox, and the outbox
waits for room while a slow client has too much media unread: so the encoder stops, the engine
stream's own buffer fills and its worker stops rendering for this session, and no other session.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from inference.engine import FPS
from inference.procs.remote_stream import RemoteStream
from inference.serving_engine import ServedStream
from inference.stream import EngineStream, StreamState
from stream_server.clips import ClipWriter
from stream_server.outbox import Outbox
from stream_server.protocol import Progress
from stream_server.settings import StreamSettings
from stream_server.transports.announce import stream_start
from stream_server.transports.encode_loop import PROGRESS_EVERY_FRAMES, encode_stream
from stream_server.transports.fmp4 import FragmentedMp4Muxer, split_boxes

log = logging.getLogger(__name__)


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
        if self.frames - self._reported >= PROGRESS_EVERY_FRAMES:
            self.flush()

    def flush(self) -> None:
        if self.frames == self._reported and self._reported:
            return
        self._reported = self.frames
        self.outbox.send(Progress(frames=self.frames, total=self.total()).encode())


@dataclass(frozen=True)
class InitSegment:
    data: bytes
    mime: str
    width: int
    height: int


@dataclass(frozen=True)
class EncodedBatch:
    """What the encoder thread hands the loop: new segments and how many frames they cover."""

    segments: list[bytes]
    frames: int
    init: InitSegment | None = None


class SenderStopped(Exception):
    """The sender's ``run`` ended; the encoder thread stops at its next hand-over."""


class MseSender:
    """Encodes one engine stream to fMP4 and sends it; optionally keeps the clip.

    The loop side (``run``, ``_forward``) owns what goes to the client; the encoder thread
    (``_encode_stream`` and below) owns the muxer and the stored clip."""

    def __init__(
        self,
        stream: ServedStream,
        outbox: Outbox,
        settings: StreamSettings,
        *,
        total_frames: Callable[[], int | None] = lambda: None,
        open_clip: Callable[[], ClipWriter | None] = lambda: None,
        on_frames: Callable[[int], None] = lambda n: None,
        first_segment: Callable[[], None] = lambda: None,
    ) -> None:
        self.stream = stream
        self.outbox = outbox
        self.settings = settings
        self.open_clip = open_clip
        self.on_frames = on_frames
        self.first_segment = first_segment
        self.frames = 0
        self.progress = ProgressReporter(outbox, total_frames)
        self._stopped = False
        self._forwarding: asyncio.Task[object] | None = None

    async def run(self) -> StreamResult:
        loop = asyncio.get_running_loop()
        encoded: asyncio.Future[str | None] = loop.create_future()
        # A daemon thread: it may wait for frames, and must never hold up the interpreter's exit.
        threading.Thread(target=self._encoder_main, args=(loop, encoded), name="mse-encoder", daemon=True).start()
        try:
            clip_key = await encoded
            if self.stream.state is StreamState.FINISHED:
                self.progress.flush()
                return StreamResult(self.frames, self.stream.state, None, clip_key)
            return StreamResult(self.frames, self.stream.state, self.stream.error)
        finally:
            self._stopped = True
            if self._forwarding is not None:
                self._forwarding.cancel()
            self.stream.cancel()  # wakes the encoder thread if it waits for frames

    # ----- loop side -----

    async def _forward(self, batch: EncodedBatch) -> None:
        if self._stopped:
            raise SenderStopped
        self._forwarding = asyncio.current_task()
        try:
            if batch.init is not None:
                init = batch.init
                self.outbox.send(stream_start("mse", init.width, init.height, init.mime))
                await self.outbox.send_media(init.data)
                self.first_segment()
            for seg in batch.segments:
                await self.outbox.send_media(seg)
        finally:
            self._forwarding = None
        self.frames += batch.frames
        self.on_frames(batch.frames)
        self.progress.add(batch.frames)

    # ----- encoder thread -----

    def _encoder_main(self, loop: asyncio.AbstractEventLoop, encoded: asyncio.Future[str | None]) -> None:
        try:
            outcome: str | BaseException | None = self._encode_stream(loop)
        except BaseException as exc:  # handed to ``run``, which raises it on the loop
            outcome = exc
        try:
            loop.call_soon_threadsafe(_settle, encoded, outcome)
        except RuntimeError:  # the loop is closed: nobody waits for this stream any more
            log.debug("encoder of a stream outlived its event loop")

    def _encode_stream(self, loop: asyncio.AbstractEventLoop) -> str | None:
        """Encode (process mode: relay the worker's segments of) every frame of the stream;
        returns the stored clip's key once the stream finished (``None`` when it did not, or when
        there is no clip to keep)."""
        writer = _SegmentWriter(self.open_clip)
        try:
            if isinstance(self.stream, RemoteStream):
                finished = self._relay_segments(loop, self.stream, writer)
            elif isinstance(self.stream, EngineStream):
                finished = self._encode_frames(loop, self.stream, writer)
            else:
                raise TypeError(f"an MSE sender cannot send a {type(self.stream).__name__}")
            if not finished or writer.clip is None or writer.init is None:
                return None
            init = writer.init
            meta = {"mime": init.mime, "width": init.width, "height": init.height, "fps": FPS,
                    "frames": writer.frames}
            return writer.commit(meta)
        except (SenderStopped, concurrent.futures.CancelledError):
            return None
        finally:
            writer.abandon()

    def _encode_frames(self, loop: asyncio.AbstractEventLoop, stream: EngineStream, writer: _SegmentWriter) -> bool:
        info = stream.avatar.info
        settings = self.settings
        muxer = FragmentedMp4Muxer(
            info.width,
            info.height,
            FPS,
            segment_seconds=settings.segment_s,
            crf=settings.video_crf,
            preset=settings.x264_preset,
            audio_bitrate=settings.audio_bitrate,
            threads=1,
        )

        def emit(segments: list[bytes], frames: int) -> None:
            self._hand_over(loop, writer.batch(writer.keep(segments, _init_of(muxer)), frames))

        try:
            return encode_stream(stream, muxer, emit)
        finally:
            muxer.close()

    def _relay_segments(self, loop: asyncio.AbstractEventLoop, stream: RemoteStream, writer: _SegmentWriter) -> bool:
        """Process mode: the worker encoded; hand its segments on, one batch at a time."""
        init: InitSegment | None = None
        while (batch := stream.wait_segments()) is not None:
            if batch.init is not None:
                init = InitSegment(batch.init, batch.mime, batch.width, batch.height)
            self._hand_over(loop, writer.batch(writer.keep(batch.segments, init), batch.frames))
            stream.ack()
        return stream.state is StreamState.FINISHED

    def _hand_over(self, loop: asyncio.AbstractEventLoop, batch: EncodedBatch) -> None:
        """Give the loop a batch and wait until it is in the outbox (the backpressure)."""
        if batch.segments or batch.frames:
            asyncio.run_coroutine_threadsafe(self._forward(batch), loop).result()


def _settle(future: asyncio.Future[str | None], outcome: str | BaseException | None) -> None:
    if future.done():  # ``run`` was cancelled and no longer waits
        return
    if isinstance(outcome, BaseException):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)


def _init_of(muxer: FragmentedMp4Muxer) -> InitSegment | None:
    data = muxer.init_segment
    return None if data is None else InitSegment(data, muxer.mime, muxer.width, muxer.height)


class _SegmentWriter:
    """Encoder-thread state: the init segment owed to the client, and the stored clip (opened
    with the first segment, committed at the end, discarded otherwise)."""

    def __init__(self, open_clip: Callable[[], ClipWriter | None]) -> None:
        self.open_clip = open_clip
        self.clip: ClipWriter | None = None
        self.init: InitSegment | None = None
        self.frames = 0
        self._init_owed = True
        self._committed = False

    @property
    def started(self) -> bool:
        return self.init is not None

    def keep(self, segments: list[bytes], init: InitSegment | None) -> list[bytes]:
        """Store ``segments``; ``init`` is the stream's init segment, known once the first
        media segment is cut."""
        if segments and self.init is None:
            if init is None:
                raise RuntimeError("media segments came before the init segment")
            self.init = init
            self.clip = self.open_clip()
            if self.clip is not None:
                self.clip.write(init.data)
        if self.clip is not None:
            for seg in segments:
                self.clip.write(seg)
        return segments

    def batch(self, segments: list[bytes], frames: int) -> EncodedBatch:
        self.frames += frames
        init = None
        if segments and self._init_owed:
            self._init_owed = False
            init = self.init
        return EncodedBatch(segments, frames, init)

    def commit(self, meta: dict[str, object]) -> str:
        assert self.clip is not None
        key = self.clip.commit(meta)
        self._committed = True
        return key

    def abandon(self) -> None:
        if self.clip is not None and not self._committed:
            self.clip.discard()


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
