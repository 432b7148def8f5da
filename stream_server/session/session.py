"""One client's session socket: its messages, checked by the state machine, and its one request.

A queued request whose socket closes is detached for the resume grace (its owner handle stays
with admission, and a resume rebinds it); a streaming one is stopped and its slot freed at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from dataclasses import dataclass

from inference.engine import FPS
from inference.pool import EnginePool
from inference.procs.process_pool import ProcessEnginePool
from stream_server.admission.admission import Admission
from stream_server.admission.policy import IdentityBusy, QueueFull
from stream_server.admission.store import Grant
from stream_server.audio_input import AudioInput
from stream_server.auth import Authenticator, Identity
from stream_server.dispatcher import Dispatcher
from stream_server.outbox import Outbox
from stream_server.protocol import (
    AudioEnd,
    AudioSpec,
    Cancel,
    ClientMessage,
    CloseCode,
    ErrorCode,
    Hello,
    Interrupt,
    JsonId,
    Limits,
    Ping,
    Pong,
    ProtocolError,
    Start,
    WebrtcOffer,
    Welcome,
)
from stream_server.ratelimit import RateLimiter
from stream_server.session.owner import RequestOwner
from stream_server.session.request import FINISHED_ERRORS, Request, RequestStatus
from stream_server.session.serving import Serving
from stream_server.session.state import Event, SessionStateMachine, SocketState
from stream_server.settings import Settings
from stream_server.upload_budget import UploadBudget


@dataclass(frozen=True)
class SessionServices:
    """What a session uses of its node."""

    settings: Settings
    auth: Authenticator
    engine: EnginePool | ProcessEnginePool
    admission: Admission[RequestOwner]
    dispatcher: Dispatcher[RequestOwner]
    serving: Serving
    start_limiter: RateLimiter
    upload_budget: UploadBudget


class Session:
    __slots__ = (
        "services", "outbox", "address", "id", "machine", "identity", "request", "bad_messages", "_requests",
        "close_code",
    )

    def __init__(self, services: SessionServices, outbox: Outbox, address: str) -> None:
        self.services = services
        self.outbox = outbox
        self.address = address
        self.id = secrets.token_urlsafe(12)
        self.machine = SessionStateMachine()
        self.identity: Identity | None = None
        self.request: Request | None = None
        self.bad_messages = 0
        self._requests = 0
        self.close_code: CloseCode | None = None

    @property
    def state(self) -> SocketState:
        return self.machine.state

    # ----- client messages -----

    async def handle(self, message: ClientMessage) -> None:
        if isinstance(message, Ping):
            self.outbox.send(Pong(id=message.id).encode())
        elif isinstance(message, Hello):
            await self._hello(message)
        elif isinstance(message, Start):
            await self._start(message)
        elif isinstance(message, AudioEnd):
            await self._audio_end()
        elif isinstance(message, Cancel):
            self.machine.check(Event.CANCEL)
            await self.cancel()
        elif isinstance(message, Interrupt):
            await self._interrupt()
        elif isinstance(message, WebrtcOffer):
            self._offer(message)

    async def handle_audio(self, data: bytes) -> None:
        self.machine.check(Event.AUDIO)
        request = self.request
        assert request is not None
        if request.audio.complete:
            raise ProtocolError(ErrorCode.BAD_MESSAGE, "binary audio after audio_end: the clip's audio is complete")
        try:
            pcm = await request.audio.add(data)
        except ProtocolError:
            await self._drop_request(request)
            raise
        if pcm is not None:
            request.deliver(pcm)

    async def _hello(self, message: Hello) -> None:
        self.machine.check(Event.HELLO)
        services = self.services
        self.identity = services.auth.identify(message.token, self.address)
        owner = await self._resume(message.resume, self.identity) if message.resume else None
        self.machine.apply(Event.HELLO if owner is None else Event.RESUME)
        self.outbox.send(
            Welcome(
                session=self.id,
                tier=self.identity.tier,
                resume=services.auth.resume_token(self.id),
                engine=services.engine.name,
                limits=self._limits(),
                id=message.id,
            ).encode()
        )
        if message.resume and owner is None:
            reply = FINISHED_ERRORS[RequestStatus.EXPIRED]
            assert reply is not None
            raise ProtocolError(*reply)

    async def _resume(self, token: str, identity: Identity) -> RequestOwner | None:
        """Take back a detached request, if the token is genuine, in time and the same identity's.
        A resume that fails leaves the detached request as it was."""
        admission = self.services.admission
        session_id = self.services.auth.session_from_resume(token)
        ticket_id = admission.parked(session_id) if session_id else None
        if ticket_id is None or await admission.reattach(ticket_id, identity.key, time.monotonic()) is None:
            return None
        owner = admission.owner(ticket_id)
        assert owner is not None and session_id is not None
        owner.rebind(self.outbox, self._take_grant)
        self.id = session_id
        self.request = owner.request
        self.request.status = RequestStatus.WAITING
        self._requests = int(ticket_id.rsplit(":", 1)[1])
        return owner

    def _limits(self) -> Limits:
        limits = self.services.settings.limits
        return Limits(
            max_audio_seconds=limits.max_audio_seconds,
            max_audio_bytes=limits.max_audio_bytes,
            max_message_bytes=limits.max_message_bytes,
            max_live_session_s=limits.max_live_session_s,
            fps=FPS,
        )

    async def _start(self, message: Start) -> None:
        self.machine.check(Event.START)
        assert self.identity is not None
        services = self.services
        services.auth.ensure_current(self.identity)
        wait = services.start_limiter.allow(self.identity.key, time.monotonic())
        if wait > 0:
            raise ProtocolError(ErrorCode.RATE_LIMITED, "too many start messages", retry_after_s=wait)
        avatar = await asyncio.to_thread(services.engine.avatars.info, message.avatar)
        if avatar is None or not avatar.ready:
            raise ProtocolError(ErrorCode.UNKNOWN_AVATAR, f"no ready avatar {message.avatar!r}")
        spec = message.audio
        if spec is None:
            if message.mode == "clip":
                raise ProtocolError(ErrorCode.BAD_MESSAGE, "start: a clip needs audio: {\"format\": ...}")
            spec = AudioSpec(format="pcm_s16le", sample_rate=16_000, channels=1)
        limits = services.settings.limits
        services.upload_budget.check_room()
        audio = AudioInput(
            spec,
            live=message.mode == "live",
            max_seconds=limits.max_audio_seconds,
            max_bytes=limits.max_audio_bytes,
            budget=services.upload_budget,
            spool_bytes=limits.audio_spool_bytes,
        )
        self._requests += 1
        request = Request(f"{self.id}:{self._requests}", message, audio)
        owner = RequestOwner(self.id, self.identity.tier, request, self.outbox, self._take_grant)
        try:
            await services.admission.join(
                request.ticket_id, self.identity.key, self.identity.tier, message.avatar, time.monotonic(), owner
            )
        except QueueFull as exc:
            audio.close()
            raise ProtocolError(ErrorCode.QUEUE_FULL, exc.reason, retry_after_s=exc.retry_after_s) from None
        except IdentityBusy as exc:
            audio.close()
            raise ProtocolError(ErrorCode.BUSY, str(exc)) from None
        self.request = request
        self.machine.apply(Event.START)

    async def _audio_end(self) -> None:
        self.machine.check(Event.AUDIO_END)
        request = self.request
        assert request is not None
        if not request.live and request.audio.complete:
            raise ProtocolError(ErrorCode.BAD_MESSAGE, "audio_end was already sent for this clip")
        try:
            pcm = await request.audio.end()
        except ProtocolError:
            await self._drop_request(request)
            raise
        if request is not self.request:
            return
        if not request.live:
            request.frames_total = request.audio.frames
            if request.frames_total == 0:
                await self._drop_request(request)
                raise ProtocolError(ErrorCode.BAD_AUDIO, "the audio is shorter than one video frame (40 ms)")
            if await self.services.serving.find_cached(request) and request is self.request:
                await self._replay(request)
                return
        if pcm is not None:
            request.deliver(pcm)
            request.deliver(None)

    async def _replay(self, request: Request) -> None:
        """The same clip was made before: give back the queue place or the slot (nothing has been
        sent for this request yet) and stream it from the store."""
        self.request = None
        self.machine.apply(Event.END)
        if request.status is RequestStatus.WAITING:
            self.outbox.set_status(None)
            await self.services.admission.leave(request.ticket_id)
        elif request.task is not None:
            await self._stop_serving(request)
        request.audio.close()
        await self.services.serving.replay(request, self.outbox)
        request.status = RequestStatus.FINISHED

    def _offer(self, message: WebrtcOffer) -> None:
        self.machine.check(Event.OFFER)
        request = self.request
        assert request is not None
        if request.offer is None or request.offer.done():
            raise ProtocolError(ErrorCode.BAD_MESSAGE, "this request takes no (further) WebRTC offer")
        request.offer.set_result((message.sdp, message.id))

    async def _interrupt(self) -> None:
        self.machine.check(Event.INTERRUPT)
        request = self.request
        assert request is not None
        if not request.live:
            raise ProtocolError(ErrorCode.BAD_MESSAGE, "interrupt applies to a live session")
        await request.audio.interrupt()
        if request.stream is not None:
            request.stream.interrupt()
        if request.rtc is not None:
            request.rtc.interrupt()

    # ----- the grant, through the owner handle -----

    def _take_grant(self, grant: Grant) -> bool:
        """This session's ticket was granted; False if the session can no longer use it."""
        request = self.request
        if not self.machine.allows(Event.GRANT) or request is None or request.ticket_id != grant.ticket.id:
            return False
        self.machine.apply(Event.GRANT)
        request.status = RequestStatus.GRANTED
        request.granted_at = time.monotonic()
        loop = asyncio.get_running_loop()
        if request.start.transport == "webrtc":
            request.offer = loop.create_future()
        request.task = loop.create_task(self._serve(request), name=f"serve-{request.ticket_id}")
        return True

    async def _serve(self, request: Request) -> None:
        status = RequestStatus.CANCELLED
        try:
            status = await self.services.serving.serve(request, self.outbox)
        finally:
            request.audio.close()
            request.status = status
            if self.request is request:
                self.request = None
                if self.state is SocketState.STREAMING:
                    self.machine.apply(Event.END)
            await self.services.dispatcher.release(
                request.ticket_id,
                served=status in (RequestStatus.FINISHED, RequestStatus.TIME_LIMIT),
                mode=request.start.mode,
                held_s=time.monotonic() - request.granted_at,
            )

    # ----- ending -----

    async def cancel(self) -> None:
        """Leave the queue or stop the stream; the socket stays usable."""
        request = self.request
        if request is not None:
            await self._drop_request(request)

    async def _drop_request(self, request: Request) -> None:
        request.audio.close()
        if self.request is request:
            self.request = None
            self.machine.apply(Event.END)
            self.outbox.set_status(None)
        waiting = request.status is RequestStatus.WAITING
        request.status = RequestStatus.CANCELLED
        if waiting:
            await self.services.admission.leave(request.ticket_id)
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
        await self.services.dispatcher.release(request.ticket_id, served=False, mode=request.start.mode)

    async def disconnected(self) -> None:
        """The socket closed: detach a queued request for resume; stop anything else at once."""
        request = self.request
        if self.state is SocketState.QUEUED and request is not None:
            await self.services.admission.detach(request.ticket_id, time.monotonic())
            request.status = RequestStatus.DETACHED
        elif request is not None:
            await self._drop_request(request)
        if self.machine.allows(Event.CLOSE):
            self.machine.apply(Event.CLOSE)
        self.outbox.close()

    def send_error(self, err: ProtocolError, msg_id: JsonId = None) -> None:
        self.services.serving.send_error(self.outbox, err, msg_id)
        if err.close is not None:
            self.close_code = err.close
