"""This node's copy of the shared line: the waiting, detached and busy entries at one version.

Every change of the line in Redis logs what it did to them (``redis_scripts``: ``log``). A read
of the line sends the ``(epoch, version)`` this copy is at and gets back nothing (``same``), the
log entries since (``log``), or, when the copy is further behind than the log or from another
epoch (Redis restarted), the whole line (``whole``). So a node reads the whole line about once,
and each change after that costs it the change, not the line: a grant with 1000 clients waiting
moves a few hundred bytes to every node instead of the 1000 tickets.

Only the store reads into it, one read at a time (``RedisAdmissionStore``), so the entries always
belong to the version it names.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

from sortedcontainers import SortedList

from stream_server.admission.policy import Ticket

log = logging.getLogger(__name__)


class LineLogGap(Exception):
    """A log entry does not follow the copy (a bug, or a log written by something else)."""


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


class LineCopy:
    def __init__(self, decode: Callable[[str], Ticket]) -> None:
        self._decode = decode
        self.epoch = ""
        self.version = -1
        self._waiting: SortedList = SortedList(key=lambda t: t.order)
        self._by_id: dict[str, Ticket] = {}
        self.detached: dict[str, Ticket] = {}
        self.busy: dict[str, str] = {}
        """Ticket id -> the busy slot's entry as the store keeps it."""
        self.whole_reads = 0
        """How many reads brought the whole line (the others brought changes or nothing)."""

    @property
    def waiting(self) -> list[Ticket]:
        """The waiting tickets in grant order."""
        return list(self._waiting)

    def reset(self) -> None:
        """Forget everything: the next read brings the whole line."""
        self.epoch, self.version = "", -1
        self._waiting.clear()
        self._by_id.clear()
        self.detached.clear()
        self.busy.clear()

    def update(self, reply: list[Any]) -> None:
        """Bring the copy to the version of a ``line_since`` reply; ``LineLogGap`` (and the copy
        reset) if its log entries do not follow on."""
        epoch, version, kind = _text(reply[0]), int(reply[1]), _text(reply[2])
        if kind == "same":
            return
        if kind == "whole":
            self.reset()
            self.whole_reads += 1
            for member in reply[3]:
                self._add_waiting(self._decode(_text(member)))
            det, busy = reply[4], reply[5]
            self.detached = {_text(det[i]): self._decode(_text(det[i + 1])) for i in range(0, len(det), 2)}
            self.busy = {_text(busy[i]): _text(busy[i + 1]) for i in range(0, len(busy), 2)}
        else:
            try:
                for raw in reply[3]:
                    entry_version, ops = json.loads(raw)
                    if entry_version != self.version + 1:
                        raise LineLogGap(f"log entry {entry_version} after version {self.version}")
                    for change in ops or ():
                        self._apply(change)
                    self.version = entry_version
                if self.version != version:
                    raise LineLogGap(f"the log ends at {self.version}, the line is at {version}")
            except (LineLogGap, KeyError, ValueError) as exc:
                log.warning("the line's log did not apply (%r): reading the whole line", exc)
                self.reset()
                raise LineLogGap(str(exc)) from exc
        self.epoch, self.version = epoch, version

    def _add_waiting(self, ticket: Ticket) -> None:
        if ticket.id in self._by_id:
            raise LineLogGap(f"ticket {ticket.id} is waiting already")
        self._waiting.add(ticket)
        self._by_id[ticket.id] = ticket

    def _apply(self, change: list[str]) -> None:
        kind, ticket_id = change[0], change[1]
        if kind == "+w":
            self._add_waiting(self._decode(change[2]))
        elif kind == "-w":
            self._waiting.remove(self._by_id.pop(ticket_id))
        elif kind == "+d":
            self.detached[ticket_id] = self._decode(change[2])
        elif kind == "-d":
            del self.detached[ticket_id]
        elif kind == "+b":
            self.busy[ticket_id] = change[2]
        elif kind == "-b":
            del self.busy[ticket_id]
        else:
            raise LineLogGap(f"unknown change {kind!r}")
