"""``musetalk-stream client``: send an audio file, wait in line, save the lip-synced video.

Shows the queue position and estimated wait, then a progress bar while frames arrive; the
fragmented MP4 received is remuxed (no re-encoding) into a plain MP4 that every player opens.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import av
import websockets

FORMATS = {".wav": "wav", ".mp3": "mp3", ".ogg": "ogg", ".oga": "ogg", ".opus": "ogg", ".flac": "flac"}
CHUNK = 256 * 1024


class ClientError(Exception):
    pass


def socket_url(server: str) -> str:
    base = server.rstrip("/")
    for http, ws in (("https://", "wss://"), ("http://", "ws://")):
        if base.startswith(http):
            base = ws + base[len(http) :]
    return base + "/v1/stream"


class Display:
    """One status line on a terminal, rewritten in place; plain lines otherwise."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.tty = out.isatty()
        self._last = ""

    def show(self, text: str) -> None:
        if self.tty:
            self.out.write("\r\033[K" + text)
        elif text != self._last:
            self.out.write(text + "\n")
        self.out.flush()
        self._last = text

    def end(self, text: str) -> None:
        self.show(text)
        if self.tty:
            self.out.write("\n")
        self.out.flush()


def progress_bar(done: int, total: int | None, width: int = 30) -> str:
    if not total:
        return f"{done} frames"
    filled = int(width * min(done, total) / total)
    return f"[{'#' * filled}{'.' * (width - filled)}] {done}/{total} frames"


def remux(fragmented: bytes, output: Path) -> None:
    """Copy the streams of a fragmented MP4 into a plain MP4 (moov first)."""
    with av.open(io.BytesIO(fragmented)) as source, av.open(
        str(output), "w", format="mp4", options={"movflags": "+faststart"}
    ) as target:
        mapping = {}
        for stream in source.streams:
            if stream.type in ("video", "audio"):
                mapping[stream.index] = target.add_stream_from_template(stream)
        for packet in source.demux():
            if packet.dts is None or packet.stream.index not in mapping:
                continue
            packet.stream = mapping[packet.stream.index]
            target.mux(packet)


async def fetch_clip(
    url: str, avatar: str, audio: bytes, fmt: str, token: str | None, display: Display
) -> tuple[bytes, dict[str, Any]]:
    """The clip for ``audio``. A ``redirect`` (the slot granted is on another node of a cluster)
    is followed: the same request, with its audio, goes to that node with the grant."""
    grant: str | None = None
    while True:
        outcome = await _request_clip(url, avatar, audio, fmt, token, grant, display)
        if isinstance(outcome, tuple):
            return outcome
        url, grant = outcome.url, outcome.grant


@dataclass(frozen=True)
class Redirected:
    url: str
    grant: str


async def _request_clip(
    url: str, avatar: str, audio: bytes, fmt: str, token: str | None, grant: str | None, display: Display
) -> tuple[bytes, dict[str, Any]] | Redirected:
    media = bytearray()
    async with websockets.connect(url, max_size=None) as ws:
        hello: dict[str, Any] = {"type": "hello"}
        if token:
            hello["token"] = token
        if grant:
            hello["resume"] = grant
        await ws.send(json.dumps(hello))
        await ws.send(json.dumps({"type": "start", "avatar": avatar, "mode": "clip", "transport": "mse",
                                  "audio": {"format": fmt}}))
        for offset in range(0, len(audio), CHUNK):
            await ws.send(audio[offset : offset + CHUNK])
        await ws.send(json.dumps({"type": "audio_end"}))
        started = time.monotonic()
        async for raw in ws:
            if isinstance(raw, bytes):
                media += raw
                continue
            msg = json.loads(raw)
            kind = msg["type"]
            if kind == "welcome":
                display.show(f"connected ({msg['tier']}, engine {msg.get('engine', '?')})")
            elif kind == "queued":
                eta = "estimating wait" if msg["eta_s"] is None else f"about {msg['eta_s']:.0f} s"
                display.show(f"in line: position {msg['position']} of {msg['queue_size']}, {eta}")
            elif kind == "granted":
                display.show(f"granted after {msg['waited_s']:.1f} s, generating")
            elif kind == "redirect":
                display.show("granted on another node, moving there")
                return Redirected(msg["url"], msg["grant"])
            elif kind == "progress":
                display.show(progress_bar(msg["frames"], msg.get("total")))
            elif kind == "done":
                display.end(f"done: {msg['frames']} frames, {msg['duration_s']:.2f} s "
                            f"in {time.monotonic() - started:.1f} s")
                return bytes(media), msg
            elif kind == "error":
                raise ClientError(f"{msg['code']}: {msg['message']}")
    raise ClientError("the server closed the connection before the clip was done")


def run_client(args: argparse.Namespace) -> int:
    audio_path: Path = args.audio
    fmt = FORMATS.get(audio_path.suffix.lower())
    if fmt is None:
        print(f"unsupported audio file type {audio_path.suffix!r} (use {', '.join(FORMATS)})", file=sys.stderr)
        return 2
    display = Display(sys.stderr)
    try:
        media, done = asyncio.run(
            fetch_clip(socket_url(args.server), args.avatar, audio_path.read_bytes(), fmt, args.token, display)
        )
    except (ClientError, OSError, websockets.WebSocketException) as exc:
        display.end(f"error: {exc}")
        return 1
    remux(media, args.output)
    print(f"wrote {args.output}" + (f" (also at {args.server.rstrip('/')}{done['clip']})" if done.get("clip") else ""),
          file=sys.stderr)
    return 0
