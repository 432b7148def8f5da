"""Where tickets live: the atomic steps every admission store implements.

The in-process store (``memory.py``) is the embedded default; a shared store (Redis) lets nodes
share one line. Each method is one atomic step, written so that a Lua script or a WATCH/MULTI
transaction can do it: a join reads a snapshot (``join_snapshot``), the policy decides on it, and
``insert`` only adds the ticket if nothing changed since the snapshot (``None`` otherwise, and the
join is decided again). No step decides anything: the rules are in ``policy.py``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

from stream_server.admission.eta import CLIP, BusySlot, ServiceTimes
from stream_server.admission.policy import JoinSnapshot, Ticket


class StoreUnavailable(Exception):
    """A shared store cannot be reached; the step that raised it changed nothing."""


@dataclass(frozen=True)
class Grant:
    ticket: Ticket
    granted_at: float
    queue_size: int
    """Tickets still waiting once this one was granted."""
    node: str = ""
    """The node whose slot was reserved ("" on a single node)."""
    owner_node: str = ""
    """The node that holds the ticket's client ("" on a single node)."""
    handoff: str = ""
    """When ``node`` is not ``owner_node``: the id of the single-use grant that the client
    presents there (``hello{resume: grant}``); the slot returns if it is not used in time."""
    node_url: str = ""
    """Where clients reach ``node`` (its advertised ``cluster.public_url``)."""
    more: bool = True
    """A slot was still free once this one was reserved: another grant may follow at once."""

    @property
    def remote(self) -> bool:
        return self.node != self.owner_node

    @property
    def waited_s(self) -> float:
        return max(0.0, self.granted_at - self.ticket.joined_at)


@dataclass(frozen=True)
class LineState:
    """The waiting tickets in grant order, the busy slots and the measured service times."""

    waiting: list[Ticket]
    busy: list[BusySlot]
    slots_total: int
    times: ServiceTimes
    pool_slots: dict[str, int] = field(default_factory=dict)
    """Slots per pool of the live nodes (a shared store); empty on one node."""
    busy_pools: list[str] = field(default_factory=list)
    """The pool of each busy slot, in the order of ``busy`` (a shared store)."""


@dataclass(frozen=True)
class NewTicket:
    id: str
    identity: str
    tier: str
    avatar: str
    joined_at: float
    key: float
    resume_key: str = ""
    """What a resume names the ticket's owner by: a shared store lets any node find it."""
    request: str = ""
    """The request as JSON, kept with the ticket by a shared store for a resume on another node."""
    mode: str = CLIP
    """The ``start``'s mode: its busy slot is expected to be held as long as a session of it."""


class AdmissionStore(ABC):
    node_id: str = ""
    """This node's name in a shared store ("" on one node): grants name it as ``node`` and
    ``owner_node``."""

    @abstractmethod
    async def expire(self, now: float) -> list[Ticket]:
        """Forget the detached tickets whose resume grace is over; return them."""

    @abstractmethod
    async def join_snapshot(
        self, identity: str, tier: str, now: float, *, mode: str = CLIP, ticket_id: str = "", avatar: str = ""
    ) -> tuple[JoinSnapshot, int]:
        """Count a join attempt's work (the measured mean of its mode and tier) as offered and
        read the line for the decision; with the store's version, which ``insert`` compares. A
        shared store also counts the use of ``avatar`` by ``ticket_id`` (once, however often the
        join is decided again) and gives the uses every node counted
        (``JoinSnapshot.avatar_uses``)."""

    @abstractmethod
    async def insert(self, ticket: NewTicket, version: int) -> tuple[Ticket, list[Ticket]] | None:
        """Add the ticket if the store is still at ``version``, superseding the identity's
        detached tickets; return it and those. ``None`` if the line changed in between."""

    @abstractmethod
    async def remove(self, ticket_id: str) -> Ticket | None:
        """Take a waiting or detached ticket away for good; ``None`` if it was neither."""

    @abstractmethod
    async def detach(self, ticket_id: str, until: float) -> Ticket | None:
        """Take a waiting ticket out of the line and hold its place until ``until``; ``None`` if it
        was not waiting (a detached ticket stays as it is)."""

    @abstractmethod
    async def reattach(self, ticket_id: str, identity: str) -> Ticket | None:
        """Put a detached ticket of ``identity`` back at its old place; ``None`` (and nothing
        changed) if there is none, or it belongs to another identity."""

    @abstractmethod
    async def pop_and_reserve(self, now: float) -> Grant | None:
        """Pop the first ticket and reserve a slot for it, if a slot is free and anyone waits."""

    @abstractmethod
    async def release(self, ticket_id: str, now: float, *, served: bool) -> Ticket | None:
        """Free the slot held by ``ticket_id``; a served session's duration feeds the estimates
        of its mode and tier."""

    @abstractmethod
    async def line(self, now: float) -> LineState:
        """The whole line in grant order and the busy slots."""

    @abstractmethod
    async def set_slots(self, total: int) -> None:
        """Capacity changed (workers measured, started or stopped)."""

    async def delivered(self) -> list[Grant]:
        """Grants that other nodes made for tickets whose clients this node holds (a shared
        store); none on one node."""
        return []

    async def find_detached(self, resume_key: str) -> str | None:
        """The detached ticket a resume by ``resume_key`` may take back, wherever it was held
        (a shared store); ``None`` on one node, where admission keeps that itself."""
        return None

    async def restore_busy(self, grants: list[Grant], now: float) -> None:
        """Reserve again the slots of grants still being served here, after a shared store lost
        them (it restarted empty); nothing to do on one node."""
        return None

    async def consume_grant(self, handoff: str, now: float) -> Ticket | None:
        """Take up a grant made for a slot of this node, once, before it expires (a shared
        store); ``None`` on one node, where no grant is ever handed off."""
        return None
