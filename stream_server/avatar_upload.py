"""An admin's avatar upload, streamed to disk and checked while it streams, before preparation.

In order, each check as soon as it can be made: the declared length, then the bytes as they come
(``413`` once past ``limits.avatar_upload_bytes``, without reading the rest); the first bytes
against the declared type (``415`` at once); then the headers of the file on disk: an image's
pixels from its PNG/JPEG header (a 20000 x 20000 PNG is refused without decoding it), a video's
size, frames and duration from a PyAV probe.
"""

from __future__ import annotations

import asyncio
import secrets
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import av
from starlette.requests import Request

from stream_server.settings import LimitSettings

HEAD_BYTES = 16
_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


class UploadRefused(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Kind:
    name: str
    suffix: str
    video: bool


PNG = Kind("a PNG image", ".png", video=False)
JPEG = Kind("a JPEG image", ".jpg", video=False)
MP4 = Kind("an MP4/MOV video", ".mp4", video=True)
WEBM = Kind("a WebM/Matroska video", ".webm", video=True)
DECLARED = {"image/png": PNG, "image/jpeg": JPEG, "video/mp4": MP4, "video/quicktime": MP4, "video/webm": WEBM}


def sniff(head: bytes) -> Kind | None:
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return PNG
    if head.startswith(b"\xff\xd8\xff"):
        return JPEG
    if head[4:8] == b"ftyp":
        return MP4
    if head.startswith(b"\x1aE\xdf\xa3"):
        return WEBM
    return None


def _refuse_type(head: bytes, declared: str) -> Kind:
    """The upload's kind; refused when it is none this server takes or not the declared one."""
    kind = sniff(head)
    if kind is None:
        raise UploadRefused(415, "bad_media", "the body is not a PNG or JPEG image nor an MP4 or WebM video")
    expected = DECLARED.get(declared.split(";")[0].strip().lower())
    if expected is not None and expected is not kind:
        raise UploadRefused(415, "bad_media", f"Content-Type says {expected.name} but the body is {kind.name}")
    return kind


def _too_large(what: str) -> UploadRefused:
    return UploadRefused(413, "avatar_too_large", what)


@dataclass
class Upload:
    path: Path
    kind: Kind
    size: int


async def receive_avatar_upload(request: Request, limits: LimitSettings) -> Upload:
    """Stream the body to a temporary file and check it; the caller owns (and deletes) the file.
    Raises ``UploadRefused`` with the status, code and message for the client."""
    limit = limits.avatar_upload_bytes
    declared_length = request.headers.get("content-length", "")
    if declared_length.isdigit() and int(declared_length) > limit:
        raise UploadRefused(413, "message_too_large", f"the body is over the limit of {limit} bytes")
    path = Path(tempfile.gettempdir()) / f"mts-upload-{secrets.token_hex(8)}"
    file: IO[bytes] = await asyncio.to_thread(path.open, "wb")
    head = b""
    kind: Kind | None = None
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise UploadRefused(413, "message_too_large", f"the body is over the limit of {limit} bytes")
            if kind is None:
                head += chunk[: HEAD_BYTES - len(head)]
                if len(head) >= HEAD_BYTES:
                    kind = _refuse_type(head, request.headers.get("content-type", ""))
            if chunk:
                await asyncio.to_thread(file.write, chunk)
        await asyncio.to_thread(file.close)
        if size == 0:
            raise UploadRefused(400, "bad_message", "the body must be an image or a video")
        if kind is None:
            kind = _refuse_type(head, request.headers.get("content-type", ""))
        final = path.with_suffix(kind.suffix)
        await asyncio.to_thread(path.rename, final)
        path = final
        await asyncio.to_thread(check_media, path, kind, limits)
    except BaseException:
        await asyncio.to_thread(_discard, file, path)
        raise
    return Upload(path, kind, size)


def _discard(file: IO[bytes], path: Path) -> None:
    file.close()
    path.unlink(missing_ok=True)


def check_media(path: Path, kind: Kind, limits: LimitSettings) -> None:
    """Pixels, frames and duration from the file's headers (blocking: run in a thread)."""
    if kind.video:
        width, height, frames, seconds = _probe_video(path)
        if frames > limits.avatar_upload_frames:
            raise _too_large(f"the video has {frames} frames; at most {limits.avatar_upload_frames} are taken")
        if seconds > limits.avatar_upload_seconds:
            raise _too_large(f"the video lasts {seconds:.1f} s; at most {limits.avatar_upload_seconds:g} s is taken")
    else:
        width, height = _png_size(path) if kind is PNG else _jpeg_size(path)
    if width * height > limits.avatar_upload_pixels:
        raise _too_large(
            f"the {'video' if kind.video else 'image'} is {width} x {height} pixels; "
            f"at most {limits.avatar_upload_pixels} pixels a frame are taken"
        )


def _png_size(path: Path) -> tuple[int, int]:
    with path.open("rb") as f:
        head = f.read(24)
    if len(head) < 24 or head[12:16] != b"IHDR":
        raise UploadRefused(415, "bad_media", "the PNG image has no valid header")
    width, height = struct.unpack(">II", head[16:24])
    return int(width), int(height)


def _jpeg_size(path: Path) -> tuple[int, int]:
    """Walk the JPEG markers to the first start-of-frame, which holds the size."""
    with path.open("rb") as f:
        f.read(2)
        while True:
            marker = f.read(2)
            if len(marker) < 2 or marker[0] != 0xFF:
                break
            length_bytes = f.read(2)
            if len(length_bytes) < 2:
                break
            length = struct.unpack(">H", length_bytes)[0]
            if marker[1] in _JPEG_SOF:
                frame = f.read(5)
                if len(frame) < 5:
                    break
                height, width = struct.unpack(">HH", frame[1:5])
                return int(width), int(height)
            f.seek(length - 2, 1)
    raise UploadRefused(415, "bad_media", "the JPEG image has no readable size")


def _probe_video(path: Path) -> tuple[int, int, int, float]:
    """Width, height, frames and seconds from the container's headers."""
    try:
        with av.open(str(path), metadata_errors="replace") as container:
            if not container.streams.video:
                raise UploadRefused(415, "bad_media", "the video file holds no video stream")
            stream = container.streams.video[0]
            width, height = stream.codec_context.width, stream.codec_context.height
            seconds = 0.0
            if stream.duration and stream.time_base:
                seconds = float(stream.duration * stream.time_base)
            elif container.duration:
                seconds = container.duration / av.time_base
            rate = float(stream.average_rate or stream.guessed_rate or 0)
            frames = stream.frames or round(seconds * rate)
    except av.FFmpegError as exc:
        raise UploadRefused(415, "bad_media", f"the video cannot be read: {exc.strerror or 'invalid data'}") from None
    return int(width), int(height), int(frames), seconds
