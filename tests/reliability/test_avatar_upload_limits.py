"""Admin uploads are streamed to disk and checked while they stream: bytes, type, pixels, frames,
duration, each refused before the server spends memory on it."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import struct
import time
import zlib
from pathlib import Path

import av
import httpx
import numpy as np
import psutil
import pytest

from tests.server_harness import RunningServer, mint, run_server

ROOT = Path(__file__).resolve().parent.parent.parent
MAX_BYTES = 2_000_000
MAX_FRAMES = 30
MAX_SECONDS = 3.0


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    with run_server(
        tmp_path_factory.mktemp("uploads"),
        MTS_LIMITS__AVATAR_UPLOAD_BYTES=str(MAX_BYTES),
        MTS_LIMITS__AVATAR_UPLOAD_FRAMES=str(MAX_FRAMES),
        MTS_LIMITS__AVATAR_UPLOAD_SECONDS=str(MAX_SECONDS),
    ) as running:
        yield running


def admin() -> dict[str, str]:
    return {"Authorization": f"Bearer {mint('root', 'vip', roles=['admin'])}"}


def post(server: RunningServer, avatar_id: str, body: bytes, content_type: str) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/avatars?id={avatar_id}", content=body,
                      headers={**admin(), "Content-Type": content_type}, timeout=60)


def huge_png(side: int) -> bytes:
    """A valid 1-bit grayscale PNG of side x side pixels that compresses to a small file."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = bytes(1 + (side + 7) // 8)
    packer = zlib.compressobj(9)
    idat = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def small_mp4(seconds: float, fps: int = 25) -> bytes:
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width = stream.height = 64
        stream.pix_fmt = "yuv420p"
        for i in range(int(seconds * fps)):
            frame = av.VideoFrame.from_ndarray(np.full((64, 64, 3), i % 255, np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return buf.getvalue()


def test_a_huge_png_is_refused_from_its_header(server: RunningServer) -> None:
    png = huge_png(20_000)
    assert len(png) < MAX_BYTES
    rss = psutil.Process(server.process.pid).memory_info().rss
    response = post(server, "huge", png, "image/png")
    assert response.status_code == 413
    assert response.json()["code"] == "avatar_too_large" and "20000 x 20000" in response.json()["message"]
    time.sleep(1.0)
    assert psutil.Process(server.process.pid).memory_info().rss - rss < 100 << 20
    assert not any(a["id"] == "huge" for a in server.get("/v1/avatars").json())


async def test_a_declared_length_over_the_limit_is_refused_before_the_body(server: RunningServer) -> None:
    host, port = server.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        f"POST /v1/avatars?id=big HTTP/1.1\r\nHost: x\r\nAuthorization: {admin()['Authorization']}\r\n"
        "Content-Type: video/mp4\r\nContent-Length: 500000000\r\n\r\n".encode()
    )
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    length = next(
        int(line.split(b":", 1)[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")
    )
    body = await asyncio.wait_for(reader.readexactly(length), 10)  # the body may come in a segment of its own
    writer.close()
    assert b" 413 " in head.partition(b"\r\n")[0]
    assert json.loads(body)["code"] == "message_too_large"


async def test_a_body_over_the_limit_is_cut_as_it_streams(server: RunningServer) -> None:
    """Chunked, no length: the 413 comes once the limit is passed, while the client still sends."""
    host, port = server.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    token = admin()["Authorization"]
    writer.write(
        f"POST /v1/avatars?id=stream HTTP/1.1\r\nHost: x\r\nAuthorization: {token}\r\n"
        "Content-Type: video/mp4\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
    )
    head = small_mp4(0.2)[:64]
    chunk = head + bytes(65_536 - len(head))
    sent = 0
    response = b""
    try:
        while sent < 50 * MAX_BYTES and b"\r\n\r\n" not in response:
            writer.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
            sent += len(chunk)
            chunk = bytes(65_536)
            await writer.drain()
            with contextlib.suppress(TimeoutError):
                response += await asyncio.wait_for(reader.read(4096), 0.01)
    except ConnectionError:
        pass
    response += await asyncio.wait_for(reader.read(4096), 10)
    writer.close()
    status_line, _, rest = response.partition(b"\r\n")
    assert b" 413 " in status_line
    assert json.loads(rest.partition(b"\r\n\r\n")[2])["code"] == "message_too_large"
    assert sent < 5 * MAX_BYTES


def test_an_upload_whose_type_does_not_match_its_content_is_refused_at_once(server: RunningServer) -> None:
    png = (ROOT / "inference" / "assets" / "astronaut.png").read_bytes()
    mismatch = post(server, "mismatch", png, "video/mp4")
    assert mismatch.status_code == 415
    assert mismatch.json()["message"] == "Content-Type says an MP4/MOV video but the body is a PNG image"
    text = post(server, "text", b"this is not a picture at all" * 10, "image/png")
    assert text.status_code == 415 and text.json()["code"] == "bad_media"


def test_videos_are_probed_for_frames_and_duration(server: RunningServer) -> None:
    long_video = post(server, "long", small_mp4(MAX_SECONDS + 1, fps=5), "video/mp4")
    assert long_video.status_code == 413 and "lasts" in long_video.json()["message"]
    many_frames = post(server, "many", small_mp4(2.0, fps=25), "video/mp4")
    assert many_frames.status_code == 413 and "50 frames" in many_frames.json()["message"]


def test_a_good_image_is_still_accepted(server: RunningServer) -> None:
    png = (ROOT / "inference" / "assets" / "astronaut.png").read_bytes()
    response = post(server, "astro2", png, "image/png")
    assert response.status_code == 202
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if any(a["id"] == "astro2" and a["ready"] for a in server.get("/v1/avatars").json()):
            return
        time.sleep(0.5)
    raise AssertionError(server.log()[-2000:])
