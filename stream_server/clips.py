"""Finished clips on disk, addressed by what made them, so a repeated request is a cache hit.

The key is a hash of the engine, the avatar (and its preparation), the audio bytes and the output
settings. Files are written to a temporary name while the clip streams and renamed when it is
complete, so a key on disk always names a whole clip.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from pathlib import Path

KEY_RE = re.compile(r"^[0-9a-f]{40}$")


def clip_key(**parts: object) -> str:
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:40]


class ClipWriter:
    """Appends a clip's bytes from a worker thread; ``commit`` makes it visible under its key."""

    def __init__(self, store: ClipStore, key: str) -> None:
        self.store = store
        self.key = key
        fd, name = tempfile.mkstemp(prefix=".part-", suffix=".mp4", dir=store.root)
        self._file = os.fdopen(fd, "wb")
        self._tmp = Path(name)

    def write(self, data: bytes) -> None:
        self._file.write(data)

    def commit(self) -> Path:
        self._file.close()
        final = self.store.path(self.key)
        os.replace(self._tmp, final)
        self.store.evict()
        return final

    def discard(self) -> None:
        self._file.close()
        self._tmp.unlink(missing_ok=True)


class ClipStore:
    """Clips under ``root``, at most ``max_bytes`` of them: the least recently written go first."""

    def __init__(self, root: Path, max_bytes: int = 10 << 30) -> None:
        self.root = Path(root)
        self.max_bytes = max_bytes
        self.root.mkdir(parents=True, exist_ok=True)
        for leftover in self.root.glob(".part-*"):
            leftover.unlink(missing_ok=True)

    def path(self, key: str) -> Path:
        if not KEY_RE.match(key):
            raise KeyError(key)
        return self.root / f"{key}.mp4"

    def exists(self, key: str) -> bool:
        return KEY_RE.match(key) is not None and self.path(key).is_file()

    def writer(self, key: str) -> ClipWriter:
        return ClipWriter(self, key)

    def evict(self) -> list[str]:
        """Delete the oldest clips (and their sidecars) until the store fits ``max_bytes``."""
        clips = sorted((p.stat().st_mtime_ns, p) for p in self.root.glob("*.mp4") if KEY_RE.match(p.stem))
        total = sum(p.stat().st_size for _, p in clips)
        removed: list[str] = []
        for _, path in clips:
            if total <= self.max_bytes:
                break
            total -= path.stat().st_size
            path.with_suffix(".json").unlink(missing_ok=True)
            path.unlink(missing_ok=True)
            removed.append(path.stem)
        return removed

    @staticmethod
    def url(key: str) -> str:
        return f"/v1/clips/{key}.mp4"
