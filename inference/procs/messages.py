"""The messages between the server process and a worker process (small, pickled once each).

Arrays never travel in them: audio goes as float32 bytes, video as encoded bytes (fMP4 segments,
H.264 packets), and raw frames (a consumer that wants them, such as a benchmark) stay in a
``FrameRing``."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from inference.engine import AvatarInfo
from inference.face import FaceReport
from inference.serving_engine import EncodeOptions, PacketOptions
from inference.worker import WorkerStats

# ----- server -> worker -----


@dataclass(frozen=True)
class OpenStream:
    stream_id: int
    avatar_key: str
    """Names this preparation of the avatar: a worker holds a loaded avatar per key."""
    avatar_dir: Path
    mode: str
    buffer_frames: int
    started_at: float
    encode: EncodeOptions | PacketOptions | None
    """fMP4 segments come back (MSE), or H.264 packets (WebRTC); ``None``: raw frames through
    ``ring``."""
    background: bool = False
    ring: str | None = None
    ring_slots: int = 0


@dataclass(frozen=True)
class StreamInput:
    stream_id: int
    kind: str
    """"audio", "end", "interrupt", "cancel", or "keyframe" (H.264 packets: make the next frame
    an IDR frame)."""
    f16: bytes = b""
    f48: bytes = b""


@dataclass(frozen=True)
class Credit:
    """The server forwarded one segment batch (MSE), took one packet (WebRTC), or released a ring
    slot (frames)."""

    stream_id: int
    slot: int = -1


@dataclass(frozen=True)
class Release:
    """The server's device cache of this worker evicted these avatars: free them."""

    avatar_keys: tuple[str, ...]


@dataclass(frozen=True)
class Call:
    """An avatar operation or a measurement, run on a thread of the worker (preparations at low
    priority)."""

    call_id: int
    method: str
    args: tuple[object, ...]


@dataclass(frozen=True)
class Preload:
    """After a restart: the avatars the worker held, to load again before streams ask."""

    avatars: tuple[tuple[str, Path], ...]


@dataclass(frozen=True)
class Shutdown:
    pass


# ----- worker -> server -----


@dataclass(frozen=True)
class Ready:
    pid: int
    renderer: str
    preparation_version: str
    avatar_files: tuple[str, ...]


@dataclass(frozen=True)
class Segments:
    stream_id: int
    segments: list[bytes]
    frames: int
    init: bytes | None = None
    mime: str = ""
    width: int = 0
    height: int = 0


@dataclass(frozen=True)
class FramesReady:
    """Frames written into ring slots, in order: (slot, index, speech) each."""

    stream_id: int
    frames: list[tuple[int, int, bool]]


@dataclass(frozen=True)
class Packets:
    """Frames encoded to H.264, in order: (index, speech, keyframe, access unit, float32 audio
    bytes) each."""

    stream_id: int
    frames: list[tuple[int, bool, bool, bytes, bytes]]


@dataclass(frozen=True)
class StreamEnded:
    stream_id: int
    state: str
    error: str | None = None


@dataclass(frozen=True)
class CallProgress:
    """A running preparation's progress (frames done of total)."""

    call_id: int
    done: int
    total: int


@dataclass(frozen=True)
class Reply:
    call_id: int
    result: object = None
    error: str | None = None
    error_type: str = ""


@dataclass(frozen=True)
class Stats:
    """About once a second: the worker's frame worker, and its batch sizes since the last one."""

    stats: WorkerStats
    batch_sizes: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class AvatarLoaded:
    """``load_avatar_dir``'s and ``prepare_avatar_dir``'s answer: the info and face report, or
    why the folder cannot be served."""

    info: AvatarInfo | None
    problem: str | None
    face_report: FaceReport | None = None
