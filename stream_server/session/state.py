"""The session socket's state machine: one transition table, every step checked in one place.

    NEW --hello--> IDLE --start--> QUEUED --grant--> STREAMING --end--> IDLE ...
    NEW --hello with resume--> QUEUED;  any --close--> CLOSED

Binary audio, ``audio_end`` and ``interrupt`` need a request (QUEUED or STREAMING), a
``webrtc_offer`` a granted one. A step the table does not allow raises the ``ProtocolError`` the
client sees, and changes nothing.
"""

from __future__ import annotations

import enum

from stream_server.protocol import ErrorCode, ProtocolError


class SocketState(enum.Enum):
    NEW = "new"
    IDLE = "idle"
    QUEUED = "queued"
    STREAMING = "streaming"
    CLOSED = "closed"


class Event(enum.Enum):
    HELLO = "hello"
    RESUME = "resume"
    START = "start"
    GRANT = "grant"
    AUDIO = "audio"
    AUDIO_END = "audio_end"
    OFFER = "webrtc_offer"
    INTERRUPT = "interrupt"
    CANCEL = "cancel"
    END = "end"
    """The request is over: done, an error that ends it, cancelled, or replayed from the cache."""
    CLOSE = "close"


S, E = SocketState, Event
TRANSITIONS: dict[tuple[SocketState, Event], SocketState] = {
    (S.NEW, E.HELLO): S.IDLE,
    (S.NEW, E.RESUME): S.QUEUED,
    (S.IDLE, E.START): S.QUEUED,
    (S.IDLE, E.CANCEL): S.IDLE,
    (S.QUEUED, E.GRANT): S.STREAMING,
    **{(s, e): s for s in (S.QUEUED, S.STREAMING) for e in (E.AUDIO, E.AUDIO_END, E.INTERRUPT)},
    (S.STREAMING, E.OFFER): S.STREAMING,
    **{(s, e): S.IDLE for s in (S.QUEUED, S.STREAMING) for e in (E.CANCEL, E.END)},
    **{(s, E.CLOSE): S.CLOSED for s in SocketState if s is not S.CLOSED},
}

REFUSALS: dict[Event, tuple[ErrorCode, str]] = {
    E.HELLO: (ErrorCode.BAD_MESSAGE, "hello was already said"),
    E.RESUME: (ErrorCode.BAD_MESSAGE, "hello was already said"),
    E.START: (ErrorCode.BUSY, "this socket already has an active request; cancel it first"),
    E.AUDIO: (ErrorCode.BAD_MESSAGE, "binary audio needs a start first"),
    E.AUDIO_END: (ErrorCode.BAD_MESSAGE, "audio_end needs a start first"),
    E.OFFER: (ErrorCode.NOT_GRANTED, "send webrtc_offer after granted"),
    E.INTERRUPT: (ErrorCode.BAD_MESSAGE, "interrupt applies to a live session"),
}
"""What the client hears for a step its state does not allow (after ``hello``)."""


HISTORY = 32


class SessionStateMachine:
    __slots__ = ("state", "history")

    def __init__(self) -> None:
        self.state = SocketState.NEW
        self.history: list[SocketState] = [SocketState.NEW]
        """The states it went through, the last ``HISTORY`` of them (a list: a deque costs a
        thousand waiting sockets half a megabyte)."""

    def allows(self, event: Event) -> bool:
        return (self.state, event) in TRANSITIONS

    def check(self, event: Event) -> None:
        """Raise the client's error if ``event`` may not happen now."""
        if self.allows(event):
            return
        if self.state is SocketState.NEW:
            raise ProtocolError(ErrorCode.BAD_MESSAGE, "the first message must be hello")
        code, message = REFUSALS.get(event, (ErrorCode.BAD_MESSAGE, f"{event.value} is not allowed now"))
        raise ProtocolError(code, message)

    def apply(self, event: Event) -> SocketState:
        """Check ``event`` and take its transition."""
        self.check(event)
        new = TRANSITIONS[(self.state, event)]
        if new is not self.state:
            self.history.append(new)
            if len(self.history) > HISTORY:
                del self.history[0]
        self.state = new
        return new
