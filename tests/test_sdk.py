"""The Python SDK against a real server process: decoded frames on the session clock, the queue,
live control, redirects followed and errors raised, never hangs."""

from __future__ import annotations

import asyncio
import contextlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import websockets

from stream_server.sdk import (
    AUDIO_RATE,
    AudioChunk,
    ConnectionLost,
    Done,
    Granted,
    Queued,
    Redirect,
    ServerError,
    StreamStart,
    VideoFrame,
    connect,
)
from tests.server_harness import Client, RunningServer, free_port, mint, run_server, tone_wav

LIVE = {"avatar": "astronaut", "mode": "live", "transport": "mse", "audio": {"format": "pcm_s16le"}}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    with run_server(tmp_path_factory.mktemp("sdk"), MTS_ENGINE__SLOTS="1", MTS_LIMITS__START_BURST="50") as running:
        yield running


async def hold_slot(server: RunningServer, sub: str) -> Client:
    holder = await Client.connect(server)
    await holder.hello(mint(sub, "vip"))
    await holder.send("start", **LIVE)
    await holder.expect("granted")
    return holder


def split(media: list[Any]) -> tuple[list[VideoFrame], list[AudioChunk]]:
    return [m for m in media if isinstance(m, VideoFrame)], [m for m in media if isinstance(m, AudioChunk)]


def pcm16k(seconds: float) -> np.ndarray:
    t = np.arange(int(16_000 * seconds)) / 16_000
    return (0.4 * np.sign(np.sin(2 * np.pi * 140 * t)) * 32767).astype(np.int16)


@pytest.mark.parametrize("transport", ["mse", "webrtc"])
async def test_clip_frames_and_audio_on_one_clock(server: RunningServer, transport: str) -> None:
    await check_clip_on_one_clock(server, transport)


async def check_clip_on_one_clock(server: RunningServer, transport: str) -> None:
    """A clip of one second of speech then one of silence: every frame, one clock for sound and
    picture, the mouth moving during the speech only (also run in process mode)."""
    async with await connect(server.url, token=mint(f"clip-{transport}", "normal")) as conn:
        assert conn.welcome is not None and conn.welcome.engine == "lite"
        clip = await conn.speak(tone_wav(2.0, speech=[(0.0, 1.0)]), avatar="astronaut", transport=transport)
        done, media = await clip.result()
    video, audio = split(media)
    assert done.frames == 50
    # WebRTC: the receiver holds the newest frame until another packet comes, so one may not show.
    assert len(video) == 50 if transport == "mse" else 48 <= len(video) <= 50
    assert all(f.image.shape == (512, 512, 3) and f.image.dtype == np.uint8 for f in video)
    steps = np.diff([f.pts_s for f in video])
    assert np.allclose(steps, 0.04, atol=1e-3), "one frame every 40 ms on the session clock"
    assert video[0].pts_s == pytest.approx(0.0, abs=0.05)
    assert all(c.sample_rate == AUDIO_RATE and c.samples.dtype == np.int16 for c in audio)
    assert sum(c.duration_s for c in audio) == pytest.approx(2.0, abs=0.15)
    # The speech second is loud and the silent second is quiet on the same clock as the video.
    loud = np.concatenate([c.samples for c in audio if 0.1 <= c.pts_s < 0.9]).astype(np.float64)
    quiet = np.concatenate([c.samples for c in audio if 1.2 <= c.pts_s < 1.9]).astype(np.float64)
    assert np.sqrt(np.mean(loud**2)) > 20 * (np.sqrt(np.mean(quiet**2)) + 1)
    # And the mouth moves while there is speech, not after it.
    rest = video[-1].image.astype(np.int16)
    talking = [np.abs(f.image.astype(np.int16) - rest).mean() for f in video if 0.2 <= f.pts_s < 0.8]
    resting = [np.abs(f.image.astype(np.int16) - rest).mean() for f in video if 1.4 <= f.pts_s < 1.9]
    assert min(talking) > max(resting)


async def test_queue_events_then_grant_then_live_control(server: RunningServer) -> None:
    holder = await hold_slot(server, "sdk-holder")
    conn = await connect(server.url, token=mint("sdk-live", "normal"))
    live = await conn.live(avatar="astronaut")
    events = live.__aiter__()
    first = await asyncio.wait_for(events.__anext__(), 10)
    assert isinstance(first, Queued) and first.position == 1 and live.position == 1
    await holder.close()
    granted = await asyncio.wait_for(live.wait_granted(), 20)
    assert isinstance(granted, Granted)
    seen: list[Any] = []
    sent = False
    async with asyncio.timeout(30):
        async for event in events:
            seen.append(event)
            if isinstance(event, VideoFrame) and not sent:
                await live.send_audio(pcm16k(1.0))
                await live.end_utterance()
                sent = True
            if isinstance(event, VideoFrame) and event.pts_s >= 3.0:
                break
    await live.interrupt()
    await live.cancel()
    assert any(isinstance(e, StreamStart) and e.transport == "mse" for e in seen)
    video, audio = split(seen)
    assert len(video) >= 75 and np.allclose(np.diff([f.pts_s for f in video]), 0.04, atol=1e-3)
    levels = [np.abs(c.samples.astype(np.int32)).max() for c in audio]
    assert max(levels) > 5000, "the speech sent comes back as the stream's audio"
    # The connection is usable again after cancel.
    clip = await conn.speak(tone_wav(0.4), avatar="astronaut")
    done, _ = await clip.result()
    assert done.frames == 10
    await conn.close()


async def test_errors_are_raised_with_their_code(server: RunningServer) -> None:
    async with await connect(server.url) as conn:
        clip = await conn.speak(tone_wav(0.5), avatar="nobody")
        with pytest.raises(ServerError) as caught:
            await clip.result()
        assert caught.value.code == "unknown_avatar"
    with pytest.raises(ServerError) as refused:
        await connect(server.url, token="not-a-token")
    assert refused.value.code == "invalid_token"


async def test_redirect_is_followed_with_the_grant(server: RunningServer) -> None:
    """A front node that sends ``redirect``: it parks a ticket on the real server for the client's
    identity (the grant is that ticket's resume token) and points the client there."""
    holder = await hold_slot(server, "redirect-holder")
    token = mint("redirected", "normal")
    audio = tone_wav(0.8)
    front_done = asyncio.Event()

    async def front(ws: websockets.ServerConnection) -> None:
        hello = json.loads(await ws.recv())
        limits = {"max_audio_seconds": 120, "max_audio_bytes": 1 << 24, "max_message_bytes": 1 << 20,
                  "max_live_session_s": 1800, "fps": 25}
        await ws.send(json.dumps({"type": "welcome", "session": "front", "tier": "normal", "resume": "x",
                                  "engine": "lite", "limits": limits}))
        start = json.loads(await ws.recv())
        upload = b""
        while isinstance(message := await ws.recv(), bytes):
            upload += message
        assert json.loads(message)["type"] == "audio_end"
        async with websockets.connect(server.ws_url, max_size=None) as upstream:
            await upstream.send(json.dumps({"type": "hello", "token": hello["token"]}))
            welcome = json.loads(await upstream.recv())
            await upstream.send(json.dumps(start))
            await upstream.send(upload)
            await upstream.send(json.dumps({"type": "audio_end"}))
            while json.loads(await upstream.recv())["type"] != "queued":
                pass
        await asyncio.sleep(0.5)  # the real server parks the ticket once it sees the socket close
        await ws.send(json.dumps({"type": "queued", "position": 1, "queue_size": 1, "tier": "normal",
                                  "eta_s": None}))
        await ws.send(json.dumps({"type": "redirect", "url": server.url, "grant": welcome["resume"]}))
        with contextlib.suppress(websockets.ConnectionClosed):
            await ws.recv()
        front_done.set()

    port = free_port()
    async with websockets.serve(front, "127.0.0.1", port):
        conn = await connect(f"ws://127.0.0.1:{port}", token=token)
        clip = await conn.speak(audio, avatar="astronaut")
        kinds: list[str] = []
        media: list[Any] = []
        async with asyncio.timeout(60):
            async for event in clip:
                kinds.append(type(event).__name__)
                if isinstance(event, Redirect):
                    await asyncio.sleep(0.5)
                    await holder.close()
                if isinstance(event, (VideoFrame, AudioChunk)):
                    media.append(event)
        await asyncio.wait_for(front_done.wait(), 10)
        await conn.close()
    assert clip.error is None, clip.error
    assert isinstance(clip.done, Done) and clip.done.frames == 20
    assert kinds.index("Redirect") < kinds.index("Granted") < kinds.index("StreamStart") < kinds.index("Done")
    video, _ = split(media)
    assert len(video) == 20


async def test_server_going_away_ends_the_request(tmp_path: Path) -> None:
    with run_server(tmp_path) as doomed:
        conn = await connect(doomed.url)
        live = await conn.live(avatar="astronaut")
        await asyncio.wait_for(live.wait_granted(), 20)
        doomed.process.kill()
        async with asyncio.timeout(20):
            async for _ in live:
                pass
        assert isinstance(live.error, ConnectionLost)
        await conn.close()
