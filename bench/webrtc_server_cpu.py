"""The server process's CPU per WebRTC stream, thread mode against process mode.

    python -m bench.webrtc_server_cpu --seconds 10 --streams 1

The real server (lite engine, the 512 px avatar, one worker) in each mode, in the same run:
``--streams`` WebRTC clips of ``--seconds`` each, aiortc as the peer (in this process, so its
decoding is not counted). The server process's CPU time (all its threads, psutil) from the answer
to ``done`` is taken against the same time idle just before, and the worker processes' too. In
thread mode aiortc encodes the video (VP8, what it prefers) in the server process; in process mode
the worker encodes H.264 and the server process only packetizes it and encodes the audio (Opus).
Also: the cost of aiortc's Opus encoder alone, per second of audio.
"""

from __future__ import annotations

import argparse
import asyncio
import fractions
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
from aiortc.codecs import get_encoder
from aiortc.rtcrtpparameters import RTCRtpCodecParameters
from av import AudioFrame

from tests.server_harness import Client, RunningServer, mint, run_server, tone_wav
from tests.test_e2e_webrtc import negotiate


def cpu_s(process: psutil.Process) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


def workers_cpu_s(server: psutil.Process) -> float:
    return sum(cpu_s(child) for child in server.children(recursive=True))


async def one_clip(server: RunningServer, index: int, seconds: float) -> tuple[object, list[object], str]:
    client = await Client.connect(server)
    await client.hello(mint(f"cpu-{index}", "normal"))
    await client.send("start", avatar="astronaut", mode="clip", transport="webrtc", audio={"format": "wav"})
    await client.ws.send(tone_wav(seconds))
    await client.send("audio_end")
    await client.expect("granted", timeout=120)
    pc, video, _, tasks = await negotiate(client)
    assert pc.remoteDescription is not None
    codec = next(line.split()[1].split("/")[0] for line in pc.remoteDescription.sdp.splitlines()
                 if line.startswith("a=rtpmap:") and "/90000" in line)
    done = await client.expect("done", "error", timeout=seconds * 10 + 60)
    assert done["type"] == "done", done
    await asyncio.sleep(0.3)
    await pc.close()
    for task in tasks:
        task.cancel()
    await client.close()
    return done, video, codec


async def run(mode: str, streams: int, seconds: float) -> dict[str, object]:
    with tempfile.TemporaryDirectory() as tmp, run_server(
        Path(tmp), MTS_ENGINE__SLOTS=str(streams), MTS_LIMITS__START_BURST="1000",
        MTS_ENGINE__PROCESS_MODE=mode, MTS_ENGINE__WORKERS="1",
    ) as server:
        process = psutil.Process(server.process.pid)
        await one_clip(server, -1, 1.0)  # warm: imports, first encoder, first peer connection
        idle_start, idle_workers, t0 = cpu_s(process), workers_cpu_s(process), time.monotonic()
        await asyncio.sleep(seconds)
        idle_wall = time.monotonic() - t0
        idle = (cpu_s(process) - idle_start) / idle_wall
        idle_w = (workers_cpu_s(process) - idle_workers) / idle_wall
        start, start_workers, t0 = cpu_s(process), workers_cpu_s(process), time.monotonic()
        results = await asyncio.gather(*(one_clip(server, i, seconds) for i in range(streams)))
        wall = time.monotonic() - t0
        server_s = cpu_s(process) - start - idle * wall
        worker_s = workers_cpu_s(process) - start_workers - idle_w * wall
    frames = sum(len(video) for _, video, _ in results)
    return {
        "mode": mode,
        "video_codec": results[0][2],
        "streams": streams,
        "seconds": seconds,
        "video_frames_received": frames,
        "server_idle_cores": idle,
        "server_cores_per_stream": server_s / wall / streams,
        "server_cpu_ms_per_frame": 1000 * server_s / max(1, frames),
        "workers_cores_per_stream": worker_s / wall / streams,
    }


def opus_cost(seconds: float = 10.0) -> float:
    """CPU ms per second of audio of aiortc's Opus encoder (48 kHz mono in 20 ms frames)."""
    encoder = get_encoder(RTCRtpCodecParameters(mimeType="audio/opus", clockRate=48000, channels=2))
    t = np.arange(960) / 48_000
    start = time.thread_time()
    for i in range(int(seconds * 50)):
        pcm = (0.3 * np.sin(2 * np.pi * 140 * (t + i * 0.02)) * 32767).astype(np.int16)
        frame = AudioFrame.from_ndarray(pcm.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate, frame.pts, frame.time_base = 48_000, i * 960, fractions.Fraction(1, 48_000)
        encoder.encode(frame)
    return 1000 * (time.thread_time() - start) / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--modes", nargs="+", choices=("thread", "process"), default=["thread", "process"])
    args = parser.parse_args()
    result: dict[str, object] = {"opus_cpu_ms_per_audio_second": opus_cost()}
    result["runs"] = [asyncio.run(run(mode, args.streams, args.seconds)) for mode in args.modes]
    print(json.dumps(_rounded(result), indent=2))


def _rounded(value: object) -> object:
    if isinstance(value, float):
        return round(value, 4)
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    return value


if __name__ == "__main__":
    main()
