"""Latency of a talking agent: first TTS audio chunk -> first lip-synced frame, lite engine.

    .venv/bin/python -m bench.agent_latency --utterances 10

For each transport (MSE and WebRTC) and two vantage points:

* ``sdk``: the SDK's live session, the speech sent as 20 ms PCM chunks in real time; the time until
  the first decoded frame whose own audio is speech (video and its audio both arrived);
* ``service``: ``MuseTalkVideoService`` in a real Pipecat pipeline, 20 ms ``TTSAudioRawFrame``s at
  24 kHz in real time; the time until the first speaking ``OutputImageRawFrame`` leaves it.

The difference between the two is the service's play-out buffer (``jitter_s``).
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
from pipecat.frames.frames import EndFrame, TTSStoppedFrame

from bench.common import percentile
from stream_server.sdk import connect
from stream_server.sdk.av_sync import AvAligner
from stream_server.sdk.client import Transport
from stream_server.sdk.media import AudioChunk, VideoFrame
from stream_server.sdk.pipecat_service import PTS_KEY, SPEAKING_KEY, MuseTalkVideoService
from tests.pipecat_harness import PipelineRun, run_pipeline, speak, syllables
from tests.server_harness import RunningServer, run_server

SPEECH_S = 0.8
PAUSE_S = 3.0  # longer than the slowest path's latency, so utterances never overlap


async def sdk_latencies(server: RunningServer, transport: Transport, utterances: int) -> list[float]:
    conn = await connect(server.url)
    live = await conn.live(avatar="astronaut", transport=transport)
    aligner = AvAligner()
    started: list[float] = []
    seen: list[float] = []
    frames = 0

    async def watch() -> None:
        nonlocal frames
        async for event in live:
            if not isinstance(event, (VideoFrame, AudioChunk)):
                continue
            for synced in aligner.add(event):
                frames += 1
                if synced.speaking and len(seen) < len(started):
                    seen.append(time.monotonic() - started[len(seen)])

    watcher = asyncio.create_task(watch())
    while frames < 25:
        await asyncio.sleep(0.05)
    pcm = syllables(SPEECH_S, rate=16_000)
    step = 320
    for _ in range(utterances):
        started.append(time.monotonic())
        for i, offset in enumerate(range(0, len(pcm), step)):
            await live.send_audio(pcm[offset : offset + step])
            await asyncio.sleep(max(0.0, started[-1] + (i + 1) * 0.02 - time.monotonic()))
        await live.end_utterance()
        await asyncio.sleep(PAUSE_S)
    await live.cancel()
    watcher.cancel()
    await conn.close()
    return seen


async def service_latencies(server: RunningServer, transport: Transport, utterances: int) -> list[float]:
    service = MuseTalkVideoService(url=server.url, avatar="astronaut", transport=transport)
    started: list[float] = []

    async def drive(run: PipelineRun) -> None:
        await run.down.wait_for(lambda: sum(PTS_KEY in f.metadata for f in run.images) >= 25)
        for _ in range(utterances):
            started.append(time.monotonic())
            await speak(run, syllables(SPEECH_S))
            await run.send(TTSStoppedFrame())
            await asyncio.sleep(PAUSE_S)
        await run.send(EndFrame())

    run = await run_pipeline(service, drive, timeout=60 + 3 * utterances)
    spoken = [t for t, f in run.down.frames if f.metadata.get(SPEAKING_KEY)]
    latencies = []
    for i, begin in enumerate(started):
        end = started[i + 1] if i + 1 < len(started) else float("inf")
        first = next((t for t in spoken if begin <= t < end), None)
        if first is not None:
            latencies.append(first - begin)
    return latencies


def summary(name: str, values: list[float], expected: int) -> str:
    ms = [v * 1000 for v in values]
    if not ms:
        return f"| {name} | no speaking frame seen | | |"
    return (f"| {name} | {percentile(ms, 0.5):.0f} ms | {percentile(ms, 0.99):.0f} ms | "
            f"{len(ms)}/{expected} (mean {np.mean(ms):.0f} ms) |")


async def main(utterances: int) -> None:
    with tempfile.TemporaryDirectory() as tmp, run_server(Path(tmp)) as server:
        rows = []
        for transport in ("mse", "webrtc"):
            rows.append(summary(f"{transport}, SDK (decoded)", await sdk_latencies(server, transport, utterances),
                                utterances))
            rows.append(summary(f"{transport}, Pipecat service out",
                                await service_latencies(server, transport, utterances), utterances))
    print(f"machine: {platform.machine()}, {platform.python_version()}, lite engine, loopback")
    print("| path | p50 | p99 | samples |")
    print("|---|---|---|---|")
    for row in rows:
        print(row)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--utterances", type=int, default=10)
    asyncio.run(main(parser.parse_args().utterances))
