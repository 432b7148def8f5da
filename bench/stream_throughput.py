"""Streaming: time to the first media segment, encode cost, and the event loop while streams run.

    python -m bench.stream_throughput --streams 8 --seconds 10 --modes thread process --workers 2

1. Encode cost: the fMP4 muxer (libx264 veryfast/zerolatency + AAC, one thread) on 512 px frames.
2. The real server (lite engine) with ``--streams`` slots: that many clients start clips at once.
   For each: the time from ``granted`` to the first media segment and to ``done``; for the server:
   the event-loop lag while they stream (p99, from its histogram) and the frames/s delivered;
   then as many live sessions fed speech in real time, and the loop lag while they run. Once per
   ``--modes``: worker threads in the server process, or ``--workers`` worker processes that
   render and encode (``engine.process_mode``), in the same run.
3. CPU cores per 25 fps stream, at 512 px and 1080p: 25 x (render + encode + hand-off) ms of
   one core per frame (the lite engine renders the 512 px avatar; at 1080p only the encode and the
   hand-off are measured at that size).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

from bench.common import lag_buckets, lag_p99_between, percentile
from inference.avatars.store import DEFAULT_AVATAR_ID, AvatarStore
from inference.engine import FEATURE_SAMPLES_PER_FRAME, OUTPUT_SAMPLES_PER_FRAME, Frame, FrameRequest
from inference.lite import LiteRenderer
from stream_server.transports.fmp4 import FragmentedMp4Muxer
from tests.server_harness import Client, RunningServer, mint, run_server, tone_wav


def encode_cost(preset: str, frames: int = 250, size: tuple[int, int] | None = None) -> float:
    """Milliseconds of one thread per frame of the shipped 512 px avatar talking (scaled to
    ``size``, width x height, when given), video and audio."""
    with tempfile.TemporaryDirectory() as tmp:
        renderer = LiteRenderer()
        store = AvatarStore(Path(tmp), renderer)
        store.ensure_default()
        avatar = store.get(DEFAULT_AVATAR_ID)
        assert avatar is not None
        featurizer = renderer.new_featurizer("clip")
        t = np.arange(frames * FEATURE_SAMPLES_PER_FRAME) / 16_000
        featurizer.push((0.4 * np.sin(2 * np.pi * 140 * t) * (np.sin(2 * np.pi * 3 * t) > 0)).astype(np.float32))
        featurizer.finish()
        requests = [FrameRequest(avatar, i % avatar.cycle_length, f) for i, f in enumerate(featurizer.take(frames))]
        images = renderer.render(requests)
    if size is not None:
        images = [cv2.resize(image, size, interpolation=cv2.INTER_LINEAR) for image in images]
    height, width = images[0].shape[:2]
    muxer = FragmentedMp4Muxer(width, height, 25, threads=1, preset=preset)
    audio = (0.1 * np.sin(np.arange(OUTPUT_SAMPLES_PER_FRAME) / 8)).astype(np.float32)
    batch = [Frame(i, image, audio) for i, image in enumerate(images)]
    start = time.thread_time()
    for i in range(0, frames, 5):
        muxer.encode(batch[i : i + 5])
    muxer.close()
    return 1000 * (time.thread_time() - start) / frames


async def one_stream(server: RunningServer, index: int, audio: bytes) -> dict[str, float]:
    client = await Client.connect(server)
    await client.hello(mint(f"bench-{index}", "normal"))
    await client.send("start", avatar="astronaut", mode="clip", transport="mse", audio={"format": "wav"})
    await client.ws.send(audio)
    await client.send("audio_end")
    granted = await client.expect("granted", timeout=120)
    done = await client.expect("done", timeout=300)
    first_media = next(t for t, kind in client.events if kind == "media")
    await client.close()
    return {
        "first_segment_ms": 1000 * (first_media - granted["_t"]),
        "generation_s": done["_t"] - granted["_t"],
        "frames": done["frames"],
    }


async def live_stream(server: RunningServer, index: int, seconds: float) -> int:
    """A live session fed speech in real time, 200 ms a chunk; returns the media bytes received."""
    client = await Client.connect(server)
    await client.hello(mint(f"live-{index}", "normal"))
    await client.send("start", avatar="astronaut", mode="live", transport="mse",
                      audio={"format": "pcm_s16le", "sample_rate": 16000, "channels": 1})
    await client.expect("granted", timeout=60)
    pcm = tone_wav(seconds)[44:]
    chunk = 6400
    reader = asyncio.create_task(client.drain(seconds + 1.0))
    for offset in range(0, len(pcm), chunk):
        await client.ws.send(pcm[offset : offset + chunk])
        await asyncio.sleep(0.2)
    await reader
    await client.send("cancel")
    await client.close()
    return len(client.media_bytes)


async def run(streams: int, seconds: float, mode: str, workers: int) -> dict[str, object]:
    with tempfile.TemporaryDirectory() as tmp, run_server(
        Path(tmp), MTS_ENGINE__SLOTS=str(streams), MTS_LIMITS__START_BURST="1000",
        MTS_ENGINE__PROCESS_MODE=mode, MTS_ENGINE__WORKERS=str(workers),
    ) as server:
        alone = [await one_stream(server, -1 - i, tone_wav(2.0 + 0.01 * i)) for i in range(5)]
        before = lag_buckets(server)
        start = time.monotonic()
        results = await asyncio.gather(
            *(one_stream(server, i, tone_wav(seconds + 0.01 * i)) for i in range(streams))
        )
        wall = time.monotonic() - start
        after = lag_buckets(server)
        live_before = lag_buckets(server)
        live_bytes = await asyncio.gather(*(live_stream(server, i, seconds) for i in range(streams)))
        live_after = lag_buckets(server)
    firsts = [r["first_segment_ms"] for r in results]
    frames = sum(r["frames"] for r in results)
    return {
        "mode": mode,
        "workers": workers,
        "first_segment_ms_one_stream_p50": percentile([r["first_segment_ms"] for r in alone], 0.5),
        "streams": streams,
        "clip_seconds": seconds,
        "first_segment_ms_p50": percentile(firsts, 0.5),
        "first_segment_ms_max": max(firsts),
        "frames_delivered": frames,
        "frames_per_second_all_streams": frames / wall,
        "realtime_factor_per_stream": (frames / streams / 25) / wall,
        "loop_lag_p99_ms_at_most": 1000 * lag_p99_between(before, after),
        "live_streams_realtime": streams,
        "live_loop_lag_p99_ms_at_most": 1000 * lag_p99_between(live_before, live_after),
        "live_kbit_per_stream": sum(live_bytes) * 8 / 1000 / streams / seconds,
    }


def render_cost(frames: int = 200) -> float:
    """Milliseconds of one thread per speech frame of the lite engine, 512 px avatar."""
    with tempfile.TemporaryDirectory() as tmp:
        renderer = LiteRenderer()
        store = AvatarStore(Path(tmp), renderer)
        store.ensure_default()
        avatar = store.get(DEFAULT_AVATAR_ID)
        assert avatar is not None
        featurizer = renderer.new_featurizer("clip")
        t = np.arange(frames * FEATURE_SAMPLES_PER_FRAME) / 16_000
        featurizer.push((0.4 * np.sin(2 * np.pi * 140 * t)).astype(np.float32))
        featurizer.finish()
        requests = [FrameRequest(avatar, i % avatar.cycle_length, f) for i, f in enumerate(featurizer.take(frames))]
        start = time.thread_time()
        for i in range(0, frames, 8):
            renderer.render(requests[i : i + 8])
        return 1000 * (time.thread_time() - start) / frames


def cores_per_stream(preset: str) -> dict[str, float]:
    from bench.frame_handoff import SIZES, through_ring

    render = render_cost()
    out: dict[str, float] = {"render_ms_per_frame_512px_lite": render}
    for label, (height, width) in SIZES.items():
        encode = encode_cost(preset, size=(width, height))
        handoff, _ = through_ring(height, width, 100)
        out[f"encode_ms_per_frame_{label}_{preset}"] = encode
        out[f"cores_per_25fps_stream_{label}"] = 25 * (render + encode + handoff) / 1000
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--modes", nargs="+", choices=("thread", "process"), default=["thread", "process"])
    parser.add_argument("--workers", type=int, default=2, help="frame workers (threads or processes)")
    args = parser.parse_args()
    result: dict[str, object] = {
        f"encode_ms_per_frame_512px_{preset}": encode_cost(preset) for preset in ("veryfast", "superfast")
    }
    result.update(cores_per_stream("superfast"))
    result["runs"] = [asyncio.run(run(args.streams, args.seconds, mode, args.workers)) for mode in args.modes]
    print(json.dumps(_rounded(result), indent=2))


def _rounded(value: object) -> object:
    if isinstance(value, float):
        return round(value, 2)
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    return value


if __name__ == "__main__":
    main()
