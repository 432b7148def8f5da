"""A ring of fixed-size frame slots in shared memory: one image (H x W x 3 uint8) and one frame's
audio (float32) per slot.

The server process creates and unlinks it (so a worker that dies leaks nothing); the worker
attaches, writes a frame into a free slot and names the slot in a message; the reader copies the
frame out and hands the slot back. Which slots are free is the writer's business alone."""

from __future__ import annotations

import threading
from multiprocessing import shared_memory

import numpy as np

from inference.engine import OUTPUT_SAMPLES_PER_FRAME

AUDIO_BYTES = OUTPUT_SAMPLES_PER_FRAME * 4


class FrameRing:
    def __init__(self, shm: shared_memory.SharedMemory, slots: int, height: int, width: int, *, owner: bool):
        self.shm = shm
        self.slots = slots
        self.height = height
        self.width = width
        self.owner = owner
        self.image_bytes = height * width * 3
        self.slot_bytes = self.image_bytes + AUDIO_BYTES

    @classmethod
    def create(cls, slots: int, height: int, width: int, name: str | None = None) -> FrameRing:
        """A new segment (``/dev/shm/<name>``; a random name when ``None``)."""
        size = slots * (height * width * 3 + AUDIO_BYTES)
        return cls(shared_memory.SharedMemory(name, create=True, size=size), slots, height, width, owner=True)

    @classmethod
    def attach(cls, name: str, slots: int, height: int, width: int) -> FrameRing:
        return cls(shared_memory.SharedMemory(name=name), slots, height, width, owner=False)

    @property
    def name(self) -> str:
        return self.shm.name

    def _views(self, slot: int) -> tuple[np.ndarray, np.ndarray]:
        base = slot * self.slot_bytes
        image = np.ndarray((self.height, self.width, 3), np.uint8, self.shm.buf, base)
        audio = np.ndarray((OUTPUT_SAMPLES_PER_FRAME,), np.float32, self.shm.buf, base + self.image_bytes)
        return image, audio

    def write(self, slot: int, image: np.ndarray, audio: np.ndarray) -> None:
        target_image, target_audio = self._views(slot)
        target_image[...] = image
        target_audio[...] = audio

    def read(self, slot: int) -> tuple[np.ndarray, np.ndarray]:
        """Copies of the slot's image and audio (the slot may be reused once handed back)."""
        image, audio = self._views(slot)
        return image.copy(), audio.copy()

    def close(self) -> None:
        """Detach; the owner also removes the segment from ``/dev/shm``."""
        self.shm.close()
        if self.owner:
            self.shm.unlink()


class FreeSlots:
    """The writer's view of which slots it may fill; ``take`` blocks until one is handed back."""

    def __init__(self, slots: int) -> None:
        self._free = list(range(slots))
        self._changed = threading.Condition()
        self._closed = False

    def take(self) -> int | None:
        """A free slot, or ``None`` once closed."""
        with self._changed:
            while not self._free and not self._closed:
                self._changed.wait()
            return None if self._closed else self._free.pop()

    def give_back(self, slot: int) -> None:
        with self._changed:
            self._free.append(slot)
            self._changed.notify()

    def close(self) -> None:
        with self._changed:
            self._closed = True
            self._changed.notify_all()
