"""The real server in a subprocess on a free port, and a small websocket client for tests."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import av
import httpx
import numpy as np
import websockets

TEST_SECRET = "test-secret-0123456789-0123456789"
ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class RunningServer:
    url: str
    ws_url: str
    process: subprocess.Popen[bytes]
    data_dir: Path
    log_path: Path

    def get(self, path: str, **kwargs: Any) -> httpx.Response:
        return httpx.get(self.url + path, timeout=10, **kwargs)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@contextlib.contextmanager
def run_server(tmp: Path, *, port: int | None = None, **env: str) -> Iterator[RunningServer]:
    """The server on ``port`` (a free one by default), with ``env`` over the test defaults."""
    port = port or free_port()
    data = tmp / "data"
    log_path = tmp / "server.log"
    environment = {
        **os.environ,
        "MTS_SERVER__DATA_DIR": str(data),
        "MTS_AUTH__HS256_SECRET": TEST_SECRET,
        "MTS_ENGINE__KIND": "lite",
        "MTS_QUEUE__HEARTBEAT_S": "1.0",
        "MTS_QUEUE__COALESCE_S": "0.05",
        "MTS_CLUSTER__DRAIN_TIMEOUT_S": "2",
        **env,
    }
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "stream_server", "serve", "--port", str(port)],
            cwd=ROOT,
            env=environment,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    server = RunningServer(f"http://127.0.0.1:{port}", f"ws://127.0.0.1:{port}/v1/stream", process, data, log_path)
    try:
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"server exited:\n{server.log()}")
            try:
                if httpx.get(server.url + "/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"server not ready:\n{server.log()}")
            time.sleep(0.1)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


def mint(sub: str, tier: str, secret: str = TEST_SECRET, **claims: Any) -> str:
    import jwt

    body = {"sub": sub, "tier": tier, "exp": int(time.time()) + 3600, **claims}
    return jwt.encode(body, secret, algorithm="HS256")


@dataclass
class Client:
    """A session socket client that keeps every message it receives, in order."""

    ws: Any
    messages: list[dict[str, Any]] = field(default_factory=list)
    media: list[tuple[float, bytes]] = field(default_factory=list)
    events: list[tuple[float, str]] = field(default_factory=list)
    _cursor: int = 0

    @classmethod
    async def connect(cls, server: RunningServer, **kwargs: Any) -> Client:
        ws = await websockets.connect(server.ws_url, max_size=None, **kwargs)
        return cls(ws)

    async def send(self, kind: str, **fields: Any) -> None:
        await self.ws.send(json.dumps({"type": kind, **fields}))

    async def hello(self, token: str | None = None, **fields: Any) -> dict[str, Any]:
        await self.send("hello", **({"token": token} if token else {}), **fields)
        return await self.expect("welcome")

    async def _pull(self, timeout: float) -> dict[str, Any] | None:
        while True:
            raw = await asyncio.wait_for(self.ws.recv(), timeout)
            now = time.monotonic()
            if isinstance(raw, bytes):
                self.media.append((now, raw))
                self.events.append((now, "media"))
                continue
            msg = json.loads(raw)
            msg["_t"] = now
            self.messages.append(msg)
            self.events.append((now, msg["type"]))
            return msg

    async def expect(self, *kinds: str, timeout: float = 30.0) -> dict[str, Any]:
        """The next unread message of one of ``kinds``, skipping others (kept in ``messages``)."""
        deadline = time.monotonic() + timeout
        while True:
            while self._cursor < len(self.messages):
                msg = self.messages[self._cursor]
                self._cursor += 1
                if msg["type"] in kinds:
                    return msg
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no {kinds} within {timeout}s; got {[m['type'] for m in self.messages]}")
            await self._pull(remaining)

    async def drain(self, seconds: float) -> None:
        """Read whatever arrives for ``seconds``."""
        with contextlib.suppress(TimeoutError):
            deadline = time.monotonic() + seconds
            while (left := deadline - time.monotonic()) > 0:
                await self._pull(left)

    def of_type(self, kind: str) -> list[dict[str, Any]]:
        return [m for m in self.messages if m["type"] == kind]

    @property
    def media_bytes(self) -> bytes:
        return b"".join(data for _, data in self.media)

    async def close(self) -> None:
        await self.ws.close()


def tone_wav(seconds: float, *, rate: int = 16_000, speech: list[tuple[float, float]] | None = None) -> bytes:
    """A WAV file: a voice-like buzz during the ``speech`` intervals (default: all), silence elsewhere."""
    n = int(rate * seconds)
    t = np.arange(n) / rate
    voice = 0.4 * np.sign(np.sin(2 * np.pi * 140 * t)) * (0.6 + 0.4 * np.sin(2 * np.pi * 4 * t))
    mask = np.zeros(n, dtype=bool)
    for start, end in speech or [(0.0, seconds)]:
        mask[int(start * rate) : int(end * rate)] = True
    samples = (np.where(mask, voice, 0.0) * 32767).astype(np.int16)
    buf = io.BytesIO()
    with av.open(buf, "w", format="wav") as container:
        stream = container.add_stream("pcm_s16le", rate=rate, layout="mono")
        frame = av.AudioFrame.from_ndarray(samples[None, :], format="s16", layout="mono")
        frame.sample_rate = rate
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return buf.getvalue()


def decode_mp4(data: bytes) -> tuple[list[np.ndarray], float, float]:
    """Video frames (RGB), the video duration and the audio duration of an MP4."""
    with av.open(io.BytesIO(data)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    with av.open(io.BytesIO(data)) as container:
        audio = container.streams.audio[0]
        samples = sum(f.samples for f in container.decode(audio))
        rate = audio.rate
    return frames, len(frames) / 25, samples / rate
