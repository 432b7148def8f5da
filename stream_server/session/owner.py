"""A waiting request's ticket owner: its queue status goes to the outbox, its grant to the session."""

from __future__ import annotations

from collections.abc import Callable

from stream_server.admission.owner import TicketOwner
from stream_server.admission.store import Grant
from stream_server.outbox import Outbox
from stream_server.protocol import ErrorCode, Granted, ProtocolError, Queued, Redirect, error_message
from stream_server.session.request import Request


class RequestOwner(TicketOwner):
    """The handle admission keeps for a ticket: it survives the socket for the resume grace, and
    a resumed session rebinds it to its own outbox."""

    __slots__ = ("tier", "request", "outbox", "adopted", "_start", "_hand_off", "_last_position")

    def __init__(
        self,
        resume_key: str,
        tier: str,
        request: Request,
        outbox: Outbox,
        start: Callable[[Grant], bool],
        hand_off: Callable[[], bool],
        *,
        placed: bool = False,
    ) -> None:
        self.resume_key = resume_key
        self.tier = tier
        self.request = request
        self.outbox = outbox
        self._start = start
        self._hand_off = hand_off
        self._last_position: int | None = 0 if placed else None
        """The last position pushed; 0: the client heard of its place elsewhere (a redirect)."""
        self.adopted = False
        """Taken over from a node that went away (its audio did not come along)."""

    def rebind(self, outbox: Outbox, start: Callable[[Grant], bool], hand_off: Callable[[], bool]) -> None:
        self.adopted = False
        self.outbox = outbox
        self._start = start
        self._hand_off = hand_off
        self._last_position = None

    def queued(self, position: int, queue_size: int, eta_s: float | None, *, force: bool) -> None:
        if force or position != self._last_position:
            self._last_position = position
            self.outbox.set_status(self._queued(position, queue_size, eta_s))

    def _queued(self, position: int, queue_size: int, eta_s: float | None) -> str:
        eta = None if eta_s is None else round(eta_s, 1)
        return Queued(position=position, queue_size=queue_size, tier=self.tier, eta_s=eta).encode()

    def forgotten(self) -> None:
        self.request.audio.close()

    def granted(self, grant: Grant) -> bool:
        if self.outbox.closed or not self._start(grant):
            return False
        self.outbox.set_status(None)
        if self._last_position is None:
            # Granted in the round it joined: the client still hears that it joined the line.
            self.outbox.send(self._queued(1, grant.queue_size + 1, None))
        self.outbox.send(Granted(waited_s=round(grant.waited_s, 3)).encode())
        return True

    def lost(self, reason: str) -> None:
        if self.outbox.closed or not self._hand_off():
            return
        self.outbox.set_status(None)
        self.outbox.send(error_message(ProtocolError(ErrorCode.INTERNAL, reason, retry_after_s=1.0)).encode())

    def redirected(self, grant: Grant, url: str, token: str) -> bool:
        if self.outbox.closed or not self._hand_off():
            return False
        self.outbox.set_status(None)
        if self._last_position is None:
            self.outbox.send(self._queued(1, grant.queue_size + 1, None))
        self.outbox.send(Redirect(url=url, grant=token).encode())
        return True
