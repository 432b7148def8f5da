"""One client's session socket: its messages, checked by the state machine, and its one request.

A queued request whose socket closes is detached for the resume grace (its owner handle stays
with admission, and a resume rebinds it); a streaming one is stopped and its slot freed at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from inference.engine import FPS
from inference.serving_engine import ServingEngine
from stream_server.admission.admission import Admission
from stream_server.admission.policy import IdentityBusy, QueueFull, Ticket
from stream_server.admission.store import Grant, StoreUnavailable
from stream_server.audio_input import AudioInput
from stream_server.auth import Authenticator, Identity
from stream_server.cluster.grants import is_grant_token
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
    parse_client_message,
)
from stream_server.ratelimit import RateLimiter
from stream_server.session.owner import RequestOwner
from stream_server.session.request import FINISHED_ERRORS, Request, RequestStatus
from stream_server.session.serving import CachedClip, Serving
from stream_server.session.state import Event, SessionStateMachine, SocketState
from stream_server.settings import Settings
from stream_server.templates import Template, TemplateLibrary
from stream_server.upload_budget import UploadBudget

log = logging.getLogger(__name__)
STORE_RETRY_S = 2.0
"""retry_after_s suggested while the shared queue store is unreachable."""
EXPIRY_MARGIN_S = 0.05
"""The expiry timer fires this much after ``exp + grace``, so that the check it makes agrees."""


@dataclass(frozen=True)
class SessionServices:
    """What a session uses of its node."""

    settings: Settings
    auth: Authenticator
    engine: ServingEngine
    admission: Admission[RequestOwner]
    dispatcher: Dispatcher[RequestOwner]
    serving: Serving
    start_limiter: RateLimiter
    templates: TemplateLibrary
    yield_background: Callable[[], None]
    """Stop background work (pre-generation) before a user's ticket joins."""
    upload_budget: UploadBudget


class Session:
    __slots__ = (
        "services", "outbox", "address", "id", "machine", "identity", "request", "bad_messages", "_requests",
        "close_code", "handoff", "hang_up", "_expiry", "_ending",
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
        self.handoff: Grant | None = None
        """A grant another node made for a slot here, taken up by ``hello{resume: grant}``: the
        next ``start`` streams at once."""
        self.hang_up: Callable[[CloseCode], Awaitable[None]] | None = None
        """Closes the socket from outside its receive loop (the app sets it)."""
        self._expiry: asyncio.TimerHandle | None = None
        self._ending: asyncio.Task[None] | None = None

    @property
    def state(self) -> SocketState:
        return self.machine.state

    # ----- client messages -----

    async def handle(self, message: ClientMessage) -> None:
        try:
            await self._handle(message)
        except StoreUnavailable as exc:
            raise ProtocolError(
                ErrorCode.INTERNAL, f"{exc}; nothing was changed, try again", retry_after_s=STORE_RETRY_S
            ) from None

    async def _handle(self, message: ClientMessage) -> None:
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
        if request.start.template is not None:
            raise ProtocolError(ErrorCode.BAD_MESSAGE, "a template request takes no audio: the template is its audio")
        if request.audio.complete:
            raise ProtocolError(ErrorCode.BAD_MESSAGE, "binary audio after audio_end: the clip's audio is complete")
        try:
            pcm = await request.audio.add(data)
        except ProtocolError:
            await self._drop_request(request)
            raise
        if request.on_audio is not None:
            request.on_audio()
        if pcm is not None:
            request.deliver(pcm)

    async def _hello(self, message: Hello) -> None:
        self.machine.check(Event.HELLO)
        services = self.services
        self.identity = services.auth.identify(message.token, self.address)
        resume = message.resume
        owner = None
        if resume and is_grant_token(resume):
            self.handoff = await self._take_handoff(resume, self.identity)
        elif resume:
            owner = await self._resume(resume, self.identity)
        audio_lost = (
            owner is not None and owner.adopted and not owner.request.live and owner.request.start.template is None
        )
        self.machine.apply(Event.HELLO if owner is None else Event.RESUME)
        self._watch_expiry(self.identity)
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
        if resume and is_grant_token(resume) and self.handoff is None:
            raise ProtocolError(ErrorCode.SESSION_EXPIRED, "the grant is unknown, was used already, or expired")
        if resume and not is_grant_token(resume) and owner is None:
            reply = FINISHED_ERRORS[RequestStatus.EXPIRED]
            assert reply is not None
            raise ProtocolError(*reply)
        if audio_lost:
            raise ProtocolError(
                ErrorCode.BAD_AUDIO,
                "resumed on another node: the clip keeps its place, but its audio stayed on the node that "
                "went away; send the audio (and audio_end) again",
            )

    async def _resume(self, token: str, identity: Identity) -> RequestOwner | None:
        """Take back a detached request, if the token is genuine, in time and the same identity's.
        A resume that fails leaves the detached request as it was."""
        admission = self.services.admission
        session_id = self.services.auth.session_from_resume(token)
        ticket_id = await admission.parked(session_id) if session_id else None
        if ticket_id is None or session_id is None:
            return None
        ticket = await admission.reattach(ticket_id, identity.key, admission.clock())
        if ticket is None:
            return None
        owner = admission.owner(ticket_id)
        if owner is None:
            owner = await self._adopt(session_id, ticket)
        else:
            owner.rebind(self.outbox, self._take_grant, self._hand_off)
        self.id = session_id
        self.request = owner.request
        self.request.status = RequestStatus.WAITING
        self._requests = int(ticket_id.rsplit(":", 1)[1])
        return owner

    async def _adopt(self, session_id: str, ticket: Ticket) -> RequestOwner:
        """A resume of a ticket whose node went away: its ``start`` came with it in the shared
        store, its audio did not (the client sends it again: see ``_hello``; a template's audio
        is this node's own)."""
        assert self.identity is not None
        message = parse_client_message(ticket.meta["request"])
        assert isinstance(message, Start)
        template = self._template(message)
        audio = self._audio_input(message, template)
        request = Request(ticket.id, message, audio)
        if template is not None:
            await self._keep_template_audio(audio, template)
            request.frames_total = audio.frames
        owner = RequestOwner(session_id, self.identity.tier, request, self.outbox, self._take_grant, self._hand_off)
        owner.adopted = True
        self.services.admission.adopt(ticket.id, owner)
        return owner

    async def _take_handoff(self, token: str, identity: Identity) -> Grant | None:
        """The grant a client brought from the node that holds its ticket, if it is genuine, for
        this node, in time, unused and the same identity's (a wrong identity's gives its slot back)."""
        services = self.services
        admission = services.admission
        tokens = services.dispatcher.grant_tokens
        now = admission.clock()
        claim = tokens.verify(token, now) if tokens is not None else None
        if claim is None or claim.node != admission.node_id:
            return None
        ticket = await admission.take_handoff(claim.handoff, now)
        if ticket is None:
            return None
        if ticket.identity != identity.key:
            await services.dispatcher.release(ticket.id, served=False)
            return None
        return Grant(ticket, now, 0, node=admission.node_id, owner_node=admission.node_id)
    def _watch_expiry(self, identity: Identity) -> None:
        """One timer per socket with an ``exp``, at ``exp + auth.exp_grace_s``: then the
        session ends whatever its state (nothing runs for the sockets in between)."""
        if identity.expires_at is None:
            return
        delay = identity.expires_at + self.services.settings.auth.exp_grace_s - time.time()
        self._expiry = asyncio.get_running_loop().call_later(max(0.0, delay) + EXPIRY_MARGIN_S, self._token_expired)

    def _token_expired(self) -> None:
        self._expiry = None
        self._ending = asyncio.get_running_loop().create_task(self._end_expired(), name=f"expired-{self.id}")

    async def _end_expired(self) -> None:
        """The token is past its grace: drop the request (freeing its place or slot), then say
        ``invalid_token`` and close with 4401."""
        assert self.identity is not None
        try:
            self.services.auth.ensure_current(self.identity)
        except ProtocolError as err:
            expired = err
        else:  # the wall clock went back: not yet expired after all
            self._watch_expiry(self.identity)
            return
        if self.request is not None:
            await self._drop_request(self.request)
        self.send_error(expired)
        if self.hang_up is not None:
            await self.hang_up(CloseCode.INVALID_TOKEN)

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
        template = self._template(message)
        services.upload_budget.check_room()
        audio = self._audio_input(message, template)
        if template is not None:  # its audio is kept (and validated) now, decoded at the grant
            await self._keep_template_audio(audio, template)
        if self.handoff is not None:
            await self._start_handed_off(self.handoff, message, audio)
            return
        self._requests += 1
        request = Request(f"{self.id}:{self._requests}", message, audio)
        hot = services.engine.hot.record(message.avatar) > services.engine.hot.hot_after
        if template is not None:
            request.frames_total = audio.frames
            cached = await services.serving.find_cached(request)
            if cached is not None:  # rendered before: answered now, never queued
                audio.close()
                await services.serving.replay(cached, self.outbox)
                return
        owner = RequestOwner(self.id, self.identity.tier, request, self.outbox, self._take_grant, self._hand_off)
        services.yield_background()
        try:
            admission = services.admission
            await admission.join(
                request.ticket_id, self.identity.key, self.identity.tier, message.avatar, admission.clock(), owner,
                hot=hot,
                request=message.model_dump_json(exclude={"id"}),
                mode=message.mode,
            )
        except QueueFull as exc:
            audio.close()
            raise ProtocolError(ErrorCode.QUEUE_FULL, exc.reason, retry_after_s=exc.retry_after_s) from None
        except IdentityBusy as exc:
            audio.close()
            raise ProtocolError(ErrorCode.BUSY, str(exc)) from None
        self.request = request
        self.machine.apply(Event.START)

    def _template(self, message: Start) -> Template | None:
        """The template a ``start`` names (clip mode, no audio of its own), or ``None``."""
        if message.template is None:
            return None
        if message.mode != "clip" or message.audio is not None:
            raise ProtocolError(ErrorCode.BAD_MESSAGE, "start: a template is a clip with no audio of its own")
        template = self.services.templates.get(message.template)
        if template is None:
            known = ", ".join(self.services.templates.ids()) or "none"
            raise ProtocolError(ErrorCode.BAD_MESSAGE, f"start: no template {message.template!r} (known: {known})")
        return template
    @staticmethod
    async def _keep_template_audio(audio: AudioInput, template: Template) -> None:
        try:
            await audio.add(await asyncio.to_thread(template.read_audio))
            await audio.end()
        except ProtocolError:
            audio.close()
            raise

    def _audio_input(self, message: Start, template: Template | None) -> AudioInput:
        spec = message.audio
        if template is not None:
            spec = AudioSpec(format=template.format)  # type: ignore[arg-type]
        elif spec is None:
            if message.mode == "clip":
                raise ProtocolError(ErrorCode.BAD_MESSAGE, "start: a clip needs audio: {\"format\": ...}")
            spec = AudioSpec(format="pcm_s16le", sample_rate=16_000, channels=1)
        limits = self.services.settings.limits
        return AudioInput(
            spec,
            live=message.mode == "live",
            max_seconds=limits.max_audio_seconds,
            max_bytes=limits.max_audio_bytes,
            budget=self.services.upload_budget,
            spool_bytes=limits.audio_spool_bytes,
        )

    async def _start_handed_off(self, grant: Grant, message: Start, audio: AudioInput) -> None:
        """The ``start`` after a redirect: its slot here is reserved already, it streams at once."""
        assert self.identity is not None
        self.handoff = None
        request = Request(grant.ticket.id, message, audio)
        if message.template is not None:
            request.frames_total = audio.frames
        owner = RequestOwner(
            self.id, self.identity.tier, request, self.outbox, self._take_grant, self._hand_off, placed=True
        )
        self.services.admission.serve(grant, owner)
        self.request = request
        self.machine.apply(Event.START)
        if not owner.granted(grant):
            await self._drop_request(request)
            await self.services.dispatcher.release(request.ticket_id, served=False)

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
            cached = await self.services.serving.find_cached(request)
            if cached is not None and request is self.request:
                await self._replay(request, cached)
                return
        if pcm is not None:
            request.deliver(pcm)
            request.deliver(None)

    async def _replay(self, request: Request, clip: CachedClip) -> None:
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
        await self.services.serving.replay(clip, self.outbox)
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

    def _hand_off(self) -> bool:
        """This session's ticket was granted a slot on another node, where the client goes with
        the grant (it sends its ``start`` and audio there again): the request ends here."""
        request = self.request
        if self.state is not SocketState.QUEUED or request is None:
            return False
        self.request = None
        self.machine.apply(Event.END)
        request.status = RequestStatus.FINISHED
        request.audio.close()
        return True

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
                served=request.measures(status),
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
        if self.handoff is not None:
            await self.services.dispatcher.release(self.handoff.ticket.id, served=False)
            self.handoff = None
        try:
            if self.state is SocketState.QUEUED and request is not None:
                await self.services.admission.detach(request.ticket_id, self.services.admission.clock())
                request.status = RequestStatus.DETACHED
            elif request is not None:
                await self._drop_request(request)
        except StoreUnavailable as exc:
            # The ticket stays in the shared line without an owner here: granted, it is released.
            log.warning("session %s closed while the queue store was unreachable: %s", self.id, exc)
        if self.machine.allows(Event.CLOSE):
            self.machine.apply(Event.CLOSE)
        if self._expiry is not None:
            self._expiry.cancel()
        self.outbox.close()

    def send_error(self, err: ProtocolError, msg_id: JsonId = None) -> None:
        self.services.serving.send_error(self.outbox, err, msg_id)
        if err.close is not None:
            self.close_code = err.close
