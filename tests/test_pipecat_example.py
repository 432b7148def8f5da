"""examples/pipecat_bot.py starts, serves its page, and a WebRTC peer gets the avatar's video."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

pytest.importorskip("pipecat")

from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription  # noqa: E402
from aiortc.mediastreams import MediaStreamError  # noqa: E402

from tests.server_harness import ROOT, free_port, run_server  # noqa: E402


async def test_the_example_bot_serves_its_page_and_the_avatar(tmp_path: Path) -> None:
    with run_server(tmp_path) as server:
        port = free_port()
        log = (tmp_path / "bot.log").open("wb")
        bot = subprocess.Popen(
            [sys.executable, "examples/pipecat_bot.py", "--server", server.url, "--port", str(port)],
            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
        )
        url = f"http://127.0.0.1:{port}"
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        try:
            deadline = time.monotonic() + 60
            while True:
                assert bot.poll() is None, (tmp_path / "bot.log").read_text()
                with contextlib.suppress(httpx.HTTPError):
                    page = httpx.get(url + "/", timeout=1)
                    break
                assert time.monotonic() < deadline, "the example never served its page"
                await asyncio.sleep(0.2)
            assert page.status_code == 200 and "RTCPeerConnection" in page.text

            pc.addTransceiver("audio", direction="recvonly")  # SmallWebRTC's order: audio, then video
            pc.addTransceiver("video", direction="recvonly")
            video: list = []
            tracks: list[asyncio.Task] = []

            async def pull(track) -> None:
                with contextlib.suppress(MediaStreamError):
                    while True:
                        frame = await track.recv()
                        if track.kind == "video":
                            video.append(frame)

            pc.on("track", lambda track: tracks.append(asyncio.ensure_future(pull(track))))
            await pc.setLocalDescription(await pc.createOffer())
            async with httpx.AsyncClient(timeout=30) as http:
                reply = await http.post(url + "/api/offer", json={"sdp": pc.localDescription.sdp, "type": "offer"})
            assert reply.status_code == 200, reply.text
            answer = reply.json()
            await pc.setRemoteDescription(RTCSessionDescription(answer["sdp"], answer["type"]))
            async with asyncio.timeout(60):
                while len(video) < 50:
                    await asyncio.sleep(0.1)
            assert (video[-1].width, video[-1].height) == (512, 512)
            # The avatar itself, not the grey still shown while waiting for a slot.
            assert video[-1].to_ndarray(format="rgb24").std() > 10
        finally:
            await pc.close()
            bot.terminate()
            bot.wait(10)
            log.close()
