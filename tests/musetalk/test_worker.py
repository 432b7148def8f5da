"""The MuseTalk renderer driven by the real FrameWorker: clip and live streams, idle and interrupt."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from musetalk_helpers import FACE_BOX, face_image, speech_like, write_image, write_video

from inference.engine import Frame, FrameRequest
from inference.musetalk import MuseTalkRenderer
from inference.musetalk.avatar import MuseTalkAvatar
from inference.stream import EngineStream, StreamMode, StreamState
from inference.worker import FrameWorker


def output_audio(pcm16: np.ndarray) -> np.ndarray:
    return np.repeat(pcm16, 3)


def collect(stream: EngineStream, until: Callable[[list[Frame]], bool], timeout: float = 30.0) -> list[Frame]:
    frames: list[Frame] = []
    deadline = time.monotonic() + timeout
    while not until(frames):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out with {len(frames)} frames, state {stream.state}")
        frames += stream.take_frames()
        time.sleep(0.005)
    return frames


@pytest.fixture
def worker(renderer: MuseTalkRenderer) -> Iterator[FrameWorker]:
    worker = FrameWorker(renderer, max_batch=8)
    worker.start()
    yield worker
    worker.stop()


@pytest.fixture
def two_avatars(renderer: MuseTalkRenderer, tmp_path: Path) -> tuple[MuseTalkAvatar, MuseTalkAvatar]:
    a = renderer.prepare_avatar("a", "A", str(write_image(tmp_path / "a.png", face_image(21))))
    frames = [np.roll(face_image(22), 4 * i, axis=1) for i in range(3)]
    b = renderer.prepare_avatar("b", "B", str(write_video(tmp_path / "b.mp4", frames)))
    return a, b


def is_own_frame(frame: Frame, avatar: MuseTalkAvatar) -> bool:
    """Outside the face box the frame is exactly the avatar's loop frame of its index."""
    idle = avatar.idle_frame(frame.index % avatar.cycle_length)
    x1, y1, x2, y2 = FACE_BOX
    keep = np.ones(idle.shape[:2], dtype=bool)
    keep[y1:y2, x1:x2] = False
    return frame.image.shape == idle.shape and np.array_equal(frame.image[keep], idle[keep])


def test_two_clip_sessions_with_different_avatars(
    renderer: MuseTalkRenderer, two_avatars, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = two_avatars
    worker = FrameWorker(renderer, max_batch=8)  # started once both streams have their audio
    batches: list[set[str]] = []
    render = renderer.render

    def recording(requests):
        batches.append({r.avatar.info.id for r in requests})
        return render(requests)

    monkeypatch.setattr(renderer, "render", recording)
    audio_a, audio_b = speech_like(0.9, seed=1), speech_like(0.7, seed=3)[:11000]
    streams = []
    for avatar, audio in ((a, audio_a), (b, audio_b)):
        stream = worker.open_stream(avatar, StreamMode.CLIP)
        for chunk in np.array_split(audio, 5):
            stream.feed(chunk, output_audio(chunk))
        stream.end_audio()
        streams.append(stream)
    worker.start()
    try:
        got = [collect(stream, lambda frames, s=stream: s.closed) for stream in streams]
    finally:
        worker.stop()
    assert {"a", "b"} in batches  # some batch held frames of both sessions' avatars
    for stream, frames, avatar, audio in zip(streams, got, (a, b), (audio_a, audio_b), strict=True):
        assert stream.state is StreamState.FINISHED
        assert [f.index for f in frames] == list(range(len(audio) // 640))
        assert all(f.speech for f in frames)
        assert all(is_own_frame(f, avatar) for f in frames)
        assert sum(len(f.audio) for f in frames) == len(frames) * 1920
        # each session's face is the one its own avatar and audio give when rendered alone
        features = renderer.clip_features(audio)
        for frame in frames:
            alone = render([FrameRequest(avatar, frame.index % avatar.cycle_length, features[frame.index])])[0]
            assert np.abs(frame.image.astype(int) - alone.astype(int)).max() <= 1
    assert worker.frames_rendered == len(audio_a) // 640 + len(audio_b) // 640
    assert worker.batches < worker.frames_rendered  # frames were batched


def test_clip_frames_equal_whole_clip_rendering(renderer: MuseTalkRenderer, worker: FrameWorker, two_avatars) -> None:
    a, _ = two_avatars
    audio = speech_like(0.5, seed=5)
    stream = worker.open_stream(a, StreamMode.CLIP)
    stream.feed(audio, output_audio(audio))
    stream.end_audio()
    frames = collect(stream, lambda got: stream.closed)
    reference = renderer.render([FrameRequest(a, i, f) for i, f in enumerate(renderer.clip_features(audio))])
    assert len(frames) == len(reference)
    worst = max(np.abs(f.image.astype(int) - r.astype(int)).max() for f, r in zip(frames, reference, strict=True))
    assert worst <= 1  # clip streams get exact whole-clip features; batching changes nothing


@pytest.mark.slow
def test_live_idle_speech_and_interrupt(worker: FrameWorker, two_avatars) -> None:
    a, _ = two_avatars
    stream = worker.open_stream(a, StreamMode.LIVE)
    idle = collect(stream, lambda got: len(got) >= 3)
    assert not any(f.speech for f in idle)
    assert all(np.array_equal(f.image, a.idle_frame(f.index)) for f in idle)
    assert not np.any(np.concatenate([f.audio for f in idle]))

    speech = speech_like(0.4, seed=6)
    stream.feed(speech, output_audio(speech))
    stream.end_audio()
    frames = collect(stream, lambda got: sum(f.speech for f in got) >= len(speech) // 640)
    spoken = [f for f in frames if f.speech]
    assert len(spoken) == len(speech) // 640
    assert all(is_own_frame(f, a) for f in spoken)
    indices = [f.index for f in idle + frames]
    assert indices == list(range(indices[0], indices[0] + len(indices)))  # one clock, no gaps

    long_audio = speech_like(3.0, seed=7)
    stream.feed(long_audio, output_audio(long_audio))
    started = collect(stream, lambda got: any(f.speech for f in got))
    stream.interrupt()
    after = collect(stream, lambda got: len(got) >= 3 and not got[-1].speech)
    time.sleep(0.2)
    after += stream.take_frames()
    assert stream._featurizer.pending() == 0
    assert sum(f.speech for f in started + after) < len(long_audio) // 640  # the rest was dropped
    assert not after[-1].speech and np.array_equal(after[-1].image, a.idle_frame(after[-1].index))
    stream.cancel()
