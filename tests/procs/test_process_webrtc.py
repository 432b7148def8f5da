"""WebRTC in process mode: the worker process that renders a stream encodes its video to H.264,
and the server process only packetizes those packets (aiortc) and encodes the audio.

aiortc is the browser. What a user would notice: the answer is H.264, every frame arrives with
the avatar's own face, sound and picture share one clock, a lost picture reported by the peer is
repaired by a keyframe at once, an offer without H.264 is refused in words, and a worker killed
mid-stream ends the session with ``internal`` and gives its slot back."""

from __future__ import annotations

import asyncio
import os
import signal

import numpy as np
import pytest
from aiortc import RTCConfiguration, RTCPeerConnection, RTCRtpSender
from aiortc.sdp import SessionDescription
from PIL import Image

from tests.procs.test_process_mode import (
    ASTRONAUT,
    PROCESS_MODE,
    distance,
    metric,
    shm_entries,
    wait_for,
    worker_metric,
    worker_pid,
    worker_pids,
)
from tests.server_harness import Client, RunningServer, mint, run_server, tone_wav
from tests.test_e2e_webrtc import negotiate
from tests.test_sdk import check_clip_on_one_clock

WORKER_ENCODED = 'mts_webrtc_video_frames_total{encoded_in="worker"}'
SERVER_ENCODED = 'mts_webrtc_video_frames_total{encoded_in="server"}'


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    # no periodic keyframe within a test: every keyframe after the first was asked for
    with run_server(tmp_path_factory.mktemp("procs-webrtc"), MTS_ENGINE__SLOTS="4",
                    MTS_STREAM__WEBRTC_KEYFRAME_INTERVAL_S="600", **PROCESS_MODE) as running:
        wait_for(lambda: len(worker_pids(running)) == 2, "two worker processes", running)
        yield running


def video_codecs(sdp: str) -> set[str]:
    return {c.mimeType for m in SessionDescription.parse(sdp).media if m.kind == "video" for c in m.rtp.codecs}


async def start(server: RunningServer, sub: str, *, clip_s: float | None) -> Client:
    client = await Client.connect(server)
    await client.hello(mint(sub, "normal"))
    if clip_s is None:
        await client.send("start", avatar="astronaut", mode="live", transport="webrtc", audio={"format": "pcm_s16le"})
    else:
        await client.send("start", avatar="astronaut", mode="clip", transport="webrtc", audio={"format": "wav"})
        audio = tone_wav(clip_s)
        for at in range(0, len(audio), 1 << 18):  # (messages are at most 1 MiB)
            await client.ws.send(audio[at : at + (1 << 18)])
        await client.send("audio_end")
    await client.expect("granted")
    return client


async def until(condition, what: str, timeout: float = 30.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.05)
    assert condition(), what


async def close(client: Client, pc: RTCPeerConnection, tasks: list[asyncio.Task]) -> None:
    await pc.close()
    for task in tasks:
        task.cancel()
    await client.close()


async def test_a_clip_arrives_in_h264_encoded_by_the_worker_with_its_own_face(server: RunningServer) -> None:
    encoded_here, encoded_there = metric(server, SERVER_ENCODED), metric(server, WORKER_ENCODED)
    rings = shm_entries(server)
    client = await start(server, "face", clip_s=2.0)
    pc, video, audio, tasks = await negotiate(client)
    assert pc.remoteDescription is not None
    assert video_codecs(pc.remoteDescription.sdp) <= {"video/H264", "video/rtx"}, pc.remoteDescription.sdp
    assert "video/H264" in video_codecs(pc.remoteDescription.sdp)
    await until(lambda: len(video) >= 5, "frames arrive")
    assert shm_entries(server) == rings, "packets come through the pipe: no frame in shared memory"
    done = await client.expect("done", "error", timeout=60)
    assert done["type"] == "done" and done["frames"] == 50, done
    await asyncio.sleep(0.5)
    await close(client, pc, tasks)
    # The receiver holds the newest frame until the next packet arrives: 49 of 50 usually show.
    assert 48 <= len(video) <= 50
    assert {b.pts - a.pts for a, b in zip(video, video[1:], strict=False)} == {90_000 // 25}
    assert 1.85 <= sum(f.samples for f in audio) / 48_000 <= 2.0
    original = np.asarray(Image.open(ASTRONAUT).convert("RGB"))
    mirrored = np.ascontiguousarray(original[:, ::-1])
    for frame in (video[0], video[len(video) // 2], video[-1]):
        image = frame.to_ndarray(format="rgb24")
        assert image.shape == original.shape
        assert distance(image, original) * 3 < distance(image, mirrored)
    # every video frame the peer got was encoded in the worker, none in the server process
    assert metric(server, SERVER_ENCODED) == encoded_here
    assert metric(server, WORKER_ENCODED) - encoded_there >= 50


async def test_sound_and_picture_share_one_clock(server: RunningServer) -> None:
    await check_clip_on_one_clock(server, "webrtc")


async def test_a_lost_picture_reported_by_the_peer_gets_a_keyframe_from_the_worker(server: RunningServer) -> None:
    client = await start(server, "pli", clip_s=None)
    pc, video, _, tasks = await negotiate(client)
    await until(lambda: len(video) >= 10, "live idle frames arrive")
    keyframes = sum(f.key_frame for f in video)
    assert keyframes >= 1 and video[0].key_frame, "the stream starts with a keyframe"
    assert all(not f.key_frame for f in video[-5:]), "no periodic keyframe (interval 600 s)"
    receiver = next(t.receiver for t in pc.getTransceivers() if t.kind == "video")
    (source,) = receiver.getSynchronizationSources()
    seen = len(video)
    await receiver._send_rtcp_pli(source.source)  # what a browser sends when it lost a picture
    await until(lambda: len(video) >= seen + 25, "frames keep coming")
    assert sum(f.key_frame for f in video) == keyframes + 1, "one keyframe, at once"
    assert any(f.key_frame for f in video[seen : seen + 20])
    await close(client, pc, tasks)
    wait_for(lambda: server.get("/v1/queue").json()["slots"]["busy"] == 0, "the slot comes back", server)


async def test_an_offer_without_h264_is_refused_in_words(server: RunningServer) -> None:
    client = await start(server, "vp8", clip_s=None)
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    pc.addTransceiver("audio", direction="recvonly")
    video = pc.addTransceiver("video", direction="recvonly")
    video.setCodecPreferences([c for c in RTCRtpSender.getCapabilities("video").codecs if c.mimeType == "video/VP8"])
    await pc.setLocalDescription(await pc.createOffer())
    await client.send("webrtc_offer", sdp=pc.localDescription.sdp)
    error = await client.expect("error", timeout=20)
    assert error["code"] == "bad_message" and "no H.264 video" in error["message"], error
    await pc.close()
    await client.close()
    wait_for(lambda: server.get("/v1/queue").json()["slots"]["busy"] == 0, "the slot comes back", server)


async def test_a_killed_worker_ends_its_webrtc_session_with_internal_and_frees_the_slot(
    server: RunningServer,
) -> None:
    wait_for(lambda: worker_metric(server, "mts_worker_up") == {"worker-0": 1, "worker-1": 1}, "both up", server)
    client = await start(server, "killed", clip_s=30.0)
    pc, video, _, tasks = await negotiate(client)
    await until(lambda: len(video) >= 10, "frames arrive")
    wait_for(lambda: sum(worker_metric(server, "mts_worker_streams").values()) == 1, "one stream", server)
    streams = worker_metric(server, "mts_worker_streams")
    (encoder,) = [name for name, n in streams.items() if n == 1]
    os.kill(worker_pid(server, encoder), signal.SIGKILL)
    ended = await client.expect("done", "error", timeout=60)
    assert ended["type"] == "error" and ended["code"] == "internal", ended
    await close(client, pc, tasks)
    wait_for(lambda: server.get("/v1/queue").json()["slots"]["busy"] == 0, "the slot comes back", server)
    wait_for(lambda: worker_metric(server, "mts_worker_up").get(encoder) == 1, "the worker is back", server)
    again = await start(server, "after-kill", clip_s=1.0)
    pc, video, _, tasks = await negotiate(again)
    done = await again.expect("done", "error", timeout=60)
    assert done["type"] == "done" and done["frames"] == 25, done
    await asyncio.sleep(0.5)
    await close(again, pc, tasks)
    assert len(video) >= 23
