"""The handle through which admission reaches a ticket's owner on this node."""

from __future__ import annotations

from abc import ABC, abstractmethod

from stream_server.admission.store import Grant


class TicketOwner(ABC):
    """Who waits for a ticket: the dispatcher pushes it queue status and hands it the grant.
    Neither call may block or await: a thousand owners hear from one dispatcher round."""

    __slots__ = ("resume_key",)
    resume_key: str
    """What a resume names this owner by (the session id that the resume token carries)."""

    @abstractmethod
    def queued(self, position: int, queue_size: int, eta_s: float | None, *, force: bool) -> None:
        """The ticket's place in line; ``force`` for a heartbeat even if nothing changed."""

    @abstractmethod
    def granted(self, grant: Grant) -> bool:
        """The ticket was granted a slot; False if the owner can no longer use it."""

    @abstractmethod
    def forgotten(self) -> None:
        """The detached ticket is gone for good: its resume grace is over, or a new join of its
        identity superseded it (free what it holds)."""

    @abstractmethod
    def lost(self, reason: str) -> None:
        """The ticket is gone with the shared line (Redis restarted empty): tell the client."""

    @abstractmethod
    def redirected(self, grant: Grant, url: str, token: str) -> bool:
        """The ticket was granted a slot on another node: send the client there with the signed
        grant ``token``; False if the owner can no longer pass it on."""
