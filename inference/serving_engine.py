"""What the node, the sessions and the pre-generation use of the engine, in either
``engine.process_mode``: worker threads in the server process (``inference.pool.EnginePool``) or
supervised worker processes (``inference.procs.process_pool.ProcessEnginePool``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from inference.avatars.cache import CacheStats
from inference.avatars.hot import HotAvatars
from inference.avatars.store import AvatarStore
from inference.engine import Frame, PreparedAvatar
from inference.stream import StreamMode, StreamState
from inference.worker_health import WorkerStatus


@dataclass(frozen=True)
class EncodeOptions:
    """How a stream is cut into fMP4 (the ``stream.*`` settings), for a pool whose workers
    encode (``ServingEngine.encodes_in_workers``)."""

    segment_s: float
    crf: int
    preset: str
    audio_bitrate: int


@dataclass(frozen=True)
class PacketOptions:
    """How a WebRTC stream's video is encoded to H.264 packets (the ``stream.webrtc_*`` settings),
    for a pool whose workers encode: only the packets reach the server process."""

    bitrate: int
    keyframe_interval_s: float
    preset: str


@dataclass(frozen=True)
class EncodedFrame:
    """A frame whose picture was encoded where it was rendered: one H.264 access unit (Annex B)
    and the frame's own audio (float32, ``OUTPUT_SAMPLES_PER_FRAME`` samples)."""

    index: int
    video: bytes
    keyframe: bool
    audio: np.ndarray
    speech: bool


class ServedStream(Protocol):
    """One session's stream as its transport sees it (``EngineStream``, ``RemoteStream``)."""

    avatar: PreparedAvatar
    mode: StreamMode
    state: StreamState
    error: BaseException | None
    started_at: float

    def feed(self, pcm_features: np.ndarray, pcm_output: np.ndarray) -> None: ...

    def end_audio(self) -> None: ...

    def interrupt(self) -> None: ...

    def cancel(self) -> None: ...

    def take_frames(self, limit: int = ...) -> list[Frame]: ...

    @property
    def buffered(self) -> int: ...

    @property
    def closed(self) -> bool: ...


class ServingEngine(Protocol):
    name: str
    version: str
    """The engine's preparation version (part of every clip's key)."""
    avatars: AvatarStore
    hot: HotAvatars
    encodes_in_workers: bool
    """Streams come back encoded (``open_stream(encode=...)``: fMP4 segments for MSE, H.264
    packets for WebRTC); else the sender encodes."""
    on_capacity: Callable[[], object]
    """Called (from any thread) when a worker went down or came back up."""

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def open_stream(
        self,
        avatar: PreparedAvatar,
        mode: StreamMode,
        *,
        buffer_frames: int = ...,
        on_output: Callable[[], None] | None = ...,
        background: bool = ...,
        encode: EncodeOptions | PacketOptions | None = ...,
    ) -> ServedStream: ...

    def holders(self, avatar_id: str) -> list[int]: ...

    def forget(self, avatar_id: str) -> None: ...

    def cache_stats(self) -> dict[str, CacheStats]: ...

    def measure_capacity(self, avatar: PreparedAvatar) -> float: ...

    def capacity(self) -> float:
        """The measured frames/s of the workers that serve now (0 before ``measure_capacity``)."""
        ...

    def frames_per_second(self) -> float: ...

    def worker_status(self) -> list[WorkerStatus]: ...

    def take_batch_sizes(self) -> list[list[int]]:
        """Frames per render call of each worker since the previous call."""
        ...
