"""One client's session: a state machine checked on every message, owning at most one request.

States: NEW (before ``hello``) -> IDLE -> QUEUED -> STREAMING -> IDLE ...; CLOSED at the end.
A queued session whose socket closes is parked for the resume grace; a streaming one is stopped
and its slot freed at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import secrets
import time
from dataclasses import dataclass, field

from inference.engine import FEATURE_SAMPLES_PER_FRAME, FPS
from inference.stream import EngineStream, StreamMode, StreamState
from stream_server.admission.backend import Grant
from stream_server.admission.policy import IdentityBusy, QueueFull
from stream_server.audio_input import AudioInput, Pcm
from stream_server.auth import Identity
from stream_server.clips import clip_key
from stream_server.node import Node, queued_message
from stream_server.outbox import Outbox, OutboxClosed
from stream_server.protocol import (
    AudioEnd,
    AudioSpec,
    Cancel,
    ClientMessage,
    CloseCode,
    ErrorCode,
    Hello,
    Interrupt,
    Ping,
    ProtocolError,
    Start,
    WebrtcOffer,
    encode,
    error_message,
)
from stream_server.transports.mse import MseSender, ProgressReporter, StreamResult, send_cached_clip
from stream_server.transports.webrtc import WebRtcSender

log = logging.getLogger(__name__)


class SessionState(enum.Enum):
    NEW = "new"
    IDLE = "idle"
    QUEUED = "queued"
    STREAMING = "streaming"
    CLOSED = "closed"


@dataclass
class Request:
    """One ``start``: its ticket, its audio and, once granted, its engine stream."""

    ticket_id: str
    start: Start
    audio: AudioInput
    pending: list[Pcm | None] = field(default_factory=list)
    frames_total: int | None = None
    clip_key: str | None = None
    stream: EngineStream | None = None
    task: asyncio.Task[None] | None = None
    granted_at: float = 0.0
    media_started: bool = False
    offer: asyncio.Future[tuple[str, object]] | None = None
    rtc: WebRtcSender | None = None

    @property
    def live(self) -> bool:
        return self.start.mode == "live"

    def deliver(self, pcm: Pcm | None) -> None:
        """Audio (or, as ``None``, the end of it) for the engine, now or once granted."""
        if self.stream is None:
            self.pending.append(pcm)
        elif pcm is None:
            self.stream.end_audio()
        else:
            self.stream.feed(*pcm)


class Session:
    def __init__(self, node: Node, outbox: Outbox, address: str) -> None:
        self.node = node
        self.outbox = outbox
        self.address = address
        self.id = secrets.token_urlsafe(12)
        self.state = SessionState.NEW
        self.identity: Identity | None = None
        self.request: Request | None = None
        self.bad_messages = 0
        self._requests = 0
        self._last_position: int | None = None
        self.close_code: CloseCode | None = None

    # ----- client messages -----

    async def handle(self, message: ClientMessage) -> None:
        if isinstance(message, Ping):
            self.outbox.send(encode("pong", message.id))
            return
        if isinstance(message, Hello):
            await self._hello(message)
            return
        if self.state is SessionState.NEW:
            raise ProtocolError(ErrorCode.BAD_MESSAGE, "the first message must be hello")
        if isinstance(message, Start):
            await self._start(message)
        elif isinstance(message, AudioEnd):
            await self._audio_end()
        elif isinstance(message, Cancel):
            await self.cancel()
        elif isinstance(message, Interrupt):
            self._interrupt()
        elif isinstance(message, WebrtcOffer):
            self._offer(message)

    async def handle_audio(self, data: bytes) -> None:
        request = self.request
        if request is None:
            raise ProtocolError(ErrorCode.BAD_MESSAGE, "binary audio needs a start first")
        try:
            pcm = await request.audio.add(data)
        except ProtocolError:
            await self._drop_request(request)
            raise
        if pcm is not None:
            request.deliver(pcm)

    async def _hello(self, message: Hello) -> None:
        if self.state is not SessionState.NEW:
            raise ProtocolError(ErrorCode.BAD_MESSAGE, "hello was already said")
        self.identity = self.node.auth.identify(message.token, self.address)
        resumed = self._resume(message.resume) if message.resume else None
        if resumed is None:
            self.state = SessionState.IDLE
        self.outbox.send(
            encode(
                "welcome",
                message.id,
                session=self.id,
                tier=self.identity.tier,
                resume=self.node.auth.resume_token(self.id),
                engine=self.node.engine.name,
                limits=self._limits(),
            )
        )
        if message.resume and resumed is None:
            raise ProtocolError(
                ErrorCode.SESSION_EXPIRED, "the session to resume is unknown or its grace period is over"
            )
        if resumed is not None:
            ticket = await self.node.admission.reattach(resumed.ticket_id, time.monotonic())
            if ticket is None:
                self.request = None
                self.state = SessionState.IDLE
                raise ProtocolError(ErrorCode.SESSION_EXPIRED, "the queued request has expired")
            self.node.register_waiting(resumed.ticket_id, self)

    def _resume(self, token: str) -> Request | None:
        """Adopt a parked session's id and queued request, if the token is genuine and in time."""
        session_id = self.node.auth.session_from_resume(token)
        old = self.node.unpark(session_id) if session_id else None
        if old is None or old.request is None or old.identity != self.identity:
            return None
        self.id = old.id
        self.request = old.request
        self._requests = old._requests
        self.state = SessionState.QUEUED
        return self.request

    def _limits(self) -> dict[str, float | int]:
        limits = self.node.settings.limits
        return {
            "max_audio_seconds": limits.max_audio_seconds,
            "max_audio_bytes": limits.max_audio_bytes,
            "max_message_bytes": limits.max_message_bytes,
            "max_live_session_s": limits.max_live_session_s,
            "fps": FPS,
        }

    async def _start(self, message: Start) -> None:
        assert self.identity is not None
        if self.request is not None:
            raise ProtocolError(ErrorCode.BUSY, "this socket already has an active request; cancel it first")
        wait = self.node.start_limiter.allow(self.identity.key, time.monotonic())
        if wait > 0:
            raise ProtocolError(ErrorCode.RATE_LIMITED, "too many start messages", retry_after_s=wait)
        avatar = await asyncio.to_thread(self.node.engine.avatars.info, message.avatar)
        if avatar is None or not avatar.ready:
            raise ProtocolError(ErrorCode.UNKNOWN_AVATAR, f"no ready avatar {message.avatar!r}")
        spec = message.audio
        if spec is None:
            if message.mode == "clip":
                raise ProtocolError(ErrorCode.BAD_MESSAGE, "start: a clip needs audio: {\"format\": ...}")
            spec = AudioSpec(format="pcm_s16le", sample_rate=16_000, channels=1)
        limits = self.node.settings.limits
        audio = AudioInput(
            spec,
            live=message.mode == "live",
            max_seconds=limits.max_audio_seconds,
            max_bytes=limits.max_audio_bytes,
        )
        self._requests += 1
        ticket_id = f"{self.id}:{self._requests}"
        try:
            ticket = await self.node.admission.join(
                ticket_id, self.identity.key, self.identity.tier, message.avatar, time.monotonic()
            )
        except QueueFull as exc:
            raise ProtocolError(ErrorCode.QUEUE_FULL, exc.reason, retry_after_s=exc.retry_after_s) from None
        except IdentityBusy as exc:
            raise ProtocolError(ErrorCode.BUSY, str(exc)) from None
        self.request = Request(ticket_id, message, audio)
        self.state = SessionState.QUEUED
        self._last_position = None
        self.node.register_waiting(ticket.id, self)

    async def _audio_end(self) -> None:
        request = self.request
        if request is None:
            raise ProtocolError(ErrorCode.BAD_MESSAGE, "audio_end needs a start first")
        if not request.live and request.frames_total is not None:
            raise ProtocolError(ErrorCode.BAD_MESSAGE, "audio_end was already sent for this clip")
        try:
            pcm = await request.audio.end()
        except ProtocolError:
            await self._drop_request(request)
            raise
        if request is not self.request:
            return
        if not request.live:
            features, _ = pcm
            request.frames_total = len(features) // FEATURE_SAMPLES_PER_FRAME
            if request.frames_total == 0:
                await self._drop_request(request)
                raise ProtocolError(ErrorCode.BAD_AUDIO, "the audio is shorter than one video frame (40 ms)")
            if request.start.transport == "mse":
                revision = await asyncio.to_thread(self.node.engine.avatars.revision, request.start.avatar)
                request.clip_key = self._clip_key(request, revision)
            if request.clip_key and not request.media_started and self.node.clips.exists(request.clip_key):
                await self._serve_cached(request)
                return
        request.deliver(pcm)
        request.deliver(None)

    def _clip_key(self, request: Request, avatar_revision: str | None) -> str:
        stream = self.node.settings.stream
        return clip_key(
            engine=self.node.engine.name,
            avatar=request.start.avatar,
            avatar_revision=avatar_revision,
            audio=request.audio.digest,
            audio_spec=request.audio.spec.model_dump(),
            segment_s=stream.segment_s,
            crf=stream.video_crf,
            preset=stream.x264_preset,
            audio_bitrate=stream.audio_bitrate,
        )

    async def _serve_cached(self, request: Request) -> None:
        """The same clip was made before: stream it from the store and give back the queue place
        or the slot (nothing has been sent for this request yet)."""
        if self.state is SessionState.QUEUED:
            await self.node.admission.leave(request.ticket_id)
            self.node.forget_waiting(request.ticket_id)
            self.outbox.set_status(None)
        elif request.task is not None:
            await self._stop_serving(request)
        assert request.clip_key is not None
        path = self.node.clips.path(request.clip_key)
        frames = await send_cached_clip(path, self.outbox, self.node.settings.limits.max_message_bytes)
        self.node.metrics.clips_served.inc()
        self.outbox.send(
            encode("done", frames=frames, duration_s=round(frames / FPS, 3), clip=self.node.clips.url(request.clip_key))
        )
        self.request = None
        self.state = SessionState.IDLE

    def _offer(self, message: WebrtcOffer) -> None:
        request = self.request
        if self.state is not SessionState.STREAMING or request is None:
            raise ProtocolError(ErrorCode.NOT_GRANTED, "send webrtc_offer after granted")
        if request.offer is None or request.offer.done():
            raise ProtocolError(ErrorCode.BAD_MESSAGE, "this request takes no (further) WebRTC offer")
        request.offer.set_result((message.sdp, message.id))

    def _interrupt(self) -> None:
        request = self.request
        if request is None or not request.live:
            raise ProtocolError(ErrorCode.BAD_MESSAGE, "interrupt applies to a live session")
        request.pending.clear()
        if request.stream is not None:
            request.stream.interrupt()
        if request.rtc is not None:
            request.rtc.interrupt()

    # ----- from the node -----

    def queue_status(self, position: int, size: int, eta: float | None, *, force: bool) -> None:
        if self.state is not SessionState.QUEUED or self.identity is None:
            return
        if force or position != self._last_position:
            self._last_position = position
            self.outbox.set_status(queued_message(position, size, self.identity.tier, eta))

    def take_grant(self, grant: Grant) -> bool:
        """The dispatcher granted this session's ticket; False if the session can no longer use it."""
        request = self.request
        if self.state is not SessionState.QUEUED or request is None or request.ticket_id != grant.ticket.id:
            return False
        self.state = SessionState.STREAMING
        request.granted_at = time.monotonic()
        self.outbox.set_status(None)
        if self._last_position is None and self.identity is not None:
            # Granted in the round it joined: the client still hears that it joined the line.
            self.outbox.send(queued_message(1, len(self.node.waiting_sessions) + 1, self.identity.tier, None))
        self.outbox.send(encode("granted", waited_s=round(grant.waited_s, 3)))
        loop = asyncio.get_running_loop()
        if request.start.transport == "webrtc":
            request.offer = loop.create_future()
        request.task = loop.create_task(self._serve(request), name=f"serve-{request.ticket_id}")
        return True

    async def _serve(self, request: Request) -> None:
        node = self.node
        served = False
        try:
            avatar = await asyncio.to_thread(node.engine.avatars.get, request.start.avatar)
            if avatar is None:
                raise ProtocolError(ErrorCode.UNKNOWN_AVATAR, f"avatar {request.start.avatar!r} is gone")
            loop = asyncio.get_running_loop()
            ready = asyncio.Event()
            stream = node.engine.open_stream(
                avatar,
                StreamMode(request.start.mode),
                buffer_frames=node.settings.engine.stream_buffer_frames,
                # the WebRTC sender waits on the loop; the MSE encoder waits in its own thread
                on_output=(lambda: loop.call_soon_threadsafe(ready.set)) if request.offer is not None else None,
            )
            request.stream = stream
            for pcm in request.pending:
                request.deliver(pcm)
            request.pending.clear()
            limit = node.settings.limits.max_live_session_s if request.live else None
            try:
                async with asyncio.timeout(limit):
                    if request.offer is not None:
                        result = await self._serve_webrtc(request, stream, ready)
                    else:
                        sender = MseSender(
                            stream,
                            self.outbox,
                            node.settings.stream,
                            total_frames=lambda: request.frames_total,
                            open_clip=lambda: node.clips.writer(request.clip_key) if request.clip_key else None,
                            on_frames=node.metrics.frames.inc,
                            first_segment=lambda: setattr(request, "media_started", True),
                        )
                        result = await sender.run()
            finally:
                stream.cancel()
            if result.state is StreamState.FINISHED:
                served = True
                if result.clip_path is None:
                    request.clip_key = None
                self.outbox.send(
                    encode(
                        "done",
                        frames=result.frames,
                        duration_s=round(result.frames / FPS, 3),
                        clip=node.clips.url(request.clip_key) if request.clip_key else None,
                    )
                )
            elif result.state is StreamState.CANCELLED and result.error is not None:
                message = f"the media connection ended ({result.error!r}); the slot was released"
                self.send_error(ProtocolError(ErrorCode.INTERNAL, message))
            elif result.state is StreamState.FAILED:
                log.error("engine failed for %s: %r", request.ticket_id, result.error)
                self.send_error(ProtocolError(ErrorCode.INTERNAL, "the engine failed; the slot was released"))
        except OutboxClosed:
            pass
        except TimeoutError:
            served = True
            self.outbox.send(encode("done", frames=0, duration_s=node.settings.limits.max_live_session_s))
        except ProtocolError as exc:
            self.send_error(exc)
        except Exception:
            log.exception("serving %s failed", request.ticket_id)
            self.send_error(
                ProtocolError(ErrorCode.INTERNAL, "a server fault ended this stream; the slot was released")
            )
        finally:
            if self.request is request:
                self.request = None
                if self.state is SessionState.STREAMING:
                    self.state = SessionState.IDLE
            await node.release(
                request.ticket_id,
                served=served,
                mode=request.start.mode,
                held_s=time.monotonic() - request.granted_at,
            )

    async def _serve_webrtc(self, request: Request, stream: EngineStream, ready: asyncio.Event) -> StreamResult:
        """Wait for the client's offer, answer it, then pace the stream into the peer connection."""
        assert request.offer is not None
        settings = self.node.settings
        progress = ProgressReporter(self.outbox, lambda: request.frames_total)
        sender = WebRtcSender(
            stream,
            ready,
            [server.model_dump(exclude_none=True) for server in settings.stream.ice_servers],
            on_frames=lambda n: (self.node.metrics.frames.inc(n), progress.add(n)),
        )
        request.rtc = sender
        try:
            try:
                sdp, offer_id = await asyncio.wait_for(request.offer, settings.stream.webrtc_offer_timeout_s)
            except TimeoutError:
                raise ProtocolError(ErrorCode.BAD_MESSAGE, "no webrtc_offer came after granted") from None
            try:
                answer = await sender.answer(sdp)
            except ValueError as exc:
                raise ProtocolError(ErrorCode.BAD_MESSAGE, f"webrtc_offer: {exc}") from None
            self.outbox.send(encode("webrtc_answer", offer_id, sdp=answer))
            info = stream.avatar.info
            self.outbox.send(encode("stream", transport="webrtc", width=info.width, height=info.height, fps=FPS))
            result = await sender.run()
            progress.flush()
            return result
        finally:
            await sender.close()

    # ----- ending -----

    async def cancel(self) -> None:
        """Leave the queue or stop the stream; the socket stays usable."""
        request = self.request
        if request is not None:
            await self._drop_request(request)

    async def _drop_request(self, request: Request) -> None:
        if self.request is request:
            self.request = None
        if self.state is SessionState.QUEUED:
            self.state = SessionState.IDLE
            self.outbox.set_status(None)
            await self.node.admission.leave(request.ticket_id)
            self.node.forget_waiting(request.ticket_id)
        if request.stream is not None:
            request.stream.cancel()
        if request.task is not None and request.task is not asyncio.current_task():
            await self._stop_serving(request)

    async def _stop_serving(self, request: Request) -> None:
        """Cancel the serving task and give the slot back. A task cancelled before its first step
        never runs its own ``finally``, so the slot is released here too (release is idempotent)."""
        assert request.task is not None
        request.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await request.task
        await self.node.release(request.ticket_id, served=False, mode=request.start.mode)

    async def disconnected(self) -> None:
        """The socket closed: park a queued request for resume; stop anything else at once."""
        request = self.request
        if self.state is SessionState.QUEUED and request is not None:
            await self.node.admission.detach(request.ticket_id, time.monotonic())
            self.node.forget_waiting(request.ticket_id)
            self.node.park(self)
        elif request is not None:
            await self._drop_request(request)
        self.state = SessionState.CLOSED
        self.outbox.close()

    def send_error(self, err: ProtocolError, msg_id: object = None) -> None:
        self.node.metrics.rejections.labels(err.code.value).inc()
        self.outbox.send(error_message(err, msg_id))
        if err.close is not None:
            self.close_code = err.close
