"""The loaded avatars kept in memory: a thread-safe LRU of at most ``engine.avatar_cache``."""

from __future__ import annotations

import threading
from collections import OrderedDict

from inference.engine import PreparedAvatar


class AvatarCache:
    """Loaded avatars by id, the least recently used dropped beyond ``capacity``. Sessions that
    hold an evicted avatar keep their reference; the next ``get`` loads it again."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"the avatar cache must hold at least one avatar, not {capacity}")
        self.capacity = capacity
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, PreparedAvatar] = OrderedDict()

    def get(self, avatar_id: str) -> PreparedAvatar | None:
        """The cached avatar (now the most recently used), or ``None``."""
        with self._lock:
            avatar = self._entries.get(avatar_id)
            if avatar is not None:
                self._entries.move_to_end(avatar_id)
            return avatar

    def put(self, avatar_id: str, avatar: PreparedAvatar) -> None:
        with self._lock:
            self._entries[avatar_id] = avatar
            self._entries.move_to_end(avatar_id)
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)

    def discard(self, avatar_id: str) -> None:
        with self._lock:
            self._entries.pop(avatar_id, None)

    def ids(self) -> list[str]:
        """Cached ids, least recently used first."""
        with self._lock:
            return list(self._entries)

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)
