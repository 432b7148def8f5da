"""A client that stops reading cannot make the server's memory grow: every buffer is bounded."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np

from inference.avatars.store import DEFAULT_AVATAR_ID, AvatarStore
from inference.lite import LiteRenderer
from inference.stream import StreamMode, StreamState
from inference.worker import FrameWorker
from stream_server.outbox import Outbox
from stream_server.settings import StreamSettings
from stream_server.transports.mse import MseSender


async def test_a_client_that_stops_reading_stalls_its_stream_not_the_server(tmp_path: Path) -> None:
    renderer = LiteRenderer()
    store = AvatarStore(tmp_path, renderer)
    store.ensure_default()
    avatar = store.get(DEFAULT_AVATAR_ID)
    assert avatar is not None
    worker = FrameWorker(renderer)
    worker.start()
    stream = worker.open_stream(avatar, StreamMode.CLIP, buffer_frames=25)
    seconds = 60
    t = np.arange(seconds * 16_000) / 16_000
    speech = (0.4 * np.sin(2 * np.pi * 140 * t)).astype(np.float32)
    stream.feed(speech, np.repeat(speech, 3))
    stream.end_audio()

    never = asyncio.Event()
    written: list[int] = []

    async def stuck_socket(item: str | bytes) -> None:
        written.append(len(item))
        await never.wait()

    limit = 256 * 1024
    outbox = Outbox(stuck_socket, coalesce_s=0.25, max_bytes=2 * limit)  # media may fill half
    sender = MseSender(stream, outbox, StreamSettings())
    task = asyncio.create_task(sender.run())
    try:
        await asyncio.sleep(3.0)
        rendered = stream.next_index
        await asyncio.sleep(1.0)
        assert stream.next_index == rendered, "the worker stopped rendering for this stream"
        assert rendered < seconds * 25 // 4
        assert stream.buffered <= 25
        queued = sum(len(i) for i in outbox._items if isinstance(i, bytes))
        assert queued <= limit + max(written, default=0) + 200_000
        assert stream.state is StreamState.RUNNING

        other = worker.open_stream(avatar, StreamMode.CLIP)
        other.feed(speech[:16_000], np.repeat(speech[:16_000], 3))
        other.end_audio()
        for _ in range(200):
            if other.state is StreamState.FINISHED:
                break
            other.take_frames()
            await asyncio.sleep(0.02)
        assert other.state is StreamState.FINISHED, "another session on the same worker is not held up"
    finally:
        task.cancel()
        stream.cancel()
        outbox.close()
        worker.stop()
