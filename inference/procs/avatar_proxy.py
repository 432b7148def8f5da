"""The avatar side of the engine contract for a server process that holds no model.

``AvatarStore`` keeps its layout, caches and jobs in the server process; whatever needs the
renderer (preparing, loading, checking a folder) runs in a worker process through
``WorkerAvatarEngine``. The server keeps ``AvatarHandle``s: an avatar's info and folder, never
its frames (those are in the workers)."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from inference.avatars.jobs import Progress
from inference.avatars.layout import AvatarLayout, FaceBox
from inference.engine import AudioFeaturizer, AvatarInfo, FrameRequest, PreparedAvatar, Renderer
from inference.face import FaceReport
from inference.procs.messages import AvatarLoaded

_handles = itertools.count(1)


class AvatarHandle(PreparedAvatar):
    """An avatar loaded in the workers; ``key`` names this preparation of it to them."""

    def __init__(self, info: AvatarInfo, directory: Path, face_report: FaceReport | None = None) -> None:
        self.info = info
        self.directory = directory
        self.key = f"{info.id}#{next(_handles)}"
        self._face_report = face_report

    @property
    def face_report(self) -> FaceReport | None:
        return self._face_report

    def idle_frame(self, cycle_index: int) -> np.ndarray:
        raise RuntimeError("the server process holds no avatar frames: they are in the worker processes")


Caller = Callable[[str, tuple[object, ...], Progress | None], object]
"""``call(method, args, progress)``: run an avatar operation on a worker, return its result
(blocking; ``progress`` hears a preparation's progress)."""


class WorkerAvatarEngine(Renderer):
    def __init__(
        self, name: str, preparation_version: str, avatar_files: tuple[str, ...], root: Path, call: Caller
    ) -> None:
        self.name = name
        self._version = preparation_version
        self._files = avatar_files
        self.avatar_root = root
        self._call = call

    @property
    def preparation_version(self) -> str:
        return self._version

    @property
    def avatar_files(self) -> tuple[str, ...]:
        return self._files

    def prepare_avatar_dir(
        self,
        directory: Path,
        avatar_id: str,
        name: str,
        source: Path | str,
        *,
        face_box: FaceBox | None = None,
        progress: Progress | None = None,
    ) -> PreparedAvatar:
        """Prepared by a worker, at low priority. The store then moves ``directory`` into its
        place in the layout: the handle names that place."""
        prepared = self._call("prepare_avatar_dir", (directory, avatar_id, name, Path(source), face_box), progress)
        assert isinstance(prepared, AvatarLoaded) and prepared.info is not None
        final = AvatarLayout(self._root()).engine_dir(avatar_id, self.name)
        return AvatarHandle(prepared.info, final, prepared.face_report)

    def load_avatar_dir(self, directory: Path) -> PreparedAvatar | None:
        loaded = self._call("load_avatar_dir", (directory,), None)
        assert isinstance(loaded, AvatarLoaded)
        return None if loaded.info is None else AvatarHandle(loaded.info, directory, loaded.face_report)

    def recorded_version(self, directory: Path) -> str | None:
        version = self._call("recorded_version", (directory,), None)
        return None if version is None else str(version)

    def new_featurizer(self, mode: str = "live") -> AudioFeaturizer:
        raise RuntimeError("audio features are computed in the worker processes")

    def render(self, requests: Sequence[FrameRequest]) -> list[np.ndarray]:
        raise RuntimeError("frames are rendered in the worker processes")

    def _root(self) -> Path:
        assert self.avatar_root is not None
        return self.avatar_root
