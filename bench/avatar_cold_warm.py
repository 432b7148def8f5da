"""Time to first frame for a cold (disk), warm (host memory) and hot (on the worker) avatar.

    python -m bench.avatar_cold_warm [--rounds 15] [--engine lite] [--source video.mp4]

The real engine pool (workers, avatar store, caches) in this process, two prepared avatars
served alternately; the cache budgets decide which level each request is served from:

* cold: a host budget of one byte, so every request loads its avatar from disk;
* warm: the host cache holds both, one device slot per worker, so every request is a host hit
  and a device miss (for the lite engine the device is the CPU worker's memory: nothing to copy);
* hot: both levels hold both.

Time to first frame: from asking the store for the avatar to the first rendered frame of a
1 s utterance leaving the engine stream (no encoding, no network). Prints medians and p90s.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # also runnable as a script

import numpy as np

from inference.engine import FEATURE_SAMPLE_RATE, OUTPUT_SAMPLE_RATE
from inference.pool import EngineConfig, EnginePool
from inference.stream import StreamMode

ASTRONAUT = Path(__file__).resolve().parent.parent / "inference" / "assets" / "astronaut.png"
LEVELS = {
    "cold (disk)": {"host_cache_bytes": 1, "device_cache": 1},
    "warm (host)": {"host_cache_bytes": 1 << 30, "device_cache": 1},
    "hot (device)": {"host_cache_bytes": 1 << 30, "device_cache": 4},
}


def utterance(seconds: float, rate: int) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.3 * np.sin(2 * np.pi * 140 * t) * (np.sin(2 * np.pi * 4 * t) > 0)).astype(np.float32)


def first_frame_s(pool: EnginePool, avatar_id: str) -> float:
    arrived = threading.Event()
    started = time.perf_counter()
    avatar = pool.avatars.get(avatar_id)
    assert avatar is not None
    stream = pool.open_stream(avatar, StreamMode.CLIP, on_output=arrived.set)
    stream.feed(utterance(1.0, FEATURE_SAMPLE_RATE), utterance(1.0, OUTPUT_SAMPLE_RATE))
    stream.end_audio()
    while not stream.take_frames():
        arrived.wait(1.0)
        arrived.clear()
    elapsed = time.perf_counter() - started
    stream.cancel()
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--engine", default="lite", choices=["lite", "musetalk"])
    parser.add_argument("--models", default="models")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--source", type=Path, default=ASTRONAUT, help="the avatars' image or video")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as data:
        print(f"{'level':<14} {'median ms':>10} {'p90 ms':>8} {'n':>4}")
        for level, budgets in LEVELS.items():
            config = EngineConfig(
                kind=args.engine, models_dir=Path(args.models), device=args.device, workers=1,
                data_dir=Path(data), **budgets,  # type: ignore[arg-type]
            )
            pool = EnginePool(config)
            for avatar_id in ("bench-a", "bench-b"):
                if pool.avatars.info(avatar_id) is None:
                    pool.avatars.prepare(avatar_id, avatar_id, args.source)
            pool.start()
            try:
                for avatar_id in ("bench-a", "bench-b"):  # fill the levels this budget keeps
                    first_frame_s(pool, avatar_id)
                times = [first_frame_s(pool, ("bench-a", "bench-b")[i % 2]) for i in range(args.rounds * 2)]
            finally:
                pool.stop()
            times.sort()
            p90 = times[min(len(times) - 1, int(0.9 * len(times)))]
            print(f"{level:<14} {1000 * statistics.median(times):>10.1f} {1000 * p90:>8.1f} {len(times):>4}")
            stats = pool.cache_stats()
            print("   " + ", ".join(f"{k}: {v.hits} hits {v.misses} misses {v.evictions} evictions"
                                    for k, v in stats.items()))


if __name__ == "__main__":
    main()
