"""The node's budget for audio kept by requests that wait for a slot.

One ``UploadBudget`` per node, shared by all its sessions; each request takes an ``UploadClaim``
on it. Past the budget a ``start`` or a chunk of audio gets ``queue_full`` with
``retry_after_s``, before the bytes are kept. A granted request gives its claim back: its audio
is then being decoded and consumed, no longer waiting.
"""

from __future__ import annotations

import logging

from stream_server.protocol import ErrorCode, ProtocolError

log = logging.getLogger(__name__)


class UploadBudget:
    def __init__(self, limit_bytes: int, retry_after_s: float) -> None:
        self.limit_bytes = limit_bytes
        self.retry_after_s = retry_after_s
        self.used_bytes = 0

    def full_error(self) -> ProtocolError:
        return ProtocolError(
            ErrorCode.QUEUE_FULL,
            f"the server already holds {self.limit_bytes} bytes of audio for waiting requests; try again later",
            retry_after_s=self.retry_after_s,
        )

    def check_room(self) -> None:
        """For ``start``: refuse at once when waiting requests already hold the whole budget."""
        if self.used_bytes >= self.limit_bytes:
            raise self.full_error()

    def claim(self) -> UploadClaim:
        return UploadClaim(self)


class UploadClaim:
    """One request's share of the budget; ``release`` is idempotent."""

    def __init__(self, budget: UploadBudget) -> None:
        self._budget = budget
        self.bytes = 0

    def add(self, n: int) -> None:
        budget = self._budget
        if budget.used_bytes + n > budget.limit_bytes:
            raise budget.full_error()
        budget.used_bytes += n
        self.bytes += n

    def release(self) -> None:
        self._budget.used_bytes -= self.bytes
        self.bytes = 0

    def __del__(self) -> None:
        if self.bytes:
            log.warning("an audio upload was dropped without being closed; releasing its %d bytes", self.bytes)
            self.release()
