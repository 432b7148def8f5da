"""Does an upload's first bytes match its declared container? Checked on arrival, before the
request waits, so a PNG declared as ``wav`` is refused at once, in words."""

from __future__ import annotations

from collections.abc import Callable

HEAD_BYTES = 12

_KNOWN = (
    (b"\x89PNG", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"GIF8", "a GIF image"),
    (b"%PDF", "a PDF document"),
    (b"PK\x03\x04", "a ZIP archive"),
    (b"\x1aE\xdf\xa3", "a Matroska/WebM file"),
    (b"fLaC", "FLAC audio"),
    (b"OggS", "Ogg data"),
    (b"ID3", "MP3 audio"),
    (b"\x00\x00\x00", "binary data"),
)


def _is_wav(head: bytes) -> bool:
    return head[:4] in (b"RIFF", b"RF64", b"BW64") and head[8:12] == b"WAVE"


def _is_mp3(head: bytes) -> bool:
    if head[:3] == b"ID3":
        return True
    # An MPEG audio frame header: 11 sync bits, then a layer other than "reserved".
    return len(head) >= 2 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0 and head[1] & 0x06 != 0


def _is_ogg(head: bytes) -> bool:
    return head[:4] == b"OggS"


def _is_flac(head: bytes) -> bool:
    # FFmpeg also takes FLAC behind an ID3 tag.
    return head[:4] == b"fLaC" or head[:3] == b"ID3"


_MATCHES: dict[str, Callable[[bytes], bool]] = {"wav": _is_wav, "mp3": _is_mp3, "ogg": _is_ogg, "flac": _is_flac}


def describe(head: bytes) -> str:
    """What the bytes look like, in words."""
    if _is_wav(head):
        return "WAV audio"
    if head[4:8] == b"ftyp":
        return "an MP4/M4A file"
    for magic, what in _KNOWN:
        if head.startswith(magic):
            return what
    if _is_mp3(head):
        return "MP3 audio"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return "unrecognised binary data"
    return "text" if all(c.isprintable() or c.isspace() for c in text) else "unrecognised binary data"


def mismatch(head: bytes, fmt: str) -> str | None:
    """A message for the client when ``head`` (the first ``HEAD_BYTES`` or all there is) cannot
    start a ``fmt`` file; ``None`` when it can. Raw ``pcm_s16le`` has no header to check."""
    check = _MATCHES.get(fmt)
    if check is None or check(head):
        return None
    if not head:
        return f"declared {fmt} but no audio bytes came"
    return f"declared {fmt} but the data is {describe(head)}, not a {fmt} file"
