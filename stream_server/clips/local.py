"""Clips in a local folder: one file per blob, written to a temporary name and renamed.

Two sessions may make the same clip at once (the same avatar and audio: the same key), so each
writer has a temporary name of its own; the last rename wins, and both wrote the same bytes."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from stream_server.clips.backend import BlobInfo, ClipBackend


class LocalClipBackend(ClipBackend):
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, name: str) -> Path:
        path = self.root / name
        if ".." in Path(name).parts or name.startswith("/"):
            raise KeyError(name)
        return path

    def put_file(self, name: str, source: Path) -> None:
        path = self._path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(source, path)
        except OSError:  # another file system: copy, then rename in place
            tmp = _temporary_beside(path)
            shutil.copyfile(source, tmp)
            os.replace(tmp, path)
            source.unlink(missing_ok=True)

    def put_bytes(self, name: str, data: bytes) -> None:
        path = self._path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _temporary_beside(path)
        tmp.write_bytes(data)
        os.replace(tmp, path)

    def read(self, name: str) -> bytes | None:
        try:
            return self._path(name).read_bytes()
        except FileNotFoundError:
            return None

    def exists(self, name: str) -> bool:
        return self._path(name).is_file()

    def delete(self, names: list[str]) -> None:
        for name in names:
            self._path(name).unlink(missing_ok=True)

    def list(self, prefix: str) -> list[BlobInfo]:
        folder, _, start = prefix.rpartition("/")
        base = self._path(folder) if folder else self.root
        if not base.is_dir():
            return []
        found: list[BlobInfo] = []
        for entry in os.scandir(base):
            if entry.is_file() and entry.name.startswith(start) and not entry.name.startswith(".part-"):
                stat = entry.stat()
                name = f"{folder}/{entry.name}" if folder else entry.name
                found.append(BlobInfo(name, stat.st_size, stat.st_mtime_ns))
        return found

    def local_path(self, name: str) -> Path | None:
        return self._path(name)


def _temporary_beside(path: Path) -> Path:
    """A new empty file next to ``path`` (same file system, so the rename is atomic), named
    ``.part-...`` so that listings skip it."""
    fd, name = tempfile.mkstemp(prefix=f".part-{path.name}.", dir=path.parent)
    os.close(fd)
    return Path(name)
