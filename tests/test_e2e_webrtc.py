"""WebRTC through the session socket: aiortc as the browser, the real server as the peer."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import pytest
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError

from tests.server_harness import Client, RunningServer, mint, run_server, tone_wav


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    with run_server(tmp_path_factory.mktemp("webrtc"), MTS_ENGINE__SLOTS="2") as running:
        yield running


async def collect(track, sink: list) -> None:
    with contextlib.suppress(MediaStreamError):
        while True:
            sink.append(await track.recv())


async def negotiate(client: Client) -> tuple[RTCPeerConnection, list, list, list[asyncio.Task]]:
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    pc.addTransceiver("audio", direction="recvonly")
    pc.addTransceiver("video", direction="recvonly")
    video: list = []
    audio: list = []
    tasks: list[asyncio.Task] = []

    @pc.on("track")
    def on_track(track) -> None:
        tasks.append(asyncio.ensure_future(collect(track, video if track.kind == "video" else audio)))

    await pc.setLocalDescription(await pc.createOffer())
    await client.send("webrtc_offer", sdp=pc.localDescription.sdp, id="offer-1")
    answer = await client.expect("webrtc_answer", "error")
    assert answer["type"] == "webrtc_answer" and answer["id"] == "offer-1", answer
    await pc.setRemoteDescription(RTCSessionDescription(answer["sdp"], "answer"))
    return pc, video, audio, tasks


async def test_clip_over_webrtc_delivers_every_frame_with_its_audio(server: RunningServer) -> None:
    client = await Client.connect(server)
    await client.hello(mint("olga", "normal"))
    await client.send("start", avatar="astronaut", mode="clip", transport="webrtc", audio={"format": "wav"})
    await client.ws.send(tone_wav(2.0))
    await client.send("audio_end")
    await client.expect("granted")
    pc, video, audio, tasks = await negotiate(client)
    stream = await client.expect("stream")
    assert stream["transport"] == "webrtc" and stream["fps"] == 25
    done = await client.expect("done", "error", timeout=60)
    assert done["type"] == "done" and done["frames"] == 50 and done.get("clip") is None
    await asyncio.sleep(0.5)
    await pc.close()
    for task in tasks:
        await task
    # The receiver holds the newest frame until the next packet arrives: 49 of 50 usually show.
    assert 48 <= len(video) <= 50
    audio_s = sum(f.samples for f in audio) / 48_000
    assert 1.85 <= audio_s <= 2.0
    steps = {b.pts - a.pts for a, b in zip(video, video[1:], strict=False)}
    assert steps == {90_000 // 25}, "one frame every 40 ms on the stream clock"
    # thread mode: aiortc encodes the pictures in the server process
    encoded = {line.split()[0]: float(line.split()[1]) for line in server.get("/metrics").text.splitlines()
               if line.startswith("mts_webrtc_video_frames_total")}
    assert encoded == {'mts_webrtc_video_frames_total{encoded_in="server"}': pytest.approx(50, abs=2)}, encoded
    await client.close()


async def test_peer_that_goes_away_frees_the_slot(server: RunningServer) -> None:
    client = await Client.connect(server)
    await client.hello(mint("pete", "normal"))
    await client.send("start", avatar="astronaut", mode="live", transport="webrtc",
                      audio={"format": "pcm_s16le"})
    await client.expect("granted")
    pc, video, _, tasks = await negotiate(client)
    for _ in range(100):
        if len(video) >= 10:
            break
        await asyncio.sleep(0.1)
    assert len(video) >= 10, "live idle frames arrive"
    assert server.get("/v1/queue").json()["slots"]["busy"] == 1
    await pc.close()
    for task in tasks:
        await task
    for _ in range(50):
        if server.get("/v1/queue").json()["slots"]["busy"] == 0:
            break
        await asyncio.sleep(0.1)
    assert server.get("/v1/queue").json()["slots"]["busy"] == 0
    await client.close()


async def test_bad_offer_is_refused_clearly(tmp_path: Path) -> None:
    with run_server(tmp_path, MTS_STREAM__WEBRTC_OFFER_TIMEOUT_S="2") as server:
        client = await Client.connect(server)
        await client.hello(mint("quinn", "normal"))
        await client.send("start", avatar="astronaut", mode="live", transport="webrtc")
        await client.expect("granted")
        await client.send("webrtc_offer", sdp="v=0\r\nnot really sdp")
        err = await client.expect("error")
        assert err["code"] == "bad_message" and "webrtc_offer" in err["message"]
        await asyncio.sleep(0.3)
        assert server.get("/v1/queue").json()["slots"]["busy"] == 0
        await client.send("start", avatar="astronaut", mode="live", transport="webrtc")
        await client.expect("granted")
        err = await client.expect("error", timeout=10)
        assert err["code"] == "bad_message" and "no webrtc_offer" in err["message"]
        await client.close()
