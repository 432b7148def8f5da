"""Where a clip store keeps its objects: named blobs, written whole. Every method blocks (disk or
network): call them from a thread, never on the event loop."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class BlobInfo:
    name: str
    size: int
    modified_ns: int
    """Nanoseconds since the epoch: when it was written."""


class ClipBackend(ABC):
    @abstractmethod
    def put_file(self, name: str, source: Path) -> None:
        """Store the complete file ``source`` as ``name`` (``source`` is consumed)."""

    @abstractmethod
    def put_bytes(self, name: str, data: bytes) -> None: ...

    @abstractmethod
    def read(self, name: str) -> bytes | None:
        """The blob, or ``None`` if there is none."""

    @abstractmethod
    def exists(self, name: str) -> bool: ...

    @abstractmethod
    def delete(self, names: list[str]) -> None:
        """Remove the blobs (missing ones are no error)."""

    @abstractmethod
    def list(self, prefix: str) -> list[BlobInfo]:
        """The blobs whose names start with ``prefix``, not below a further ``/``."""

    def local_path(self, name: str) -> Path | None:
        """A file that holds the blob, for backends on local disk (served with ranges)."""
        return None
