"""The real server streams lip-synced clips over the socket; PyAV decodes what arrives."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.server_harness import Client, RunningServer, decode_mp4, mint, run_server, tone_wav

CLIP = {"avatar": "astronaut", "mode": "clip", "transport": "mse", "audio": {"format": "wav"}}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    with run_server(
        tmp_path_factory.mktemp("stream"),
        MTS_ENGINE__SLOTS="2",
        MTS_LIMITS__MAX_AUDIO_SECONDS="30",
        MTS_LIMITS__START_BURST="100",
    ) as running:
        yield running


async def run_clip(server: RunningServer, payload: bytes, sub: str, **start: object) -> Client:
    client = await Client.connect(server)
    await client.hello(mint(sub, "normal"))
    await client.send("start", **{**CLIP, **start})
    await client.ws.send(payload)
    await client.send("audio_end")
    await client.expect("done", "error", timeout=120)
    return client


def gauge(server: RunningServer, name: str) -> float:
    match = re.search(rf"^{name} (\S+)$", server.get("/metrics").text, re.M)
    return float(match.group(1)) if match else float("nan")


def frames_total(server: RunningServer) -> float:
    return gauge(server, "mts_frames_total")


async def start_long_clip(server: RunningServer, sub: str) -> Client:
    """A 25 s clip whose first media segment has arrived: the stream is mid-way."""
    client = await Client.connect(server)
    await client.hello(mint(sub, "normal"))
    await client.send("start", **CLIP)
    await client.ws.send(tone_wav(25.0))
    await client.send("audio_end")
    await client.expect("stream", timeout=60)
    return client


async def test_clip_streams_a_playable_lip_synced_video(server: RunningServer) -> None:
    client = await run_clip(server, tone_wav(3.0, speech=[(0.0, 1.0), (2.0, 3.0)]), "hana")
    stream = client.of_type("stream")[0]
    assert stream["transport"] == "mse" and stream["fps"] == 25
    assert re.fullmatch(r'video/mp4; codecs="avc1\.[0-9A-F]{6}, mp4a\.40\.2"', stream["mime"])
    done = client.of_type("done")[0]
    assert done["frames"] == 75 and done["duration_s"] == pytest.approx(3.0)
    progress = client.of_type("progress")
    assert progress[-1] == {**progress[-1], "frames": 75, "total": 75}

    frames, video_s, audio_s = decode_mp4(client.media_bytes)
    assert abs(len(frames) - 75) <= 1
    assert abs(audio_s - 3.0) <= 0.04 + 0.03
    assert (frames[0].shape[1], frames[0].shape[0]) == (stream["width"], stream["height"])

    # The astronaut's mouth lies in rows 120-210, columns 170-280 of the 512 px frame.
    mouth = (slice(120, 210), slice(170, 280))
    silent = np.stack([f.astype(np.int16) for f in frames[36:46]])
    speech = np.stack([f.astype(np.int16) for f in frames[10:25] + frames[55:70]])
    rest = silent[0]
    silence_change = np.abs(silent - rest).mean(axis=(1, 2, 3)).max()
    mouth_change = np.abs(speech[:, mouth[0], mouth[1]] - rest[mouth]).mean(axis=(1, 2, 3))
    assert silence_change < 0.5
    assert mouth_change.min() > 5.0
    elsewhere = np.abs(speech - rest)
    elsewhere[:, mouth[0], mouth[1]] = 0
    assert elsewhere.mean() < 1.0

    clip = server.get(done["clip"])
    assert clip.status_code == 200 and clip.content == client.media_bytes
    assert clip.headers["cache-control"] == "public, max-age=31536000, immutable"
    etag = clip.headers["etag"]
    assert etag.startswith('"') and not etag.startswith("W/")
    assert server.get(done["clip"], headers={"If-None-Match": etag}).status_code == 304
    part = server.get(done["clip"], headers={"Range": "bytes=0-99"})
    assert part.status_code == 206 and part.content == client.media_bytes[:100]
    await client.close()


async def test_first_segment_arrives_before_the_last_frame_is_generated(server: RunningServer) -> None:
    client = await run_clip(server, tone_wav(20.0), "ivan")
    total = client.of_type("done")[0]["frames"]
    assert total == 500
    first_media = next(t for t, kind in client.events if kind == "media")
    complete = next(m["_t"] for m in client.of_type("progress") if m["frames"] == total)
    assert first_media < complete
    later = [m for m in client.of_type("progress") if m["_t"] > first_media]
    assert later and min(m["frames"] for m in later) < total
    first_box = client.media[0][1]
    assert first_box[4:8] == b"ftyp"
    assert all(data[4:8] == b"moof" for _, data in client.media[1:])
    await client.close()


async def test_the_same_clip_again_comes_from_the_cache(server: RunningServer) -> None:
    audio = tone_wav(1.0)
    first = await run_clip(server, audio, "judy")
    second = await run_clip(server, audio, "judy")
    assert second.of_type("done")[0]["clip"] == first.of_type("done")[0]["clip"]
    assert second.media_bytes == first.media_bytes
    await first.close()
    await second.close()


@pytest.mark.parametrize(
    ("audio", "fmt", "code"),
    [
        (b"RIFF\x00\x00\x00\x00garbage that is not audio" * 10, "wav", "bad_audio"),
        (tone_wav(1.0), "mp3", "bad_audio"),
        (b"", "wav", "bad_audio"),
        (tone_wav(31.0), "wav", "audio_too_long"),
    ],
)
async def test_bad_audio_gets_a_clear_error_and_frees_everything(
    server: RunningServer, audio: bytes, fmt: str, code: str
) -> None:
    client = await run_clip(server, audio, f"bad-{fmt}-{len(audio)}", audio={"format": fmt})
    assert client.of_type("error")[-1]["code"] == code
    await asyncio.sleep(0.2)
    summary = server.get("/v1/queue").json()
    assert summary["slots"]["busy"] == 0 and all(t["size"] == 0 for t in summary["tiers"].values())
    await client.send("start", **CLIP)
    await client.ws.send(tone_wav(0.4))
    await client.send("audio_end")
    assert (await client.expect("done"))["type"] == "done"
    # Audio refused on arrival ends the request at once: the audio_end sent after it is stale.
    assert [e["code"] for e in client.of_type("error")][1:] in ([], ["bad_message"])
    await client.close()


async def test_webrtc_offer_before_grant_is_not_granted(server: RunningServer) -> None:
    client = await Client.connect(server)
    await client.hello()
    await client.send("webrtc_offer", sdp="v=0")
    assert (await client.expect("error"))["code"] == "not_granted"
    await client.close()


async def test_disconnect_while_streaming_frees_the_slot_and_stops_the_worker(server: RunningServer) -> None:
    before = frames_total(server)
    client = await start_long_clip(server, "kim")
    client.ws.transport.abort()
    await asyncio.sleep(0.5)
    assert server.get("/v1/queue").json()["slots"]["busy"] == 0
    produced = frames_total(server)
    await asyncio.sleep(1.0)
    assert frames_total(server) == produced
    assert produced - before < 25 * 25


async def test_cancel_while_streaming_keeps_the_socket_usable(server: RunningServer) -> None:
    client = await start_long_clip(server, "leo")
    await client.send("cancel")
    await client.send("ping", id="after-cancel")
    assert (await client.expect("pong"))["id"] == "after-cancel"
    await asyncio.sleep(0.3)
    assert server.get("/v1/queue").json()["slots"]["busy"] == 0
    assert not client.of_type("done")
    await client.send("start", **CLIP)
    await client.ws.send(tone_wav(0.5))
    await client.send("audio_end")
    done = await client.expect("done", timeout=60)
    assert done["frames"] == 12
    await client.close()


async def test_live_session_idles_speaks_and_interrupts(tmp_path: Path) -> None:
    with run_server(tmp_path) as server:
        client = await Client.connect(server)
        await client.hello(mint("mia", "vip"))
        await client.send("start", avatar="astronaut", mode="live", transport="mse",
                          audio={"format": "pcm_s16le", "sample_rate": 16000, "channels": 1})
        await client.expect("granted")
        await client.drain(1.5)
        speech = tone_wav(8.0)[44:]
        for offset in range(0, len(speech), 6400):
            await client.ws.send(speech[offset : offset + 6400])
        await client.send("audio_end")
        await client.drain(1.5)
        await client.send("interrupt")
        await client.drain(2.0)
        await client.send("cancel")
        await client.drain(0.5)
        assert not client.of_type("error")
        frames, video_s, audio_s = decode_mp4(client.media_bytes)
        assert abs(audio_s - video_s) < 0.1
        # Live frames are paced at 25 a second from the grant: frame i is shown i / 25 s after it.
        assert len(frames) >= 100
        mouth = (slice(120, 210), slice(170, 280))
        rest = frames[10].astype(np.int16)[mouth]
        change = np.array([np.abs(f.astype(np.int16)[mouth] - rest).mean() for f in frames])
        talking = change > 8.0
        assert not talking[:30].any(), "idle frames before any audio"
        assert talking[40:75].sum() > 20, "the mouth moves while speech plays"
        assert not talking[-25:].any(), "after interrupt the avatar is idle again"
        assert talking.sum() < 8.0 * 25 * 0.6, "interrupt dropped the rest of the 8 s utterance"
        await client.close()


def test_command_line_client_writes_a_playable_mp4(server: RunningServer, tmp_path: Path) -> None:
    audio = tmp_path / "speech.wav"
    audio.write_bytes(tone_wav(2.0))
    out = tmp_path / "out.mp4"
    result = subprocess.run(
        [sys.executable, "-m", "stream_server", "client", "--avatar", "astronaut", "--audio", str(audio),
         "-o", str(out), "--server", server.url, "--token", mint("nick", "normal")],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "position 1" in result.stderr and "50/50 frames" in result.stderr
    frames, _, audio_s = decode_mp4(out.read_bytes())
    assert len(frames) == 50 and abs(audio_s - 2.0) < 0.07


def test_command_line_client_reports_errors(server: RunningServer, tmp_path: Path) -> None:
    audio = tmp_path / "speech.wav"
    audio.write_bytes(b"not a wav file at all" * 100)
    result = subprocess.run(
        [sys.executable, "-m", "stream_server", "client", "--avatar", "astronaut", "--audio", str(audio),
         "-o", str(tmp_path / "out.mp4"), "--server", server.url],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 1 and "bad_audio" in result.stderr
    assert not (tmp_path / "out.mp4").exists()


async def test_clients_vanishing_at_every_stage_leak_nothing(tmp_path: Path) -> None:
    with run_server(tmp_path, MTS_ENGINE__SLOTS="2", MTS_QUEUE__RESUME_GRACE_S="0.5",
                    MTS_LIMITS__START_BURST="1000") as server:
        audio = tone_wav(3.0)
        for round_ in range(6):
            clients = []
            for i in range(5):
                client = await Client.connect(server)
                await client.hello(mint(f"ghost-{i}", "normal"))
                await client.send("start", **CLIP)
                if i % 2 == 0:
                    await client.ws.send(audio[: len(audio) // 2])
                else:
                    await client.ws.send(audio)
                    await client.send("audio_end")
                clients.append(client)
            await asyncio.sleep(0.05 * round_)
            for client in clients:
                client.ws.transport.abort()
        await asyncio.sleep(2.0)
        assert gauge(server, "mts_connections") == 0
        assert gauge(server, "mts_sessions_active") == 0
        summary = server.get("/v1/queue").json()
        assert summary["slots"]["busy"] == 0 and all(t["size"] == 0 for t in summary["tiers"].values())
        client = await Client.connect(server)
        await client.hello(mint("ghost-0", "normal"))
        await client.send("start", **CLIP)
        await client.ws.send(tone_wav(0.4))
        await client.send("audio_end")
        assert (await client.expect("done", "error"))["type"] == "done"
        await client.close()
        # every upload was closed where its request ended (a new join superseding a parked
        # ticket of the same identity too), not released late by the garbage collector
        assert "dropped without being closed" not in server.log()
