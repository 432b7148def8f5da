"""Serving a request: the clip cache, the choice of sender, and the outcome as the client's message."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from inference.engine import FPS, PreparedAvatar
from inference.serving_engine import EncodeOptions, PacketOptions, ServedStream, ServingEngine
from inference.stream import StreamMode, StreamState
from stream_server.clips import ClipStore, clip_key
from stream_server.metrics import Metrics
from stream_server.outbox import Outbox, OutboxClosed
from stream_server.protocol import Done, ErrorCode, JsonId, ProtocolError, WebrtcAnswer, error_message
from stream_server.session.request import FINISHED_ERRORS, Request, RequestStatus
from stream_server.settings import Settings
from stream_server.transports.announce import stream_start
from stream_server.transports.mse import MseSender, ProgressReporter, StreamResult, send_cached_clip
from stream_server.transports.webrtc import WebRtcSender

log = logging.getLogger(__name__)


class LiveIdle(Exception):
    """A live session had no audio for ``limits.live_idle_timeout_s``."""

STREAM_OUTCOME = {
    StreamState.FINISHED: RequestStatus.FINISHED,
    StreamState.CANCELLED: RequestStatus.CANCELLED,
    StreamState.FAILED: RequestStatus.ENGINE_FAILED,
}


def done_message(frames: int, clip: str | None, *, time_limit_s: float | None = None) -> str:
    """``done``: a finished request, or (``time_limit_s``) a live session at its limit, with no clip."""
    if time_limit_s is not None:
        return Done(frames=frames, duration_s=time_limit_s).encode()
    return Done(frames=frames, duration_s=round(frames / FPS, 3), clip=clip).encode()


@dataclass(frozen=True)
class CachedClip:
    """A stored clip read for a replay: its key, its bytes and its sidecar."""

    key: str
    data: bytes
    meta: dict[str, Any]


@dataclass(frozen=True)
class Serving:
    settings: Settings
    engine: ServingEngine
    clips: ClipStore
    metrics: Metrics

    def send_error(self, outbox: Outbox, err: ProtocolError, msg_id: JsonId = None) -> None:
        self.metrics.rejections.labels(err.code.value).inc()
        outbox.send(error_message(err, msg_id).encode())

    # ----- the clip cache -----

    async def clip_key_for(self, avatar_id: str, audio_digest: str, audio_spec: dict[str, Any]) -> str:
        """The content address of a clip: the engine and its model version, the avatar and its
        revision, the audio's hash and format, and every output setting that shapes the bytes."""
        revision = await asyncio.to_thread(self.engine.avatars.revision, avatar_id)
        stream = self.settings.stream
        return clip_key(
            engine=self.engine.name,
            engine_version=self.engine.version,
            avatar=avatar_id,
            avatar_revision=revision,
            audio=audio_digest,
            audio_spec=audio_spec,
            segment_s=stream.segment_s,
            crf=stream.video_crf,
            preset=stream.x264_preset,
            audio_bitrate=stream.audio_bitrate,
        )

    async def find_cached(self, request: Request) -> CachedClip | None:
        """Key a complete MSE clip for the cache; the stored clip if the same was made before."""
        if request.start.transport != "mse":
            return None
        request.clip_key = await self.clip_key_for(
            request.start.avatar, request.audio.digest, request.audio.spec.model_dump()
        )
        if request.media_started:
            return None
        found = await asyncio.to_thread(self.clips.read, request.clip_key)
        return CachedClip(request.clip_key, *found) if found is not None else None

    async def replay(self, clip: CachedClip, outbox: Outbox) -> None:
        """Stream a stored clip: ``stream``, its segments, ``done``. No rendering, no slot."""
        try:
            frames = await send_cached_clip(clip.data, clip.meta, outbox, self.settings.limits.max_message_bytes)
        except OutboxClosed:  # the client went away mid-replay: nobody to tell
            return
        self.metrics.clips_served.inc()
        outbox.send(done_message(frames, self.clips.url(clip.key)))

    # ----- a granted request -----

    async def serve(self, request: Request, outbox: Outbox) -> RequestStatus:
        """Render and send a granted request; tell the client how it ended; return that."""
        try:
            result = await self._stream(request, outbox)
        except OutboxClosed:
            return RequestStatus.CANCELLED if outbox.stuck is None else RequestStatus.STALLED
        except TimeoutError:
            outbox.send(done_message(0, None, time_limit_s=self.settings.limits.max_live_session_s))
            return RequestStatus.TIME_LIMIT
        except LiveIdle:
            held = time.monotonic() - request.granted_at
            outbox.send(done_message(0, None, time_limit_s=round(held, 3)))
            return RequestStatus.TIME_LIMIT
        except ProtocolError as exc:
            self.send_error(outbox, exc)
            return RequestStatus.REFUSED
        except Exception:
            log.exception("serving %s failed", request.ticket_id)
            return self._finish(outbox, RequestStatus.FAILED)
        status = STREAM_OUTCOME[result.state]
        if status is RequestStatus.CANCELLED and result.error is not None:
            status = RequestStatus.MEDIA_LOST
        elif status is RequestStatus.ENGINE_FAILED:
            log.error("engine failed for %s: %r", request.ticket_id, result.error)
        elif status is RequestStatus.FINISHED and result.clip_key is None:
            request.clip_key = None
        clip = self.clips.url(request.clip_key) if request.clip_key else None
        return self._finish(outbox, status, frames=result.frames, clip=clip, detail=repr(result.error))

    def _finish(
        self, outbox: Outbox, status: RequestStatus, *, frames: int = 0, clip: str | None = None, detail: str = ""
    ) -> RequestStatus:
        if status is RequestStatus.FINISHED:
            outbox.send(done_message(frames, clip))
        reply = FINISHED_ERRORS[status]
        if reply is not None:
            code, message = reply
            self.send_error(outbox, ProtocolError(code, message.format(detail=detail)))
        return status

    async def _stream(self, request: Request, outbox: Outbox) -> StreamResult:
        avatar = await asyncio.to_thread(self.engine.avatars.get, request.start.avatar)
        if avatar is None:
            raise ProtocolError(ErrorCode.UNKNOWN_AVATAR, f"avatar {request.start.avatar!r} is gone")
        loop = asyncio.get_running_loop()
        ready = asyncio.Event()

        def wake_sender() -> None:
            loop.call_soon_threadsafe(ready.set)

        stream = self.open_stream(
            avatar,
            StreamMode(request.start.mode),
            mse=request.offer is None,
            # the WebRTC sender waits on the loop; the MSE encoder waits in its own thread
            on_output=wake_sender if request.offer is not None else None,
        )
        request.stream = stream
        request.status = RequestStatus.STREAMING
        for pcm in await request.audio.grant():
            request.deliver(pcm)
        limit = self.settings.limits.max_live_session_s if request.live else None
        try:
            async with asyncio.timeout(limit):
                return await self._send_until_idle(request, stream, ready, outbox)
        finally:
            stream.cancel()

    def open_stream(
        self,
        avatar: PreparedAvatar,
        mode: StreamMode,
        *,
        mse: bool,
        on_output: Callable[[], None] | None = None,
        background: bool = False,
    ) -> ServedStream:
        """A stream on the engine; it comes back encoded where the workers encode (fMP4 for MSE,
        H.264 packets for WebRTC)."""
        s = self.settings.stream
        encode: EncodeOptions | PacketOptions | None = None
        if self.engine.encodes_in_workers:
            encode = (
                EncodeOptions(s.segment_s, s.video_crf, s.x264_preset, s.audio_bitrate) if mse
                else PacketOptions(s.webrtc_video_bitrate, s.webrtc_keyframe_interval_s, s.x264_preset)
            )
        return self.engine.open_stream(
            avatar,
            mode,
            buffer_frames=self.settings.engine.stream_buffer_frames,
            on_output=on_output,
            background=background,
            encode=encode,
        )

    async def _send_until_idle(
        self, request: Request, stream: ServedStream, ready: asyncio.Event, outbox: Outbox
    ) -> StreamResult:
        """Send the stream; a live one ends with ``LiveIdle`` after ``live_idle_timeout_s``
        without audio (each piece of audio puts the deadline back)."""
        idle_s = self.settings.limits.live_idle_timeout_s if request.live else None
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(idle_s) as idle:
                if idle_s is not None:
                    request.on_audio = lambda: idle.reschedule(loop.time() + idle_s)
                return await self._send(request, stream, ready, outbox)
        except TimeoutError:
            if idle.expired():
                raise LiveIdle from None
            raise
        finally:
            request.on_audio = None

    async def _send(self, request: Request, stream: ServedStream, ready: asyncio.Event, outbox: Outbox) -> StreamResult:
        if request.offer is not None:
            return await self._serve_webrtc(request, stream, ready, outbox)
        sender = MseSender(
            stream,
            outbox,
            self.settings.stream,
            total_frames=lambda: request.frames_total,
            open_clip=lambda: (
                self.clips.writer(request.clip_key, request.start.avatar) if request.clip_key else None
            ),
            on_frames=self.metrics.frames.inc,
            first_segment=lambda: setattr(request, "media_started", True),
        )
        return await sender.run()

    async def _serve_webrtc(
        self, request: Request, stream: ServedStream, ready: asyncio.Event, outbox: Outbox
    ) -> StreamResult:
        """Wait for the client's offer, answer it, then pace the stream into the peer connection."""
        assert request.offer is not None
        settings = self.settings.stream
        progress = ProgressReporter(outbox, lambda: request.frames_total)

        def on_frames(n: int) -> None:
            self.metrics.frames.inc(n)
            progress.add(n)

        ice_servers = [server.model_dump(exclude_none=True) for server in settings.ice_servers]
        sender = WebRtcSender(
            stream, ready, ice_servers, on_frames=on_frames,
            on_video=lambda encoded_in: self.metrics.webrtc_video_frames.labels(encoded_in).inc(),
        )
        request.rtc = sender
        try:
            try:
                sdp, offer_id = await asyncio.wait_for(request.offer, settings.webrtc_offer_timeout_s)
            except TimeoutError:
                raise ProtocolError(ErrorCode.BAD_MESSAGE, "no webrtc_offer came after granted") from None
            try:
                answer = await sender.answer(sdp)
            except ValueError as exc:
                raise ProtocolError(ErrorCode.BAD_MESSAGE, f"webrtc_offer: {exc}") from None
            outbox.send(WebrtcAnswer(sdp=answer, id=offer_id).encode())
            info = stream.avatar.info
            outbox.send(stream_start("webrtc", info.width, info.height))
            result = await sender.run()
            progress.flush()
            return result
        finally:
            await sender.close()
