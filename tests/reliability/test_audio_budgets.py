"""Audio attacks against a real server: budgets across utterances and across the node, content that
does not match its declared format, and what a waiting request keeps."""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import re
import tempfile
from pathlib import Path

import av
import numpy as np
import pytest

from tests.server_harness import Client, RunningServer, mint, run_server, tone_wav

QUEUED_AUDIO_BYTES = 400_000
CLIP = {"avatar": "astronaut", "mode": "clip", "transport": "mse", "audio": {"format": "wav"}}
LIVE = {"avatar": "astronaut", "mode": "live", "transport": "mse",
        "audio": {"format": "pcm_s16le", "sample_rate": 16000, "channels": 1}}
PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(2000)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    with run_server(
        tmp_path_factory.mktemp("audio"),
        MTS_ENGINE__SLOTS="1",
        MTS_LIMITS__START_BURST="100",
        MTS_LIMITS__QUEUED_AUDIO_BYTES=str(QUEUED_AUDIO_BYTES),
    ) as running:
        yield running


def silent_flac(seconds: float, rate: int = 16_000) -> bytes:
    buf = io.BytesIO()
    with av.open(buf, "w", format="flac") as container:
        stream = container.add_stream("flac", rate=rate, layout="mono")
        frame = av.AudioFrame.from_ndarray(np.zeros((1, int(seconds * rate)), np.int16), format="s16", layout="mono")
        frame.sample_rate = rate
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            container.mux(packet)
    return buf.getvalue()


def metric(server: RunningServer, name: str) -> float:
    match = re.search(rf"^{name} (\S+)$", server.get("/metrics").text, re.M)
    assert match, name
    return float(match.group(1))


def spool_files(server: RunningServer) -> list[str]:
    """The server's open, unnamed files in the temporary folder (the spool's files)."""
    targets = []
    for fd in Path(f"/proc/{server.process.pid}/fd").iterdir():
        with contextlib.suppress(FileNotFoundError):
            targets.append(os.readlink(fd))
    return [t for t in targets if t.startswith(tempfile.gettempdir()) and t.endswith("(deleted)")]


async def hold_slot(server: RunningServer, sub: str) -> Client:
    holder = await Client.connect(server)
    await holder.hello(mint(sub, "vip"))
    await holder.send("start", **LIVE)
    await holder.expect("granted")
    return holder


async def waiting(server: RunningServer, sub: str, **start: object) -> Client:
    client = await Client.connect(server)
    await client.hello(mint(sub, "normal"))
    await client.send("start", **{**CLIP, **start})
    await client.expect("queued")
    return client


async def settle(server: RunningServer) -> None:
    """Everything released: no busy slot, nobody waiting, no audio kept."""
    for _ in range(50):
        summary = server.get("/v1/queue").json()
        if (summary["slots"]["busy"] == 0 and all(t["size"] == 0 for t in summary["tiers"].values())
                and metric(server, "mts_queued_audio_bytes") == 0):
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"not settled: {summary}, {metric(server, 'mts_queued_audio_bytes')} bytes kept")


async def test_a_png_declared_as_wav_is_refused_before_the_grant(server: RunningServer) -> None:
    holder = await hold_slot(server, "holder-png")
    client = await waiting(server, "png")
    await client.ws.send(PNG)
    err = await client.expect("error")
    assert err["code"] == "bad_audio" and "PNG image" in err["message"] and "Errno" not in err["message"]
    assert not client.of_type("granted")
    await holder.close()
    await client.close()
    await settle(server)


async def test_a_text_file_declared_as_mp3_is_refused_in_words(server: RunningServer) -> None:
    holder = await hold_slot(server, "holder-text")
    client = await waiting(server, "text", audio={"format": "mp3"})
    await client.ws.send(b"Dear diary, today I uploaded a text file as an MP3.\n" * 20)
    err = await client.expect("error")
    assert err["code"] == "bad_audio" and "text" in err["message"]
    assert not re.search(r"Errno|\d{5,}", err["message"])
    await holder.close()
    await client.close()
    await settle(server)


async def test_undecodable_audio_behind_a_valid_header_is_refused_before_the_grant(server: RunningServer) -> None:
    holder = await hold_slot(server, "holder-broken")
    client = await waiting(server, "broken", audio={"format": "mp3"})
    await client.ws.send(b"\xff\xfb\x90\x00" + bytes(range(256)) * 8)
    await client.send("audio_end")
    err = await client.expect("error")
    assert err["code"] == "bad_audio" and not re.search(r"Errno|\d{5,}", err["message"])
    assert not client.of_type("granted")
    await holder.close()
    await client.close()
    await settle(server)


async def test_live_utterances_share_one_audio_limit(server: RunningServer) -> None:
    """119 s of silent FLAC (a few kB) as many utterances: the limit counts them all together."""
    holder = await hold_slot(server, "holder-flac")
    flac = silent_flac(119.0)
    assert len(flac) < 60_000
    client = await waiting(server, "flac", mode="live", audio={"format": "flac"})
    for _ in range(5):
        await client.ws.send(flac)
        await client.send("audio_end")
    err = await client.expect("error")
    assert err["code"] == "audio_too_long" and "together" in err["message"]
    await holder.close()
    await client.close()
    await settle(server)


async def test_the_node_budget_for_waiting_audio_answers_queue_full(server: RunningServer) -> None:
    holder = await hold_slot(server, "holder-budget")
    first = await waiting(server, "budget-1")
    clip = tone_wav(9.0)  # 288 kB: most of the 400 kB budget
    await first.ws.send(clip)
    await first.send("audio_end")
    await first.send("ping", id="sent")
    await first.expect("pong")
    assert metric(server, "mts_queued_audio_bytes") == len(clip)
    assert metric(server, "mts_queued_audio_bytes_limit") == QUEUED_AUDIO_BYTES

    second = await waiting(server, "budget-2")
    await second.ws.send(clip)
    err = await second.expect("error")
    assert err["code"] == "queue_full" and err["retry_after_s"] > 0
    assert metric(server, "mts_queued_audio_bytes") == len(clip)

    await first.send("cancel")
    await first.send("ping", id="cancelled")
    await first.expect("pong")
    assert metric(server, "mts_queued_audio_bytes") == 0
    await second.send("start", **CLIP)
    await second.expect("queued")
    await second.ws.send(clip)
    await second.send("audio_end")
    await holder.close()
    done = await second.expect("done", "error", timeout=120)
    assert done["type"] == "done" and done["frames"] == 225
    for client in (first, second):
        await client.close()
    await settle(server)


async def test_a_waiting_clip_is_kept_on_disk_and_decoded_at_the_grant(server: RunningServer) -> None:
    holder = await hold_slot(server, "holder-spool")
    client = await waiting(server, "spool")
    clip = tone_wav(3.0)
    for offset in range(0, len(clip), 20_000):
        await client.ws.send(clip[offset : offset + 20_000])
    await client.send("audio_end")
    await client.send("ping", id="kept")
    await client.expect("pong")
    assert len(spool_files(server)) == 1
    assert metric(server, "mts_queued_audio_bytes") == len(clip)
    await holder.close()
    done = await client.expect("done", "error", timeout=120)
    assert done["type"] == "done" and done["frames"] == 75
    await client.close()
    await settle(server)
    assert spool_files(server) == []


async def test_a_second_audio_end_and_late_audio_are_refused_and_lose_nothing(server: RunningServer) -> None:
    holder = await hold_slot(server, "holder-late")
    client = await waiting(server, "late")
    await client.ws.send(tone_wav(1.0))
    await client.send("audio_end")
    await client.send("audio_end", id="again")
    again = await client.expect("error")
    assert again["code"] == "bad_message" and again["id"] == "again"
    await client.ws.send(tone_wav(1.0))
    late = await client.expect("error")
    assert late["code"] == "bad_message" and "after audio_end" in late["message"]
    await holder.close()
    done = await client.expect("done", "error", timeout=120)
    assert done["type"] == "done" and done["frames"] == 25
    await client.close()
    await settle(server)


async def test_live_pcm_sent_while_waiting_reaches_the_stream_after_the_grant(server: RunningServer) -> None:
    holder = await hold_slot(server, "holder-live")
    client = await Client.connect(server)
    await client.hello(mint("live-waiting", "normal"))
    await client.send("start", **LIVE)
    await client.expect("queued")
    speech = tone_wav(2.0)[44:]
    await client.ws.send(speech)
    await client.send("audio_end")
    await client.send("ping", id="kept")
    await client.expect("pong")
    assert metric(server, "mts_queued_audio_bytes") == len(speech)
    await holder.close()
    await client.expect("granted")
    await client.drain(3.0)
    assert max(m["frames"] for m in client.of_type("progress")) >= 50
    assert not client.of_type("error")
    await client.send("cancel")
    await client.close()
    await settle(server)
