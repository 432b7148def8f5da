"""Where tickets live: the interface every admission backend implements.

The in-process backend (``memory.py``) is the embedded default; a Redis backend shares one queue
between nodes. Each method is one atomic step: in particular ``grant`` checks for a free slot,
pops the first ticket and reserves the slot for it at once.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

from stream_server.admission.policy import Ticket


@dataclass(frozen=True)
class Grant:
    ticket: Ticket
    granted_at: float

    @property
    def waited_s(self) -> float:
        return max(0.0, self.granted_at - self.ticket.joined_at)


@dataclass(frozen=True)
class QueueView:
    """The waiting tickets in grant order, the busy slots and the estimates for each ticket."""

    waiting: list[Ticket]
    eta_s: list[float | None]
    slots_total: int
    slots_busy: int
    busy: list[tuple[str, float]]


class AdmissionQueue(ABC):
    @abstractmethod
    async def join(self, ticket_id: str, identity: str, tier: str, avatar: str, now: float) -> Ticket:
        """Add a ticket, or raise ``QueueFull`` / ``IdentityBusy``: the check and the insert are one step."""

    @abstractmethod
    async def leave(self, ticket_id: str) -> Ticket | None:
        """Remove a waiting ticket for good (cancel); ``None`` if it was not waiting."""

    @abstractmethod
    async def detach(self, ticket_id: str, now: float) -> Ticket | None:
        """The ticket's socket closed: take it out of the line, keep it for the resume grace."""

    @abstractmethod
    async def reattach(self, ticket_id: str, now: float) -> Ticket | None:
        """Put a detached ticket back at its old place; ``None`` if unknown or expired."""

    @abstractmethod
    async def grant(self, now: float) -> Grant | None:
        """Pop the first ticket and reserve a slot for it, if a slot is free and anyone waits."""

    @abstractmethod
    async def release(self, ticket_id: str, now: float, *, served: bool = True) -> None:
        """Free the slot held by ``ticket_id``; a served session's duration feeds the estimates."""

    @abstractmethod
    async def view(self, now: float) -> QueueView:
        """The whole line in grant order with each ticket's estimated wait."""

    @abstractmethod
    async def set_slots(self, total: int) -> None:
        """Capacity changed (workers measured, started or stopped)."""
