"""The loaded avatars kept in memory, in two levels, each an LRU with its own budget:

* ``HostAvatarCache``: decoded avatars (frames, latents) in host memory, shared by all workers,
  bounded in bytes (``avatars.host_cache_bytes``);
* ``DeviceAvatarCache``: the avatars a worker holds on its device (a GPU; for the lite engine,
  the CPU worker's own working set), bounded in count (``avatars.device_cache``).

Hot avatars (``HotAvatars``) are passed over by eviction while others can go. Sessions that hold
an evicted avatar keep their reference; the next use loads or places it again. An entry is the
object itself, never a copy keyed by name alone, so an evicted and reloaded avatar can never be
mixed up with another.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from inference.engine import PreparedAvatar

log = logging.getLogger(__name__)


def _never_hot(avatar_id: str) -> bool:
    return False


@dataclass
class CacheStats:
    """Counts since start; read by the metrics (``mts_avatar_cache_*_total``)."""

    hits: int = 0
    misses: int = 0
    evictions: int = 0


class _Lru:
    """An LRU of avatars by id under a budget measured by ``cost``; hot entries are evicted last."""

    def __init__(
        self, budget: int, cost: Callable[[PreparedAvatar], int], is_hot: Callable[[str], bool], label: str
    ) -> None:
        self.budget = budget
        self._cost = cost
        self.is_hot = is_hot
        self.label = label
        self.stats = CacheStats()
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, tuple[PreparedAvatar, int]] = OrderedDict()
        self._used = 0

    def get(self, avatar_id: str) -> PreparedAvatar | None:
        """The cached avatar (now the most recently used), or ``None``; counts a hit or a miss."""
        with self._lock:
            entry = self._entries.get(avatar_id)
            if entry is None:
                self.stats.misses += 1
                return None
            self._entries.move_to_end(avatar_id)
            self.stats.hits += 1
            return entry[0]

    def peek(self, avatar_id: str) -> PreparedAvatar | None:
        """Like ``get``, without counting or reordering."""
        with self._lock:
            entry = self._entries.get(avatar_id)
            return entry[0] if entry is not None else None

    def put(self, avatar_id: str, avatar: PreparedAvatar) -> list[PreparedAvatar]:
        """Cache ``avatar``; returns the avatars evicted to make room."""
        cost = self._cost(avatar)
        with self._lock:
            old = self._entries.pop(avatar_id, None)
            if old is not None:
                self._used -= old[1]
            self._entries[avatar_id] = (avatar, cost)
            self._used += cost
            return self._evict(keep=avatar_id)

    def discard(self, avatar_id: str) -> PreparedAvatar | None:
        with self._lock:
            entry = self._entries.pop(avatar_id, None)
            if entry is None:
                return None
            self._used -= entry[1]
            return entry[0]

    def ids(self) -> list[str]:
        """Cached ids, least recently used first."""
        with self._lock:
            return list(self._entries)

    def __contains__(self, avatar_id: object) -> bool:
        with self._lock:
            return avatar_id in self._entries

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def _evict(self, keep: str) -> list[PreparedAvatar]:
        """Cold entries first, least recently used first; hot ones only when no cold one is left
        (the budget holds even then). The entry just put stays even if it alone is over budget."""
        evicted: list[PreparedAvatar] = []
        while self._used > self.budget and len(self._entries) > 1:
            candidates = [i for i in self._entries if i != keep]
            cold = [i for i in candidates if not self.is_hot(i)]
            victim = cold[0] if cold else candidates[0]
            if not cold:
                log.warning("%s avatar cache: every avatar is hot; evicting %s (raise its budget)", self.label, victim)
            avatar, cost = self._entries.pop(victim)
            self._used -= cost
            self.stats.evictions += 1
            evicted.append(avatar)
        return evicted


class HostAvatarCache(_Lru):
    """Decoded avatars in host memory, at most ``budget_bytes`` of them (``nbytes``)."""

    def __init__(self, budget_bytes: int, is_hot: Callable[[str], bool] = _never_hot) -> None:
        if budget_bytes < 1:
            raise ValueError(f"the host avatar cache needs a budget of at least one byte, not {budget_bytes}")
        super().__init__(budget_bytes, lambda a: a.nbytes, is_hot, "host")


class DeviceAvatarCache(_Lru):
    """The avatars one worker holds on its device, at most ``capacity``."""

    def __init__(self, capacity: int, is_hot: Callable[[str], bool] = _never_hot) -> None:
        if capacity < 1:
            raise ValueError(f"the device avatar cache must hold at least one avatar, not {capacity}")
        super().__init__(capacity, lambda a: 1, is_hot, "device")
