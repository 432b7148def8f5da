"""One ``start``: the request record and its status, from waiting to the reason it finished."""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Callable
from dataclasses import dataclass

from inference.serving_engine import ServedStream
from stream_server.audio_input import AudioInput, Pcm
from stream_server.protocol import ErrorCode, JsonId, Start
from stream_server.transports.webrtc import WebRtcSender


class RequestStatus(enum.IntEnum):
    """A request's lifecycle; the finished ones are ordered last."""

    WAITING = 0
    DETACHED = 1
    """Waiting, with its socket closed: held for the resume grace."""
    GRANTED = 2
    STREAMING = 3
    FINISHED = 10
    """Complete: ``done``."""
    TIME_LIMIT = 11
    """A live session reached ``max_live_session_s``, or had no audio for
    ``live_idle_timeout_s``: ``done`` without a clip."""
    CANCELLED = 12
    """By the client (``cancel``, a disconnect) or a peer connection that never came: no reply."""
    REFUSED = 13
    """Ended by a client error (bad audio, no offer, ...): the error names its own code."""
    EXPIRED = 14
    STALLED = 18
    """The client read nothing for ``stream.stall_timeout_s``: its connection was aborted (and
    counted as a ``stalled`` error, which cannot reach it)."""
    MEDIA_LOST = 15
    ENGINE_FAILED = 16
    FAILED = 17

    @property
    def finished(self) -> bool:
        return self >= RequestStatus.FINISHED


FINISHED_ERRORS: dict[RequestStatus, tuple[ErrorCode, str] | None] = {
    RequestStatus.FINISHED: None,
    RequestStatus.TIME_LIMIT: None,
    RequestStatus.CANCELLED: None,
    RequestStatus.REFUSED: None,
    RequestStatus.EXPIRED: (
        ErrorCode.SESSION_EXPIRED, "the session to resume is unknown or its grace period is over"
    ),
    RequestStatus.STALLED: None,
    RequestStatus.MEDIA_LOST: (ErrorCode.INTERNAL, "the media connection ended ({detail}); the slot was released"),
    RequestStatus.ENGINE_FAILED: (ErrorCode.INTERNAL, "the engine failed; the slot was released"),
    RequestStatus.FAILED: (ErrorCode.INTERNAL, "a server fault ended this stream; the slot was released"),
}
"""The one table of what a client hears when its request ends in an error (``{detail}``: the cause)."""
SERVED = frozenset({RequestStatus.FINISHED, RequestStatus.TIME_LIMIT})
LIVE_SERVED = SERVED | {RequestStatus.CANCELLED, RequestStatus.STALLED}


@dataclass(slots=True, eq=False)
class Request:
    """One ``start``: its ticket, its audio and, once granted, its engine stream."""

    ticket_id: str
    start: Start
    audio: AudioInput
    status: RequestStatus = RequestStatus.WAITING
    frames_total: int | None = None
    clip_key: str | None = None
    stream: ServedStream | None = None
    task: asyncio.Task[None] | None = None
    granted_at: float = 0.0
    media_started: bool = False
    offer: asyncio.Future[tuple[str, JsonId]] | None = None
    rtc: WebRtcSender | None = None
    on_audio: Callable[[], None] | None = None
    """Told of each piece of audio that arrives while the request is served (the live idle timer)."""

    @property
    def live(self) -> bool:
        return self.start.mode == "live"

    def measures(self, status: RequestStatus) -> bool:
        """Whether a request that ended in ``status`` held its slot as long as such a request
        does, which the estimates learn from: a clip once it finished; a live session also when
        its client ended it (``cancel``, a disconnect, a stall), as a live session has no end of
        its own. Never a fault or a refusal."""
        return status in (LIVE_SERVED if self.live else SERVED)

    def deliver(self, pcm: Pcm | None) -> None:
        """Audio (or, as ``None``, the end of it) for the granted engine stream; while the request
        waits, its audio stays in ``audio`` as received."""
        assert self.stream is not None
        if pcm is None:
            self.stream.end_audio()
        else:
            self.stream.feed(*pcm)
