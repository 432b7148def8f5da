"""The fMP4 encoding loop of one stream, the same wherever it runs: in the MSE sender's thread
(thread mode) or in the worker process that rendered the frames (process mode)."""

from __future__ import annotations

from collections.abc import Callable

from inference.engine import FPS
from inference.stream import EngineStream, StreamState
from stream_server.transports.fmp4 import FragmentedMp4Muxer

PROGRESS_EVERY_FRAMES = FPS // 2
ENCODE_BATCH_FRAMES = 4
"""Frames the encoder takes at a time: a segment leaves as soon as its last frame is encoded,
even when the renderer is far ahead (taking the whole buffer delayed the first segment until
every buffered frame was encoded)."""


def encode_stream(
    stream: EngineStream, muxer: FragmentedMp4Muxer, emit: Callable[[list[bytes], int], None]
) -> bool:
    """Encode every frame of ``stream``. ``emit(segments, frames)`` hands on each batch of new
    segments with the frames encoded since the last one, and, once the first segment is out (the
    client hears ``stream`` with it), a progress count every ``PROGRESS_EVERY_FRAMES`` frames.
    Returns whether the stream finished; then its last segments were emitted too."""
    unsent = 0
    started = False
    while frames := stream.wait_frames(ENCODE_BATCH_FRAMES):
        segments = muxer.encode(frames)
        unsent += len(frames)
        started = started or bool(segments)
        if segments or (unsent >= PROGRESS_EVERY_FRAMES and started):
            emit(segments, unsent)
            unsent = 0
    if stream.state is not StreamState.FINISHED:
        return False
    emit(muxer.close(), unsent)
    return True
