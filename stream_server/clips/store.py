"""``ClipStore``: whole clips with their sidecars, an index by avatar, eviction by size.

Objects on the backend: ``<key>.mp4`` (the fMP4 file), ``<key>.json`` (its sidecar: mime, size,
frames, avatar) and ``by-avatar/<avatar>/<key>`` (empty: which clips an avatar's deletion
removes). A clip is written to a local temporary file while it streams and handed to the backend
whole when complete, the sidecar first, so a listed ``.mp4`` always has its sidecar.

Every method but ``url`` blocks: call them from a thread.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
from pathlib import Path
from typing import Any

from inference.avatars.layout import validate_avatar_id
from stream_server.clips.backend import ClipBackend
from stream_server.clips.key import is_key
from stream_server.clips.local import LocalClipBackend

INDEX = "by-avatar"
PART_PREFIX = ".part-"


class ClipWriter:
    """Appends a clip's bytes from a worker thread; ``commit`` makes it visible under its key."""

    def __init__(self, store: ClipStore, key: str, avatar: str) -> None:
        if not is_key(key):
            raise KeyError(key)
        self.store = store
        self.key = key
        self.avatar = validate_avatar_id(avatar)
        fd, name = tempfile.mkstemp(prefix=PART_PREFIX, suffix=".mp4", dir=store.staging)
        self._file = os.fdopen(fd, "wb")
        self._tmp = Path(name)

    def write(self, data: bytes) -> None:
        self._file.write(data)

    def commit(self, meta: dict[str, object]) -> str:
        """Store the clip with its sidecar (``meta``, plus the avatar); returns the key."""
        self._file.close()
        self.store.put(self.key, self.avatar, self._tmp, meta)
        return self.key

    def discard(self) -> None:
        self._file.close()
        self._tmp.unlink(missing_ok=True)


class ClipStore:
    """Clips on ``backend`` (a local folder by default), at most ``max_bytes`` of them: the least
    recently written go first. ``cdn_base_url`` makes ``url`` point at a CDN."""

    def __init__(
        self,
        root: Path,
        max_bytes: int = 10 << 30,
        *,
        backend: ClipBackend | None = None,
        cdn_base_url: str = "",
    ) -> None:
        self.backend = backend or LocalClipBackend(root)
        self.staging = Path(root)
        self.staging.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self.cdn_base_url = cdn_base_url.rstrip("/")
        self._lock = threading.Lock()
        for leftover in self.staging.glob(f"{PART_PREFIX}*"):
            leftover.unlink(missing_ok=True)

    # ----- reading -----

    def exists(self, key: str) -> bool:
        return is_key(key) and self.backend.exists(f"{key}.mp4")

    def path(self, key: str) -> Path | None:
        """The clip's local file when the backend is a local folder (``KeyError`` for a bad key)."""
        if not is_key(key):
            raise KeyError(key)
        return self.backend.local_path(f"{key}.mp4")

    def read(self, key: str) -> tuple[bytes, dict[str, Any]] | None:
        """The clip and its sidecar; ``None`` if it is not (or no longer) there."""
        if not is_key(key):
            return None
        sidecar = self.backend.read(f"{key}.json")
        data = self.backend.read(f"{key}.mp4")
        if sidecar is None or data is None:
            return None
        meta: dict[str, Any] = json.loads(sidecar)
        return data, meta

    def url(self, key: str) -> str:
        """Where a client fetches the clip: the CDN when one is configured, else this node."""
        if self.cdn_base_url:
            return f"{self.cdn_base_url}/{key}.mp4"
        return f"/v1/clips/{key}.mp4"

    # ----- writing -----

    def writer(self, key: str, avatar: str) -> ClipWriter:
        return ClipWriter(self, key, avatar)

    def put(self, key: str, avatar: str, source: Path, meta: dict[str, object]) -> None:
        """Store the complete clip file ``source`` (consumed), then evict beyond the budget."""
        self.backend.put_bytes(f"{key}.json", json.dumps({**meta, "avatar": avatar}).encode())
        self.backend.put_bytes(f"{INDEX}/{avatar}/{key}", b"")
        self.backend.put_file(f"{key}.mp4", source)
        self.evict()

    def remove_avatar(self, avatar: str) -> int:
        """Delete every clip of ``avatar``; returns how many there were."""
        markers = self.backend.list(f"{INDEX}/{validate_avatar_id(avatar)}/")
        keys = [m.name.rsplit("/", 1)[1] for m in markers]
        self.backend.delete([*(f"{k}.mp4" for k in keys), *(f"{k}.json" for k in keys)])
        self.backend.delete([m.name for m in markers])
        return len(keys)

    def evict(self) -> list[str]:
        """Delete the oldest clips (with their sidecars and markers) until the store fits."""
        with self._lock:
            clips = sorted(
                (b for b in self.backend.list("") if b.name.endswith(".mp4") and is_key(b.name[:-4])),
                key=lambda b: (b.modified_ns, b.name),
            )
            total = sum(b.size for b in clips)
            removed: list[str] = []
            for blob in clips:
                if total <= self.max_bytes:
                    break
                key = blob.name[:-4]
                sidecar = self.backend.read(f"{key}.json")
                avatar = json.loads(sidecar).get("avatar") if sidecar else None
                names = [blob.name, f"{key}.json"]
                if isinstance(avatar, str):
                    names.append(f"{INDEX}/{avatar}/{key}")
                self.backend.delete(names)
                total -= blob.size
                removed.append(key)
            return removed
