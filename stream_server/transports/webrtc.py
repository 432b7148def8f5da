"""WebRTC transport: one engine stream played to one browser peer over aiortc.

``WebRtcSender.answer(offer)`` answers the client's offer with one audio and one video track in one
MediaStream; ``run()`` then pumps the engine stream's frames into the two tracks until the stream
ends or the peer goes away.

Who encodes the video: in thread mode the track hands aiortc raw pictures and aiortc encodes them
(VP8 or H.264, as negotiated, its bitrate following the receiver's estimate). In process mode the
stream is a ``RemoteStream`` whose worker process encoded H.264 already (``PacketVideoTrack``):
the answer offers H.264 only (an offer without it is refused), the track hands aiortc
``av.Packet``s, which it only splits into RTP payloads, and a keyframe request from the peer (PLI,
FIR) goes to the worker. The audio is encoded here in both modes (aiortc's Opus: about one
percent of a core per stream).

Timing is one session clock. Frame ``i`` of the engine stream is at stream time
``(i - i0) / fps`` (``i0`` the first frame played): its image becomes video pts
``(i - i0) * 3600`` in 1/90000 and its 1920 samples become two 20 ms audio frames at pts
``(i - i0) * 1920`` and ``+ 960`` in 1/48000. Both tracks hand media to aiortc when the shared clock
reaches its stream time, so what aiortc stamps in its RTCP sender reports (wall time of the last
packet against its RTP time) agrees between the tracks and the browser lines them up. The clock
starts with the first media either track hands out, and slips (both tracks at once) when the engine
is late: media that was not there when due goes out on arrival and everything after it moves back.

The tracks only pull from buffers that ``run()`` fills, never the engine. ``run()`` takes frames
from the engine only while the audio buffer is below ``audio_lead_frames``: audio is consumed in
real time, so the engine's own bounded buffer absorbs a burst and its worker stops rendering for
this session when it is full. The video buffer is bounded (``video_buffer_frames``): when the
video encoder falls behind the clock its oldest frames are dropped, audio is never dropped.

Ends: a peer connection that fails or closes (or never connects within ``connect_timeout_s``)
cancels the engine stream and ``run()`` returns at once, so the slot is freed; a cancelled or failed
engine stream ends ``run()`` at once; a finished clip is played out first. In live mode the idle
frames the engine made while the peer was connecting are skipped, and ``interrupt()`` drops what
waits in the tracks (the audio stays continuous, with silence). ``close()`` closes the peer.
"""

from __future__ import annotations

import asyncio
import contextlib
import fractions
import logging
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from aiortc import (
    MediaStreamTrack,
    RTCConfiguration,
    RTCIceServer,
    RTCPeerConnection,
    RTCRtpSender,
    RTCRtpTransceiver,
    RTCSessionDescription,
)
from aiortc.mediastreams import MediaStreamError
from aiortc.sdp import SessionDescription
from av import AudioFrame, Packet, VideoFrame
from av.stream import Stream

from inference.engine import FPS, OUTPUT_SAMPLE_RATE, OUTPUT_SAMPLES_PER_FRAME, Frame
from inference.procs.remote_stream import RemoteStream
from inference.serving_engine import EncodedFrame, ServedStream
from inference.stream import StreamMode, StreamState
from stream_server.transports.mse import StreamResult

log = logging.getLogger(__name__)

VIDEO_CLOCK_RATE = 90_000
VIDEO_TIME_BASE = fractions.Fraction(1, VIDEO_CLOCK_RATE)
VIDEO_TICKS_PER_FRAME = VIDEO_CLOCK_RATE // FPS  # 3600
AUDIO_TIME_BASE = fractions.Fraction(1, OUTPUT_SAMPLE_RATE)
AUDIO_CHUNK = OUTPUT_SAMPLE_RATE // 50  # 20 ms, 960 samples: one Opus frame
CHUNKS_PER_FRAME = OUTPUT_SAMPLES_PER_FRAME // AUDIO_CHUNK  # 2

# peer connection states after which no media will flow again
_DEAD_STATES = ("failed", "closed")


class PeerConnectionLost(ConnectionError):
    """The client's peer connection failed or was closed before the stream was delivered."""


def ice_configuration(ice_servers: Sequence[Mapping[str, Any]] | None) -> RTCConfiguration:
    """``[{"urls": ..., "username"?: ..., "credential"?: ...}]`` as an aiortc configuration.

    ``None`` or an empty list means no STUN/TURN server at all (host candidates only), never
    aiortc's built-in public STUN default."""
    servers: list[RTCIceServer] = []
    for entry in ice_servers or ():
        urls = entry.get("urls") if isinstance(entry, Mapping) else None
        if not urls or not (isinstance(urls, str) or all(isinstance(u, str) for u in urls)):
            raise ValueError(f"ICE server entry needs 'urls' (a string or a list of strings): {entry!r}")
        servers.append(
            RTCIceServer(
                urls=urls if isinstance(urls, str) else list(urls),
                username=entry.get("username"),
                credential=entry.get("credential"),
            )
        )
    return RTCConfiguration(iceServers=servers)


class SessionClock:
    """Stream time to wall time (``time.monotonic``), shared by the tracks of one session."""

    def __init__(self, *, slip_slack_s: float = 0.01) -> None:
        self.origin: float | None = None  # wall time of stream time 0
        self.base_index: int | None = None  # engine frame index at stream time 0
        self.slip_slack_s = slip_slack_s
        self.slipped_s = 0.0

    def frame_time(self, index: int) -> float:
        assert self.base_index is not None
        return (index - self.base_index) / FPS

    def due(self, t: float, *, late_arrival: bool = False) -> float:
        """When media at stream time ``t`` should go out. The first call starts the clock;
        ``late_arrival`` (the media was not there when the track asked for it) lets the clock slip
        so that it is due now rather than in the past."""
        now = time.monotonic()
        if self.origin is None:
            self.origin = now - t
        elif late_arrival and now - (self.origin + t) > self.slip_slack_s:
            self.slipped_s += now - (self.origin + t)
            self.origin = now - t
        return self.origin + t


class _BufferedTrack(MediaStreamTrack):
    """A track that only pulls from a bounded buffer filled by ``WebRtcSender.run``."""

    def __init__(self, clock: SessionClock) -> None:
        super().__init__()
        self.clock = clock
        self._arrived = asyncio.Event()
        self.drained = asyncio.Event()  # the buffer is empty and aiortc came back for more
        self.delivered = 0
        self.wake: Callable[[], None] = lambda: None  # told when media left the buffer

    def _notify(self) -> None:
        self.drained.clear()
        self._arrived.set()

    async def _wait_for_data(self, buffer: deque[Any]) -> bool:
        """Wait until ``buffer`` holds something; True if it had to wait (an underrun)."""
        waited = False
        while not buffer:
            if self.readyState != "live":
                raise MediaStreamError
            waited = True
            if not self.drained.is_set():
                self.drained.set()
                self.wake()
            self._arrived.clear()
            await self._arrived.wait()
        if self.readyState != "live":
            raise MediaStreamError
        self.drained.clear()
        return waited

    @staticmethod
    async def _sleep_until(when: float) -> None:
        delay = when - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)

    def stop(self) -> None:
        super().stop()
        self._arrived.set()  # wake a waiting recv() so that it raises MediaStreamError


class _VideoTrack(_BufferedTrack):
    """Video items (a picture or a packet) played on the session clock, one per engine frame."""

    kind = "video"
    encoded_in = ""
    """Which process encoded what this track hands out (the ``mts_webrtc_video_frames`` label)."""

    def __init__(self, clock: SessionClock, capacity: int = 8) -> None:
        super().__init__(clock)
        if capacity < 1:
            raise ValueError("video buffer capacity must be at least 1")
        self._frames: deque[tuple[int, Any]] = deque()
        self.capacity = capacity
        self.dropped = 0
        self.on_delivered: Callable[[str], None] = lambda encoded_in: None

    @property
    def buffered(self) -> int:
        return len(self._frames)

    def clear(self) -> None:
        self._frames.clear()

    async def _next_due(self) -> tuple[int, Any]:
        """The oldest item, once the clock reaches it."""
        waited = await self._wait_for_data(self._frames)
        while True:
            index, _ = self._frames[0]
            due = self.clock.due(self.clock.frame_time(index), late_arrival=waited)
            if due <= time.monotonic():
                break
            await self._sleep_until(due)
            # while we slept, newer frames may have pushed this one out (or an interrupt cleared
            # the buffer): look again
            waited = await self._wait_for_data(self._frames)
        item = self._frames.popleft()
        self.delivered += 1
        self.on_delivered(self.encoded_in)
        self.wake()
        return item

    def _pts(self, index: int) -> int:
        return (index - (self.clock.base_index or 0)) * VIDEO_TICKS_PER_FRAME


class EngineVideoTrack(_VideoTrack):
    """Raw pictures, encoded by aiortc in this process (thread mode)."""

    encoded_in = "server"

    def push(self, index: int, image: np.ndarray) -> None:
        """Queue the image of engine frame ``index``; when full, drop the oldest frame."""
        while len(self._frames) >= self.capacity:
            self._frames.popleft()
            self.dropped += 1
        self._frames.append((index, image))
        self._notify()

    async def recv(self) -> VideoFrame:
        index, image = await self._next_due()
        frame = VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
        frame.pts = self._pts(index)
        frame.time_base = VIDEO_TIME_BASE
        return frame


class PacketVideoTrack(_VideoTrack):
    """H.264 access units encoded by the worker process (process mode); aiortc only packetizes
    them (``RTCRtpSender`` hands an ``av.Packet`` to its encoder's ``pack``).

    A P-frame is only worth sending after the frames it refers to, so what cannot be played in
    order waits for the next IDR frame: the packets before the first IDR frame (live idle frames
    skipped at the start), a full buffer (all of it goes), and an interrupt (``clear``). Then
    ``request_keyframe`` asks the worker for one at once, instead of waiting for the interval; the
    audio plays on meanwhile."""

    encoded_in = "worker"

    def __init__(self, clock: SessionClock, capacity: int = 8) -> None:
        super().__init__(clock, capacity)
        self.request_keyframe: Callable[[], None] = lambda: None
        self.keyframes_requested = 0
        self._need_keyframe = True
        self._requested = False

    def push(self, index: int, video: bytes, keyframe: bool) -> None:
        """Queue the access unit of engine frame ``index``."""
        if len(self._frames) >= self.capacity:
            self.dropped += len(self._frames)
            self._frames.clear()
            self._need_keyframe = True
        if self._need_keyframe and not keyframe:
            self.dropped += 1
            self._ask_for_keyframe()
            return
        self._need_keyframe = self._requested = False
        self._frames.append((index, (video, keyframe)))
        self._notify()

    def clear(self) -> None:
        super().clear()
        self._need_keyframe = True
        self._ask_for_keyframe()

    def _ask_for_keyframe(self) -> None:
        if not self._requested:
            self._requested = True
            self.keyframes_requested += 1
            self.request_keyframe()

    async def recv(self) -> Packet[Stream]:
        index, (video, keyframe) = await self._next_due()
        packet = Packet(video)
        packet.pts = self._pts(index)
        packet.time_base = VIDEO_TIME_BASE
        packet.is_keyframe = keyframe
        return packet


class EngineAudioTrack(_BufferedTrack):
    kind = "audio"

    def __init__(self, clock: SessionClock) -> None:
        super().__init__(clock)
        self._chunks: deque[tuple[int, np.ndarray]] = deque()  # (sample position, int16 samples)
        self._next_pos: int | None = None

    def push(self, index: int, audio: np.ndarray) -> None:
        """Queue the audio of engine frame ``index`` (float32 mono, one frame's samples)."""
        if len(audio) != OUTPUT_SAMPLES_PER_FRAME:
            raise ValueError(f"frame {index} has {len(audio)} audio samples, not {OUTPUT_SAMPLES_PER_FRAME}")
        pcm = (np.clip(audio, -1.0, 1.0) * 32767.0).astype(np.int16)
        start = (index - (self.clock.base_index or 0)) * OUTPUT_SAMPLES_PER_FRAME
        for k in range(CHUNKS_PER_FRAME):
            self._chunks.append((start + k * AUDIO_CHUNK, pcm[k * AUDIO_CHUNK : (k + 1) * AUDIO_CHUNK]))
        self._notify()

    @property
    def buffered_frames(self) -> float:
        return len(self._chunks) / CHUNKS_PER_FRAME

    def clear(self) -> None:
        self._chunks.clear()

    async def recv(self) -> AudioFrame:
        waited = await self._wait_for_data(self._chunks)
        pos, pcm = self._chunks[0]
        # judge lateness by the media that came, so that a gap never adds to the latency
        due = self.clock.due(pos / OUTPUT_SAMPLE_RATE, late_arrival=waited)
        if self._next_pos is not None and pos > self._next_pos:
            # the engine skipped frames (live interrupt): keep the audio continuous with silence
            pos, pcm = self._next_pos, np.zeros(AUDIO_CHUNK, dtype=np.int16)
            due = self.clock.due(pos / OUTPUT_SAMPLE_RATE)
        else:
            self._chunks.popleft()
        await self._sleep_until(due)
        if self.readyState != "live":
            raise MediaStreamError
        frame = AudioFrame.from_ndarray(pcm.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = OUTPUT_SAMPLE_RATE
        frame.pts = pos
        frame.time_base = AUDIO_TIME_BASE
        self._next_pos = pos + AUDIO_CHUNK
        self.delivered += 1
        self.wake()
        return frame


def check_offer(offer_sdp: object, *, h264: bool = False) -> None:
    """Raise ``ValueError`` unless the offer is SDP with audio and video we can send (with
    ``h264``, video in H.264)."""
    if not isinstance(offer_sdp, str) or not offer_sdp.strip():
        raise ValueError("the WebRTC offer must be a non-empty SDP string")
    try:
        parsed = SessionDescription.parse(offer_sdp)
    except Exception as exc:
        raise ValueError(f"the WebRTC offer is not valid SDP: {exc}") from exc
    for kind in ("audio", "video"):
        media = [m for m in parsed.media if m.kind == kind]
        if not media:
            raise ValueError(f"the WebRTC offer has no {kind} m-line; offer one audio and one video transceiver")
        if not any(m.direction in (None, "sendrecv", "recvonly") and m.port != 0 for m in media):
            raise ValueError(f"the WebRTC offer does not receive {kind}; use a recvonly {kind} transceiver")
    if h264 and not any(is_h264(c.mimeType) for m in parsed.media if m.kind == "video" for c in m.rtp.codecs):
        raise ValueError(
            "the WebRTC offer has no H.264 video: this server encodes its video in its worker processes, "
            "in H.264 only (offer H.264, packetization-mode 1, constrained baseline)"
        )


def is_h264(mime_type: str) -> bool:
    return mime_type.lower() == "video/h264"


def h264_only(transceiver: RTCRtpTransceiver) -> None:
    """Make H.264 (and its retransmissions) the only video codec ``transceiver`` may negotiate."""
    codecs = RTCRtpSender.getCapabilities("video").codecs
    transceiver.setCodecPreferences([c for c in codecs if is_h264(c.mimeType) or c.mimeType.lower() == "video/rtx"])


class WebRtcSender:
    """Plays one engine stream to one WebRTC peer."""

    def __init__(
        self,
        stream: ServedStream,
        ready: asyncio.Event,
        ice_servers: Sequence[Mapping[str, Any]] | None = None,
        *,
        audio_lead_frames: int = 4,
        video_buffer_frames: int = 8,
        connect_timeout_s: float = 30.0,
        gather_timeout_s: float = 10.0,
        drain_margin_s: float = 5.0,
        on_frames: Callable[[int], None] = lambda n: None,
        on_video: Callable[[str], None] = lambda encoded_in: None,
    ) -> None:
        self.stream = stream
        self.ready = ready
        self.configuration = ice_configuration(ice_servers)
        self.audio_lead_frames = max(1, audio_lead_frames)
        self.connect_timeout_s = connect_timeout_s
        self.gather_timeout_s = gather_timeout_s
        self.drain_margin_s = drain_margin_s
        self.on_frames = on_frames
        self.clock = SessionClock()
        self.remote = stream if isinstance(stream, RemoteStream) else None
        """A stream in a worker process: its video comes as H.264 packets, encoded there."""
        self.video: EngineVideoTrack | PacketVideoTrack
        if self.remote is not None:
            self.video = PacketVideoTrack(self.clock, capacity=video_buffer_frames)
            self.video.request_keyframe = self.remote.request_keyframe
        else:
            self.video = EngineVideoTrack(self.clock, capacity=video_buffer_frames)
        self.video.on_delivered = on_video
        self.audio = EngineAudioTrack(self.clock)
        self.pc: RTCPeerConnection | None = None
        self.frames = 0
        self.skipped = 0  # live mode: stale idle frames skipped before the first one played
        self.connection_states: list[str] = []
        self._connected = False
        self._peer_gone = False
        self._closed = False

    @property
    def video_dropped(self) -> int:
        return self.video.dropped

    # ----- signalling -----

    async def answer(self, offer_sdp: str) -> str:
        """Answer the client's offer; returns the answer SDP with all ICE candidates in it."""
        if self.pc is not None:
            raise RuntimeError("this sender has answered an offer already")
        packets = isinstance(self.video, PacketVideoTrack)
        check_offer(offer_sdp, h264=packets)
        pc = RTCPeerConnection(self.configuration)
        self.pc = pc
        pc.on("connectionstatechange", self._on_connection_state)
        try:
            if isinstance(self.video, PacketVideoTrack):
                # the codec is chosen from the offer: restrict it before the offer is applied (the
                # offer's video m-line takes this transceiver)
                video = pc.addTransceiver(self.video, direction="sendonly")
                h264_only(video)
                # aiortc's keyframe hook (a PLI or FIR from the peer) would only reach its own
                # encoder: send it to the worker's
                video.sender._send_keyframe = self.video.request_keyframe  # type: ignore[method-assign]
            try:
                await pc.setRemoteDescription(RTCSessionDescription(sdp=offer_sdp, type="offer"))
            except Exception as exc:
                raise ValueError(f"the WebRTC offer was refused: {exc}") from exc
            # both tracks go out in the peer connection's one MediaStream (one msid stream id)
            pc.addTrack(self.audio)
            if not packets:
                pc.addTrack(self.video)
            try:
                await pc.setLocalDescription(await pc.createAnswer())
            except Exception as exc:
                raise ValueError(f"no answer to the WebRTC offer (no common codec?): {exc}") from exc
            if packets and self.video_codec(pc) != "video/H264":
                raise ValueError(f"the WebRTC answer would send {self.video_codec(pc)}, not H.264")
            await self._gathered(pc)
        except BaseException:
            await self.close()
            raise
        assert pc.localDescription is not None
        return pc.localDescription.sdp

    @staticmethod
    def video_codec(pc: RTCPeerConnection) -> str:
        """The video codec the answer sends (its first), such as ``video/H264``."""
        assert pc.localDescription is not None
        parsed = SessionDescription.parse(pc.localDescription.sdp)
        codecs = [c.mimeType for m in parsed.media if m.kind == "video" for c in m.rtp.codecs]
        return codecs[0] if codecs else ""

    async def _gathered(self, pc: RTCPeerConnection) -> None:
        """aiortc gathers inside ``setLocalDescription``; wait for it anyway, bounded."""
        if pc.iceGatheringState == "complete":
            return
        done = asyncio.Event()
        pc.on("icegatheringstatechange", lambda: done.set() if pc.iceGatheringState == "complete" else None)
        if pc.iceGatheringState != "complete":
            async with asyncio.timeout(self.gather_timeout_s):
                await done.wait()

    def _on_connection_state(self) -> None:
        assert self.pc is not None
        state = self.pc.connectionState
        self.connection_states.append(state)
        if state == "connected":
            self._connected = True
        elif state in _DEAD_STATES:
            self._peer_gone = True
        self.ready.set()  # wake run()

    # ----- media -----

    async def run(self) -> StreamResult:
        """Play the engine stream until it ends or the peer goes; cancels the stream if the peer
        goes first. A finished clip is played out before this returns."""
        if self.pc is None:
            raise RuntimeError("answer() the client's offer before run()")
        for track in (self.audio, self.video):
            track.wake = self.ready.set
            track.on("ended", self.ready.set)
        if not await self._wait_connected():
            if self.stream.closed:  # cancelled or failed while the peer was connecting
                return StreamResult(self.frames, self.stream.state, self.stream.error)
            return self._abandon()
        while True:
            self.ready.clear()
            if self._peer_gone:
                return self._abandon()
            if self.stream.state in (StreamState.CANCELLED, StreamState.FAILED):
                return StreamResult(self.frames, self.stream.state, self.stream.error)
            room = self.audio_lead_frames - int(self.audio.buffered_frames)
            if room > 0:
                frames = self._take(room)
                if frames:
                    self._play(frames)
                    continue
                if self.stream.closed:
                    break
            await self._wait_ready()
        if self.stream.state is not StreamState.FINISHED:
            return StreamResult(self.frames, self.stream.state, self.stream.error)
        if not await self._drain():
            return self._abandon()
        return StreamResult(self.frames, StreamState.FINISHED, None)

    async def _wait_ready(self, timeout: float | None = None) -> None:
        """Wait for news: engine output, room in the audio buffer, a drained track, a peer state."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self.ready.wait()

    async def _wait_connected(self) -> bool:
        deadline = time.monotonic() + self.connect_timeout_s
        while not self._connected:
            self.ready.clear()
            if self._peer_gone or self.stream.closed:
                return False
            left = deadline - time.monotonic()
            if left <= 0:
                log.info("WebRTC peer did not connect within %.0f s", self.connect_timeout_s)
                return False
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(left):
                    await self.ready.wait()
        return not self._peer_gone

    def _take(self, limit: int) -> Sequence[Frame | EncodedFrame]:
        return self.remote.take_packets(limit) if self.remote is not None else self.stream.take_frames(limit)

    def _play(self, frames: Sequence[Frame | EncodedFrame]) -> None:
        if self.clock.base_index is None:
            frames = self._fresh(frames)
            if not frames:
                return
            self.clock.base_index = frames[0].index
        for frame in frames:
            self.audio.push(frame.index, frame.audio)
            if isinstance(self.video, PacketVideoTrack):
                assert isinstance(frame, EncodedFrame)
                self.video.push(frame.index, frame.video, frame.keyframe)
            else:
                assert isinstance(frame, Frame)
                self.video.push(frame.index, frame.image)
        self.frames += len(frames)
        self.on_frames(len(frames))

    def _fresh(self, frames: Sequence[Frame | EncodedFrame]) -> Sequence[Frame | EncodedFrame]:
        """Live mode, before the first frame plays: idle frames the engine made while the peer was
        connecting are already late; skip them instead of adding their length to the latency."""
        if self.stream.mode is not StreamMode.LIVE:
            return frames
        late = time.monotonic() - 1.0 / FPS
        keep = [f for f in frames if f.speech or self.stream.started_at + f.index / FPS >= late]
        self.skipped += len(frames) - len(keep)
        return keep

    async def _drain(self) -> bool:
        """Wait until both tracks handed out everything and aiortc came back for more (so the last
        frames were encoded and sent); False if the peer went away first."""
        deadline = time.monotonic() + self.audio.buffered_frames / FPS + self.drain_margin_s
        while not (self.audio.drained.is_set() and self.video.drained.is_set()):
            self.ready.clear()
            if self._peer_gone or self.audio.readyState != "live":
                return False
            if time.monotonic() >= deadline:
                log.warning("WebRTC tracks did not drain; ending the stream anyway")
                return True
            await self._wait_ready(deadline - time.monotonic())
        return True

    def interrupt(self) -> None:
        """Live mode: drop what waits in the tracks (call with ``EngineStream.interrupt``). The
        audio stays continuous: the skipped frames' time is filled with silence."""
        self.audio.clear()
        self.video.clear()
        self.ready.set()

    def _abandon(self) -> StreamResult:
        """The peer is gone (or never came): free the engine at once."""
        self.stream.cancel()
        error: BaseException = (
            PeerConnectionLost(f"peer connection {self.pc.connectionState if self.pc else 'absent'}")
            if self._connected or self._peer_gone
            else TimeoutError(f"the WebRTC peer did not connect within {self.connect_timeout_s:.0f} s")
        )
        return StreamResult(self.frames, StreamState.CANCELLED, error)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.video.stop()
        self.audio.stop()
        if self.pc is not None:
            await self.pc.close()
