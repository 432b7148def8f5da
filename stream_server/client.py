"""``musetalk-stream client``: send an audio file, wait in line, save the lip-synced video.

Built on the SDK (``stream_server.sdk``). Shows the queue position and estimated wait, then a
progress bar while frames arrive; the fragmented MP4 received is remuxed (no re-encoding) into a
plain MP4 that every player opens. Problems are one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import av

from stream_server.sdk import ClipRequest, Done, Granted, MuseTalkError, Progress, Queued, Redirect, connect
from stream_server.sdk.client import AudioFormat

FORMATS: dict[str, AudioFormat] = {
    ".wav": "wav", ".mp3": "mp3", ".ogg": "ogg", ".oga": "ogg", ".opus": "ogg", ".flac": "flac",
}
EXIT_INTERRUPTED = 130


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
    with av.open(io.BytesIO(fragmented), "r") as source, av.open(
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


def output_problem(output: Path) -> str | None:
    """Why ``output`` cannot be written, checked before any work is asked of the server."""
    folder = output.parent if str(output.parent) else Path(".")
    if output.is_dir():
        return f"{output} is a folder; give a file name such as {output / 'out.mp4'}"
    if not folder.is_dir():
        return f"the folder {folder} does not exist"
    if not os.access(folder, os.W_OK):
        return f"the folder {folder} is not writable"
    return None


@dataclass
class Standing:
    """Where the request is, for the line printed when the user interrupts."""

    position: int | None = None
    granted: bool = False

    def describe(self) -> str:
        if self.granted:
            return "interrupted while generating: the request was cancelled"
        if self.position is not None:
            return f"interrupted while in line at position {self.position}: the request was cancelled"
        return "interrupted: nothing was sent"


async def fetch_clip(
    server: str,
    avatar: str,
    audio: bytes,
    fmt: AudioFormat,
    token: str | None,
    display: Display,
    standing: Standing,
) -> tuple[bytes, Done]:
    connection = await connect(server, token=token)
    request: ClipRequest | None = None
    try:
        welcome = connection.welcome
        assert welcome is not None
        display.show(f"connected ({welcome.tier}, engine {welcome.engine or '?'})")
        request = await connection.speak(audio, avatar=avatar, audio_format=fmt, decode=False, keep_fmp4=True)
        started = time.monotonic()
        async for event in request:
            if isinstance(event, Queued):
                standing.position = event.position
                eta = "estimating wait" if event.eta_s is None else f"about {event.eta_s:.0f} s"
                display.show(f"in line: position {event.position} of {event.queue_size}, {eta}")
            elif isinstance(event, Granted):
                standing.granted = True
                display.show(f"granted after {event.waited_s:.1f} s, generating")
            elif isinstance(event, Redirect):
                display.show(f"moving to {event.url}")
            elif isinstance(event, Progress):
                display.show(progress_bar(event.frames, event.total))
            elif isinstance(event, Done):
                display.end(f"done: {event.frames} frames, {event.duration_s:.2f} s "
                            f"in {time.monotonic() - started:.1f} s")
        if request.error is not None:
            raise request.error
        if request.done is None or request.fmp4 is None:
            raise MuseTalkError("the clip ended before it was done")
        return bytes(request.fmp4), request.done
    except asyncio.CancelledError:
        # Ctrl-C: give the place in line back now rather than leaving it parked for the grace period.
        if request is not None and not request.finished:
            with contextlib.suppress(TimeoutError, MuseTalkError):
                await asyncio.wait_for(request.cancel(), 2.0)
        raise
    finally:
        await connection.close()


def clip_url(server: str, clip: str) -> str:
    """Where ``done.clip`` is: a full URL (a CDN, or the node that made it), or a path on ``server``."""
    return clip if "://" in clip else server.rstrip("/") + clip


def run_client(args: argparse.Namespace) -> int:
    audio_path: Path = args.audio
    output: Path = args.output
    fmt = FORMATS.get(audio_path.suffix.lower())
    if fmt is None:
        print(f"error: unsupported audio file type {audio_path.suffix!r} (use {', '.join(FORMATS)})",
              file=sys.stderr)
        return 2
    problem = output_problem(output)
    if problem is not None:
        print(f"error: cannot write {output}: {problem}", file=sys.stderr)
        return 2
    try:
        audio = audio_path.read_bytes()
    except OSError as exc:
        print(f"error: cannot read {audio_path}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    display = Display(sys.stderr)
    standing = Standing()
    try:
        media, done = asyncio.run(fetch_clip(args.server, args.avatar, audio, fmt, args.token, display, standing))
    except KeyboardInterrupt:
        display.end(standing.describe())
        return EXIT_INTERRUPTED
    except MuseTalkError as exc:
        display.end(f"error: {exc}")
        return 1
    try:
        remux(media, output)
    except (OSError, av.FFmpegError) as exc:
        print(f"error: cannot write {output}: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {output}" + (f" (also at {clip_url(args.server, done.clip)})" if done.clip else ""),
          file=sys.stderr)
    return 0


async def render_template(server: str, avatar: str, template: str, token: str | None) -> Done:
    """Have the server say ``template`` with ``avatar`` once: the clip lands in its store (the
    media is not decoded here); the ``done``."""
    async with await connect(server, token) as connection:
        request = await connection.say(template, avatar=avatar, decode=False)
        done, _ = await request.result()
        return done


def run_pregen(args: argparse.Namespace, templates: list[str]) -> int:
    """``musetalk-stream pregen``: render each template for the avatar into the server's clip
    store, one after another (each waits in line like any clip; a rendered one returns at once)."""
    display = Display(sys.stderr)
    for template in templates:
        started = time.monotonic()
        try:
            done = asyncio.run(render_template(args.server, args.avatar, template, args.token))
        except (MuseTalkError, OSError) as exc:
            display.end(f"error: {template}: {exc}")
            return 1
        display.end(f"{args.avatar}/{template}: {done.frames} frames, {done.clip} "
                    f"({time.monotonic() - started:.1f} s)")
    return 0
