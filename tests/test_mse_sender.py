"""The MSE sender: its encoder thread pulls frames from the engine stream; the loop only sends bytes."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from inference.avatars.store import DEFAULT_AVATAR_ID, AvatarStore
from inference.engine import Frame, PreparedAvatar
from inference.lite import LiteRenderer
from inference.stream import EngineStream, StreamMode, StreamState
from inference.worker import FrameWorker
from stream_server.outbox import Outbox
from stream_server.settings import StreamSettings
from stream_server.transports.fmp4 import FragmentedMp4Muxer
from stream_server.transports.mse import MseSender


@pytest.fixture
def avatar(tmp_path: Path) -> PreparedAvatar:
    store = AvatarStore(tmp_path, LiteRenderer())
    store.ensure_default()
    avatar = store.get(DEFAULT_AVATAR_ID)
    assert avatar is not None
    return avatar


@pytest.fixture
def worker() -> Iterator[FrameWorker]:
    worker = FrameWorker(LiteRenderer())
    worker.start()
    yield worker
    worker.stop()


def speak(stream: EngineStream, seconds: float) -> None:
    t = np.arange(int(seconds * 16_000)) / 16_000
    speech = (0.4 * np.sin(2 * np.pi * 140 * t) * (np.sin(2 * np.pi * 3 * t) > 0)).astype(np.float32)
    stream.feed(speech, np.repeat(speech, 3))
    stream.end_audio()


def all_frames(stream: EngineStream) -> list[Frame]:
    frames: list[Frame] = []
    deadline = time.monotonic() + 60
    while not stream.closed:
        assert time.monotonic() < deadline, "the reference stream never finished"
        frames += stream.wait_frames()
    return frames


def encoder_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "mse-encoder"]


class Socket:
    def __init__(self) -> None:
        self.items: list[str | bytes] = []

    async def send(self, item: str | bytes) -> None:
        self.items.append(item)

    def messages(self, kind: str) -> list[dict[str, Any]]:
        parsed = [json.loads(i) for i in self.items if isinstance(i, str)]
        return [m for m in parsed if m["type"] == kind]


async def test_the_client_gets_exactly_the_fmp4_of_the_streams_frames(
    worker: FrameWorker, avatar: PreparedAvatar
) -> None:
    settings = StreamSettings()
    reference = worker.open_stream(avatar, StreamMode.CLIP)
    speak(reference, 2.0)
    frames = await asyncio.to_thread(all_frames, reference)
    muxer = FragmentedMp4Muxer(avatar.info.width, avatar.info.height, 25, segment_seconds=settings.segment_s,
                               crf=settings.video_crf, preset=settings.x264_preset,
                               audio_bitrate=settings.audio_bitrate, threads=1)
    segments = muxer.encode(frames) + muxer.close()
    assert muxer.init_segment is not None
    expected = muxer.init_segment + b"".join(segments)

    socket = Socket()
    outbox = Outbox(socket.send, coalesce_s=0.25)
    stream = worker.open_stream(avatar, StreamMode.CLIP)
    speak(stream, 2.0)
    started: list[int] = []
    result = await MseSender(stream, outbox, settings, total_frames=lambda: 50,
                             first_segment=lambda: started.append(len(socket.items))).run()
    await outbox.drained()

    assert result.state is StreamState.FINISHED and result.frames == len(frames) == 50
    assert b"".join(i for i in socket.items if isinstance(i, bytes)) == expected
    assert [m["mime"] for m in socket.messages("stream")] == [muxer.mime]
    assert isinstance(socket.items[0], str) and json.loads(socket.items[0])["type"] == "stream"
    assert socket.items[1] == muxer.init_segment
    assert started  # announced once the init segment was handed over
    progress = socket.messages("progress")
    assert progress[-1] == {"type": "progress", "frames": 50, "total": 50}
    assert [m["frames"] for m in progress] == sorted(m["frames"] for m in progress)


async def test_segments_leave_one_by_one_when_the_renderer_is_ahead(
    worker: FrameWorker, avatar: PreparedAvatar
) -> None:
    """The lite renderer fills the stream's buffer (50 frames) long before the encoder catches
    up: the client still gets each segment as it is cut, not the whole buffer's in one burst."""
    socket = Socket()
    outbox = Outbox(socket.send, coalesce_s=0.0)
    stream = worker.open_stream(avatar, StreamMode.CLIP)
    speak(stream, 4.0)
    await asyncio.to_thread(time.sleep, 0.5)  # the renderer runs ahead and fills the buffer
    assert stream.buffered == 50
    result = await MseSender(stream, outbox, StreamSettings(), total_frames=lambda: 100).run()
    await outbox.drained()
    assert result.state is StreamState.FINISHED and result.frames == 100
    first_progress = socket.messages("progress")[0]["frames"]
    assert first_progress <= 16, f"the first {first_progress} frames reached the client in one hand-over"
    media = [i for i in socket.items if isinstance(i, bytes)]
    assert len(media) >= 1 + 100 // 12  # the init segment, then one message per segment


async def test_the_encoder_takes_frames_while_the_event_loop_is_busy(
    worker: FrameWorker, avatar: PreparedAvatar
) -> None:
    """Frames do not pass through the loop: with the loop blocked, the encoder still empties the
    stream's buffer, so the worker renders past it (until the first segment waits for the loop)."""
    stream = worker.open_stream(avatar, StreamMode.CLIP, buffer_frames=10)
    speak(stream, 4.0)
    outbox = Outbox(Socket().send, coalesce_s=0.25)
    task = asyncio.create_task(MseSender(stream, outbox, StreamSettings()).run())
    await asyncio.sleep(0)  # the sender starts its encoder thread
    deadline = time.monotonic() + 30
    while stream.next_index <= 10 and time.monotonic() < deadline:
        time.sleep(0.01)  # blocks the loop on purpose
    assert stream.next_index > 10, "no frame left the stream while the loop was blocked"
    result = await task
    assert result.state is StreamState.FINISHED and result.frames == 100


async def test_a_cancelled_sender_stops_its_encoder_thread_and_its_stream(
    worker: FrameWorker, avatar: PreparedAvatar
) -> None:
    never = asyncio.Event()

    async def stuck(item: str | bytes) -> None:
        await never.wait()

    stream = worker.open_stream(avatar, StreamMode.CLIP)
    speak(stream, 10.0)
    outbox = Outbox(stuck, coalesce_s=0.25, max_bytes=128 * 1024)  # the encoder stalls on it
    before = len(encoder_threads())
    task = asyncio.create_task(MseSender(stream, outbox, StreamSettings()).run())
    for _ in range(3000):  # until the encoder waits for the outbox and the stream's buffer is full
        if stream.buffered == 50:
            break
        await asyncio.sleep(0.01)
    assert stream.buffered == 50 and stream.state is StreamState.RUNNING
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert stream.state is StreamState.CANCELLED
    for _ in range(500):
        if len(encoder_threads()) == before:
            break
        await asyncio.sleep(0.01)
    assert len(encoder_threads()) == before
    outbox.close()
