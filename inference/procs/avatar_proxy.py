"""The avatar side of the engine contract for a server that holds no model.

``AvatarStore`` keeps its layout, cache and jobs in the server process; what needs the renderer
(preparing, loading, checking) runs in a worker process through ``WorkerAvatarEngine``. The
server keeps ``AvatarHandle``s: the avatar's info and folder, never its frames."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from inference.avatars.layout import AvatarLayout, FaceBox
from inference.engine import AudioFeaturizer, AvatarInfo, FrameRequest, PreparedAvatar, Renderer
from inference.procs.messages import AvatarLoaded

_handles = itertools.count(1)


class AvatarHandle(PreparedAvatar):
    """An avatar loaded in the workers; ``key`` names this preparation of it to them."""

    def __init__(self, info: AvatarInfo, directory: Path) -> None:
        self.info = info
        self.directory = directory
        self.key = f"{info.id}#{next(_handles)}"

    def idle_frame(self, cycle_index: int) -> np.ndarray:
        raise RuntimeError("the server process holds no avatar frames: they are in the worker processes")


Caller = Callable[..., object]
"""``call(method, *args)``: run an avatar operation on a worker, return its result (blocking)."""


class WorkerAvatarEngine(Renderer):
    def __init__(
        self, name: str, preparation_version: str, avatar_files: tuple[str, ...], root: Path, call: Caller, *,
        prepare: Caller,
    ) -> None:
        self.name = name
        self._version = preparation_version
        self._files = avatar_files
        self.avatar_root = root
        self._call = call
        self._prepare = prepare

    @property
    def preparation_version(self) -> str:
        return self._version

    @property
    def avatar_files(self) -> tuple[str, ...]:
        return self._files

    def prepare_avatar_dir(
        self, directory: Path, avatar_id: str, name: str, source: Path | str, *, face_box: FaceBox | None = None
    ) -> PreparedAvatar:
        info = self._prepare("prepare_avatar_dir", str(directory), avatar_id, name, str(source), face_box)
        assert isinstance(info, AvatarInfo)
        # the store moves the prepared folder into its place in the layout: that is where it stays
        return AvatarHandle(info, AvatarLayout(self._root()).engine_dir(avatar_id, self.name))

    def load_avatar_dir(self, directory: Path) -> PreparedAvatar | None:
        loaded = self._call("load_avatar_dir", str(directory))
        assert isinstance(loaded, AvatarLoaded)
        return None if loaded.info is None else AvatarHandle(loaded.info, directory)

    def recorded_version(self, directory: Path) -> str | None:
        version = self._call("recorded_version", str(directory))
        return None if version is None else str(version)

    def new_featurizer(self, mode: str = "live") -> AudioFeaturizer:
        raise RuntimeError("audio features are computed in the worker processes")

    def render(self, requests: Sequence[FrameRequest]) -> list[np.ndarray]:
        raise RuntimeError("frames are rendered in the worker processes")

    def _root(self) -> Path:
        assert self.avatar_root is not None
        return self.avatar_root
