"""The template phrase library (``configs/templates.toml``): phrase ids, their audio and text.

A ``start`` with ``"template": ID`` (clip mode, no audio) says the phrase with the avatar's face.
Its clip is keyed like any clip made from the same audio bytes, so once rendered (by a first
request, ``musetalk-stream pregen`` or the background pre-generation) it is answered from the clip
store without queueing.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

from inference.avatars.layout import is_avatar_id

SHIPPED_LIBRARY = Path(__file__).resolve().parent.parent / "configs" / "templates.toml"
AUDIO_FORMATS = {".wav": "wav", ".mp3": "mp3", ".ogg": "ogg", ".flac": "flac"}


class TemplateError(ValueError):
    """The library file is unusable (named file, entry and reason)."""


@dataclass(frozen=True)
class Template:
    id: str
    text: str
    audio: Path
    format: str

    def read_audio(self) -> bytes:
        """The phrase's audio bytes (blocking: call from a thread)."""
        return self.audio.read_bytes()


class TemplateLibrary:
    def __init__(self, templates: dict[str, Template]) -> None:
        self._templates = dict(templates)

    @classmethod
    def load(cls, path: Path | None = None) -> TemplateLibrary:
        """Read and check a library file (the shipped one when ``path`` is ``None`` or empty)."""
        path = Path(path) if path and str(path) else SHIPPED_LIBRARY
        try:
            data = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise TemplateError(f"templates file {path}: {exc}") from exc
        templates: dict[str, Template] = {}
        for phrase_id, entry in data.items():
            where = f"templates file {path}, [{phrase_id}]"
            if not is_avatar_id(phrase_id):
                raise TemplateError(f"{where}: ids use 1-64 of a-z, 0-9, '_' and '-'")
            if not isinstance(entry, dict) or not isinstance(entry.get("audio"), str):
                raise TemplateError(f"{where}: needs audio = \"file\" (and text = \"...\")")
            audio = (path.parent / entry["audio"]).resolve()
            fmt = AUDIO_FORMATS.get(audio.suffix.lower())
            if fmt is None:
                raise TemplateError(f"{where}: {audio.name} is not one of {', '.join(AUDIO_FORMATS)}")
            if not audio.is_file():
                raise TemplateError(f"{where}: {audio} does not exist")
            templates[phrase_id] = Template(phrase_id, str(entry.get("text", "")), audio, fmt)
        return cls(templates)

    def get(self, phrase_id: str) -> Template | None:
        return self._templates.get(phrase_id)

    def ids(self) -> list[str]:
        return sorted(self._templates)

    def __len__(self) -> int:
        return len(self._templates)
