"""The cost of handing one frame from a worker process to the server process.

    python -m bench.frame_handoff --frames 300

A spawned child writes frames (H x W x 3 uint8 + one frame's audio) into a ``FrameRing`` and
names each slot in a small message; this process copies each frame out and hands its slot back,
which is what a WebRTC stream does in process mode. For comparison: the same frames pickled whole
through a pipe. Reported per frame, in this (receiving) process's CPU ms and in wall ms, at 512 px
and 1080p.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import time
from multiprocessing.connection import Connection

import numpy as np

from inference.engine import OUTPUT_SAMPLES_PER_FRAME
from inference.procs.frame_ring import FrameRing

SIZES = {"512px": (512, 512), "1080p": (1080, 1920)}
SLOTS = 8


def _ring_writer(conn: Connection, name: str, height: int, width: int, frames: int) -> None:
    ring = FrameRing.attach(name, SLOTS, height, width)
    image = np.random.default_rng(0).integers(0, 255, (height, width, 3), dtype=np.uint8)
    audio = np.zeros(OUTPUT_SAMPLES_PER_FRAME, dtype=np.float32)
    free = list(range(SLOTS))
    for index in range(frames):
        while not free:
            free.append(conn.recv())
        slot = free.pop()
        ring.write(slot, image, audio)
        conn.send((slot, index))
    conn.send(None)
    while conn.poll(1.0):
        conn.recv()
    ring.close()


def _pickle_writer(conn: Connection, height: int, width: int, frames: int) -> None:
    image = np.random.default_rng(0).integers(0, 255, (height, width, 3), dtype=np.uint8)
    audio = np.zeros(OUTPUT_SAMPLES_PER_FRAME, dtype=np.float32)
    for index in range(frames):
        conn.send((index, image, audio))
    conn.send(None)


def through_ring(height: int, width: int, frames: int) -> tuple[float, float]:
    context = multiprocessing.get_context("spawn")
    ring = FrameRing.create(SLOTS, height, width)
    parent, child = context.Pipe()
    process = context.Process(target=_ring_writer, args=(child, ring.name, height, width, frames))
    process.start()
    child.close()
    first = parent.recv()
    wall, cpu = time.perf_counter(), time.thread_time()
    message = first
    while message is not None:
        slot, _ = message
        ring.read(slot)
        parent.send(slot)
        message = parent.recv()
    wall, cpu = time.perf_counter() - wall, time.thread_time() - cpu
    process.join()
    ring.close()
    return 1000 * cpu / frames, 1000 * wall / frames


def through_pickle(height: int, width: int, frames: int) -> tuple[float, float]:
    context = multiprocessing.get_context("spawn")
    parent, child = context.Pipe(duplex=False)
    process = context.Process(target=_pickle_writer, args=(child, height, width, frames))
    process.start()
    child.close()
    message = parent.recv()
    wall, cpu = time.perf_counter(), time.thread_time()
    while message is not None:
        message = parent.recv()
    wall, cpu = time.perf_counter() - wall, time.thread_time() - cpu
    process.join()
    return 1000 * cpu / frames, 1000 * wall / frames


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=300)
    args = parser.parse_args()
    result: dict[str, float] = {}
    for label, (height, width) in SIZES.items():
        cpu, wall = through_ring(height, width, args.frames)
        result[f"shm_ring_receiver_cpu_ms_per_frame_{label}"] = cpu
        result[f"shm_ring_wall_ms_per_frame_{label}"] = wall
        cpu, wall = through_pickle(height, width, args.frames)
        result[f"pickled_receiver_cpu_ms_per_frame_{label}"] = cpu
        result[f"pickled_wall_ms_per_frame_{label}"] = wall
    print(json.dumps({k: round(v, 3) for k, v in result.items()}, indent=2))


if __name__ == "__main__":
    main()
