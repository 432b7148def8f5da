"""What MSE streaming costs the event loop: its CPU time and callbacks per frame delivered.

    python -m bench.loop_cost --streams 8 --seconds 5

In-process, no sockets: ``--streams`` clips rendered by one lite ``FrameWorker`` and sent by
``MseSender`` into outboxes whose socket takes everything at once. The loop's own CPU time
(``time.thread_time`` on the loop thread) and the number of callbacks it ran are counted while the
clips stream. Both depend little on how busy the machine is, unlike wall-clock lag, so they compare
well between runs on a shared machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from inference.avatars.store import DEFAULT_AVATAR_ID, AvatarStore
from inference.lite import LiteRenderer
from inference.stream import StreamMode
from inference.worker import FrameWorker
from stream_server.outbox import Outbox
from stream_server.settings import StreamSettings
from stream_server.transports.mse import MseSender


class CallbackCounter:
    """Counts the callbacks the event loop runs, by wrapping ``asyncio.Handle._run``."""

    def __init__(self) -> None:
        self.count = 0
        self._run = asyncio.Handle._run

    def __enter__(self) -> CallbackCounter:
        run = self._run

        def counted(handle: asyncio.Handle) -> None:
            self.count += 1
            run(handle)

        asyncio.Handle._run = counted  # type: ignore[method-assign, assignment]
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.Handle._run = self._run  # type: ignore[method-assign]


async def stream_clips(streams: int, seconds: float) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        renderer = LiteRenderer()
        store = AvatarStore(Path(tmp), renderer)
        store.ensure_default()
        avatar = store.get(DEFAULT_AVATAR_ID)
        assert avatar is not None
        worker = FrameWorker(renderer)
        worker.start()
        t = np.arange(int(seconds * 16_000)) / 16_000
        speech = (0.4 * np.sin(2 * np.pi * 140 * t) * (np.sin(2 * np.pi * 3 * t) > 0)).astype(np.float32)

        async def socket(item: str | bytes) -> None:
            return None

        try:
            with CallbackCounter() as callbacks:
                loop_cpu, process_cpu, wall = time.thread_time(), time.process_time(), time.monotonic()
                senders = []
                for _ in range(streams):
                    stream = worker.open_stream(avatar, StreamMode.CLIP)
                    stream.feed(speech, np.repeat(speech, 3))
                    stream.end_audio()
                    senders.append(MseSender(stream, Outbox(socket, coalesce_s=0.25), StreamSettings()))
                results = await asyncio.gather(*(sender.run() for sender in senders))
                loop_cpu = time.thread_time() - loop_cpu
                process_cpu = time.process_time() - process_cpu
                wall = time.monotonic() - wall
        finally:
            worker.stop()
    frames = sum(r.frames for r in results)
    return {
        "streams": streams,
        "frames": frames,
        "wall_s": wall,
        "process_cpu_ms_per_frame": 1000 * process_cpu / frames,
        "loop_cpu_ms_per_frame": 1000 * loop_cpu / frames,
        "loop_callbacks_per_frame": callbacks.count / frames,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    result = asyncio.run(stream_clips(args.streams, args.seconds))
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in result.items()}, indent=2))


if __name__ == "__main__":
    main()
