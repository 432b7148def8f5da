"""Serving a request: the clip cache, the choice of sender, and the outcome as the client's message."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from inference.engine import FPS
from inference.pool import EnginePool
from inference.procs.messages import EncodeOptions
from inference.procs.process_pool import ProcessEnginePool
from inference.procs.remote_stream import RemoteStream
from inference.stream import EngineStream, StreamMode, StreamState
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
class Serving:
    settings: Settings
    engine: EnginePool | ProcessEnginePool
    clips: ClipStore
    metrics: Metrics

    def send_error(self, outbox: Outbox, err: ProtocolError, msg_id: JsonId = None) -> None:
        self.metrics.rejections.labels(err.code.value).inc()
        outbox.send(error_message(err, msg_id).encode())

    # ----- the clip cache -----

    async def find_cached(self, request: Request) -> bool:
        """Key a complete MSE clip for the cache; True if the same clip was made before."""
        if request.start.transport != "mse":
            return False
        revision = await asyncio.to_thread(self.engine.avatars.revision, request.start.avatar)
        stream = self.settings.stream
        request.clip_key = clip_key(
            engine=self.engine.name,
            avatar=request.start.avatar,
            avatar_revision=revision,
            audio=request.audio.digest,
            audio_spec=request.audio.spec.model_dump(),
            segment_s=stream.segment_s,
            crf=stream.video_crf,
            preset=stream.x264_preset,
            audio_bitrate=stream.audio_bitrate,
        )
        if request.media_started:
            return False
        return await asyncio.to_thread(self.clips.exists, request.clip_key)

    async def replay(self, request: Request, outbox: Outbox) -> None:
        """Stream a stored clip: ``stream``, its segments, ``done``. No rendering, no slot."""
        assert request.clip_key is not None
        path = self.clips.path(request.clip_key)
        frames = await send_cached_clip(path, outbox, self.settings.limits.max_message_bytes)
        self.metrics.clips_served.inc()
        outbox.send(done_message(frames, self.clips.url(request.clip_key)))

    # ----- a granted request -----

    async def serve(self, request: Request, outbox: Outbox) -> RequestStatus:
        """Render and send a granted request; tell the client how it ended; return that."""
        try:
            result = await self._stream(request, outbox)
        except OutboxClosed:
            return RequestStatus.CANCELLED
        except TimeoutError:
            outbox.send(done_message(0, None, time_limit_s=self.settings.limits.max_live_session_s))
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
        elif status is RequestStatus.FINISHED and result.clip_path is None:
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
        options: dict[str, object] = {}
        if self.engine.encodes_in_workers and request.offer is None:
            s = self.settings.stream
            options["encode"] = EncodeOptions(s.segment_s, s.video_crf, s.x264_preset, s.audio_bitrate)
        stream = self.engine.open_stream(
            avatar,
            StreamMode(request.start.mode),
            buffer_frames=self.settings.engine.stream_buffer_frames,
            # the WebRTC sender waits on the loop; the MSE encoder waits in its own thread
            on_output=(lambda: loop.call_soon_threadsafe(ready.set)) if request.offer is not None else None,
            **options,  # type: ignore[arg-type]
        )
        request.stream = stream
        request.status = RequestStatus.STREAMING
        for pcm in await request.audio.grant():
            request.deliver(pcm)
        limit = self.settings.limits.max_live_session_s if request.live else None
        try:
            async with asyncio.timeout(limit):
                if request.offer is not None:
                    return await self._serve_webrtc(request, stream, ready, outbox)
                sender = MseSender(
                    stream,
                    outbox,
                    self.settings.stream,
                    total_frames=lambda: request.frames_total,
                    open_clip=lambda: self.clips.writer(request.clip_key) if request.clip_key else None,
                    on_frames=self.metrics.frames.inc,
                    first_segment=lambda: setattr(request, "media_started", True),
                )
                return await sender.run()
        finally:
            stream.cancel()

    async def _serve_webrtc(
        self, request: Request, stream: EngineStream | RemoteStream, ready: asyncio.Event, outbox: Outbox
    ) -> StreamResult:
        """Wait for the client's offer, answer it, then pace the stream into the peer connection."""
        assert request.offer is not None
        settings = self.settings.stream
        progress = ProgressReporter(outbox, lambda: request.frames_total)

        def on_frames(n: int) -> None:
            self.metrics.frames.inc(n)
            progress.add(n)

        ice_servers = [server.model_dump(exclude_none=True) for server in settings.ice_servers]
        sender = WebRtcSender(stream, ready, ice_servers, on_frames=on_frames)
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
