"""The WebRTC transport against an aiortc client peer on loopback, fed by the real frame worker with
the lite renderer; and its tracks on their own, without a network.

Both peers use empty ICE server lists (host candidates only). Waits are bounded generously and the
only timing assertions are lower bounds (media never leaves before its time), which load cannot
break.
"""

from __future__ import annotations

import asyncio
import fractions
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import numpy as np
import pytest
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from aiortc.rtcrtpreceiver import RTCRtpReceiver
from aiortc.rtp import RtcpSrPacket
from aiortc.sdp import SessionDescription
from av import AudioFrame, VideoFrame

from inference.avatars.store import AvatarStore
from inference.engine import FEATURE_SAMPLE_RATE, FPS, OUTPUT_SAMPLES_PER_FRAME, Frame, PreparedAvatar
from inference.lite import LiteRenderer
from inference.stream import EngineStream, StreamMode, StreamState
from inference.worker import FrameWorker
from stream_server.transports.webrtc import (
    EngineAudioTrack,
    EngineVideoTrack,
    PeerConnectionLost,
    SessionClock,
    WebRtcSender,
    check_offer,
    ice_configuration,
)

BEEP_FRAME = 20  # the test clip beeps from frame 20 (0.8 s) for 5 frames
MARK_BITS = 7
MARK_BLOCK = 64


# ----- fixtures and helpers -----


@pytest.fixture(scope="module")
def avatar(tmp_path_factory: pytest.TempPathFactory) -> PreparedAvatar:
    store = AvatarStore(tmp_path_factory.mktemp("avatars"), LiteRenderer())
    store.ensure_default()
    prepared = store.get("astronaut")
    assert prepared is not None
    return prepared


@pytest.fixture
def worker(avatar: PreparedAvatar) -> Iterator[FrameWorker]:
    w = FrameWorker(LiteRenderer())
    w.start()
    yield w
    w.stop()


class Rtcp:
    """What the client's receivers saw: the first RTP timestamp and the sender reports, per kind."""

    def __init__(self) -> None:
        self.first_rtp: dict[str, int] = {}
        self.reports: dict[str, list[tuple[int, int]]] = {"audio": [], "video": []}


@pytest.fixture
def rtcp(monkeypatch: pytest.MonkeyPatch) -> Rtcp:
    """Spy on the client's RTP receivers (aiortc internals) to read the RTCP sender reports."""
    seen = Rtcp()
    handle_rtp, handle_rtcp = RTCRtpReceiver._handle_rtp_packet, RTCRtpReceiver._handle_rtcp_packet

    async def rtp(self: RTCRtpReceiver, packet: Any, arrival_time_ms: int) -> None:
        seen.first_rtp.setdefault(self.track.kind, packet.timestamp)
        await handle_rtp(self, packet, arrival_time_ms)

    async def rtcp_packet(self: RTCRtpReceiver, packet: Any) -> None:
        if isinstance(packet, RtcpSrPacket) and packet.sender_info.packet_count > 0:
            info = packet.sender_info
            seen.reports[self.track.kind].append((info.ntp_timestamp, info.rtp_timestamp))
        await handle_rtcp(self, packet)

    monkeypatch.setattr(RTCRtpReceiver, "_handle_rtp_packet", rtp)
    monkeypatch.setattr(RTCRtpReceiver, "_handle_rtcp_packet", rtcp_packet)
    return seen


def beep_clip(seconds: float) -> tuple[np.ndarray, np.ndarray]:
    """Silence with a 1 kHz beep over frames BEEP_FRAME..BEEP_FRAME+4, at 16 kHz and 48 kHz."""

    def make(rate: int) -> np.ndarray:
        pcm = np.zeros(int(seconds * rate), np.float32)
        start, stop = BEEP_FRAME * rate // FPS, (BEEP_FRAME + 5) * rate // FPS
        t = np.arange(stop - start) / rate
        pcm[start:stop] = 0.5 * np.sin(2 * np.pi * 1000 * t)
        return pcm

    return make(FEATURE_SAMPLE_RATE), make(48_000)


def mark(image: np.ndarray, index: int) -> np.ndarray:
    """Write the frame index as black/white blocks across the top of a copy of the image."""
    out = image.copy()
    for bit in range(MARK_BITS):
        out[:MARK_BLOCK, bit * MARK_BLOCK : (bit + 1) * MARK_BLOCK] = 255 if index >> bit & 1 else 0
    return out


def read_mark(rgb: np.ndarray) -> int:
    q = MARK_BLOCK // 4
    bits = [rgb[q : 3 * q, bit * MARK_BLOCK + q : bit * MARK_BLOCK + 3 * q].mean() > 128 for bit in range(MARK_BITS)]
    return sum(1 << k for k, on in enumerate(bits) if on)


def marked(stream: EngineStream) -> EngineStream:
    """Stamp each frame's index into its image as the transport takes it, to find it at the client."""
    take = stream.take_frames

    def take_marked(limit: int = 1 << 30) -> list[Frame]:
        frames = take(limit)
        for f in frames:
            f.image = mark(f.image, f.index)
        return frames

    stream.take_frames = take_marked  # type: ignore[method-assign]
    return stream


def open_stream(
    worker: FrameWorker, avatar: PreparedAvatar, mode: StreamMode = StreamMode.CLIP
) -> tuple[EngineStream, asyncio.Event]:
    """An engine stream wired to an asyncio event the way the server wires it."""
    loop = asyncio.get_running_loop()
    ready = asyncio.Event()

    def on_output() -> None:
        loop.call_soon_threadsafe(ready.set)

    return worker.open_stream(avatar, mode, on_output=on_output), ready


def feed_clip(stream: EngineStream, seconds: float) -> None:
    pcm16, pcm48 = beep_clip(seconds)
    stream.feed(pcm16, pcm48)
    stream.end_audio()


class Client:
    """An aiortc peer that receives one audio and one video track and records what arrives."""

    def __init__(self, audio: bool = True, video: bool = True, direction: str = "recvonly") -> None:
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        if audio:
            self.pc.addTransceiver("audio", direction=direction)
        if video:
            self.pc.addTransceiver("video", direction=direction)
        self.video: list[tuple[int, int]] = []  # (pts, mark)
        self.audio: list[tuple[int, np.ndarray]] = []  # (pts, channel 0 as float)
        self.stream_ids: set[str] = set()
        self._tasks: list[asyncio.Task[None]] = []
        self.pc.on("track", self._on_track)

    def _on_track(self, track: MediaStreamTrack) -> None:
        self._tasks.append(asyncio.ensure_future(self._collect(track)))

    async def _collect(self, track: MediaStreamTrack) -> None:
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            assert frame.pts is not None
            if isinstance(frame, VideoFrame):
                self.video.append((frame.pts, read_mark(frame.to_ndarray(format="rgb24"))))
            else:
                assert isinstance(frame, AudioFrame)
                assert frame.format.name == "s16" and frame.sample_rate == 48_000
                channels = len(frame.layout.channels)
                samples = frame.to_ndarray().reshape(-1, channels)[:, 0].astype(np.float32) / 32768
                self.audio.append((frame.pts, samples))

    async def offer(self) -> str:
        await self.pc.setLocalDescription(await self.pc.createOffer())
        return self.pc.localDescription.sdp

    async def connect(self, sender: WebRtcSender) -> str:
        answer = await sender.answer(await self.offer())
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))
        return answer

    async def wait_for(self, video: int = 0, audio: int = 0, timeout: float = 30.0) -> None:
        async with asyncio.timeout(timeout):
            while len(self.video) < video or len(self.audio) < audio:
                await asyncio.sleep(0.02)

    async def close(self) -> None:
        await self.pc.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


@pytest.fixture
async def client() -> AsyncIterator[Client]:
    c = Client()
    yield c
    await c.close()


def ntp_seconds(ntp: int) -> float:
    return (ntp >> 32) + (ntp & 0xFFFFFFFF) / 2**32


# ----- end to end over loopback -----


async def test_a_clip_arrives_whole_and_in_sync(
    worker: FrameWorker, avatar: PreparedAvatar, client: Client, rtcp: Rtcp
) -> None:
    stream, ready = open_stream(worker, avatar)
    marked(stream)
    feed_clip(stream, 2.0)  # 50 frames
    # a video buffer as long as the clip: no congestion drops here, whatever the load (the drop
    # policy has its own test below)
    sender = WebRtcSender(stream, ready, [], video_buffer_frames=50)
    try:
        answer = await client.connect(sender)
        started = time.monotonic()
        result = await asyncio.wait_for(sender.run(), 60)
        elapsed = time.monotonic() - started

        # the answer: one audio and one video m-line, both tracks in one MediaStream
        media = SessionDescription.parse(answer).media
        assert sorted(m.kind for m in media) == ["audio", "video"]
        assert len({m.msid.split()[0] for m in media if m.msid}) == 1
        assert all(m.direction == "sendonly" for m in media)

        assert result.state is StreamState.FINISHED and result.error is None
        assert result.frames == 50 and stream.state is StreamState.FINISHED
        assert sender.video_dropped == 0
        # paced in real time: run() cannot return before the last 20 ms of audio was due
        assert elapsed >= 2.0 - 0.03
        assert sender.connection_states == ["connecting", "connected"]

        # aiortc's receiver only releases a video frame when the next one's first packet arrives,
        # so the clip's last frame stays in its jitter buffer: 49 of 50 come out (48 allowed in
        # case one late packet is still being retransmitted). Its audio jitter buffer likewise
        # keeps the last 4 packets (80 ms) for want of later ones.
        await client.wait_for(video=48, audio=90)
        await asyncio.sleep(0.3)  # anything still on its way
        marks = [m for _, m in client.video]
        assert 48 <= len(marks) <= 50
        assert marks == list(range(len(marks))), marks
        # video pts (relative to the first frame, in 1/90000) come from the frame index
        assert [pts for pts, _ in client.video] == [3600 * m for m in marks]

        # audio: continuous 20 ms frames from pts 0, 2 s less what the jitter buffer holds back
        audio_pts = [pts for pts, _ in client.audio]
        assert audio_pts == [960 * k for k in range(len(audio_pts))]
        assert 90 <= len(audio_pts) <= 100

        # in sync: the beep starts at frame 20's time on the audio timeline (Opus adds a few ms of
        # codec delay), and frame 20's image is at the same time on the video timeline
        pcm = np.concatenate([s for _, s in client.audio])
        onset = int(np.argmax(np.abs(pcm) > 0.25)) / 48_000
        frame20 = dict((m, pts) for pts, m in client.video)[BEEP_FRAME] / 90_000
        assert frame20 == pytest.approx(BEEP_FRAME / FPS)
        assert abs(onset - frame20) <= 1 / FPS, (onset, frame20)
        assert np.abs(pcm[: int(0.75 * 48_000)]).max() < 0.05  # silent before the beep

        # and in sync on the wall clock, which is what a browser goes by: each track's RTCP sender
        # report maps its RTP time to the wall time its last packet left; both must put stream
        # time 0 at the same instant. Separate or unpaced clocks are off by far more than the
        # few milliseconds of encoding seen here; the bound is three frames so load cannot break it.
        async with asyncio.timeout(30):
            while not (rtcp.reports["audio"] and rtcp.reports["video"]):
                await asyncio.sleep(0.1)
        zero = {}
        for kind, rate in (("audio", 48_000), ("video", 90_000)):
            ntp, rtp = rtcp.reports[kind][-1]
            zero[kind] = ntp_seconds(ntp) - ((rtp - rtcp.first_rtp[kind]) % 2**32) / rate
        assert abs(zero["video"] - zero["audio"]) <= 3 / FPS, zero
    finally:
        await sender.close()


async def test_closing_the_client_mid_stream_cancels_the_engine_stream(
    worker: FrameWorker, avatar: PreparedAvatar, client: Client
) -> None:
    stream, ready = open_stream(worker, avatar)
    feed_clip(stream, 30.0)
    sender = WebRtcSender(stream, ready, [])
    try:
        await client.connect(sender)
        run = asyncio.ensure_future(sender.run())
        await client.wait_for(video=5)
        await client.close()
        # the DTLS close reaches the server peer at once; bounded generously all the same, and far
        # below the 30 s the clip would take
        result = await asyncio.wait_for(run, 15)
        assert result.state is StreamState.CANCELLED
        assert isinstance(result.error, PeerConnectionLost)
        assert stream.state is StreamState.CANCELLED and stream.closed
        assert result.frames < 30 * FPS
        assert sender.connection_states == ["connecting", "connected", "closed"]
    finally:
        await sender.close()


async def test_cancelling_the_engine_stream_ends_run(
    worker: FrameWorker, avatar: PreparedAvatar, client: Client
) -> None:
    stream, ready = open_stream(worker, avatar)
    feed_clip(stream, 30.0)
    sender = WebRtcSender(stream, ready, [])
    try:
        await client.connect(sender)
        run = asyncio.ensure_future(sender.run())
        await client.wait_for(video=3)
        stream.cancel()  # what the session does on "cancel" or a closed socket
        result = await asyncio.wait_for(run, 15)
        assert result.state is StreamState.CANCELLED and result.error is None
    finally:
        await sender.close()
    assert sender.pc is not None and sender.pc.connectionState == "closed"


class FailingRenderer(LiteRenderer):
    def render(self, requests: Any) -> list[np.ndarray]:
        raise RuntimeError("out of GPU memory")


async def test_an_engine_failure_ends_run_with_the_error(avatar: PreparedAvatar, client: Client) -> None:
    failing = FrameWorker(FailingRenderer())
    failing.start()
    stream, ready = open_stream(failing, avatar)
    sender = WebRtcSender(stream, ready, [])
    try:
        await client.connect(sender)
        run = asyncio.ensure_future(sender.run())
        feed_clip(stream, 2.0)
        result = await asyncio.wait_for(run, 30)
        assert result.state is StreamState.FAILED and isinstance(result.error, RuntimeError)
    finally:
        await sender.close()
        failing.stop()


async def test_live_mode_skips_the_idle_frames_made_while_connecting(
    worker: FrameWorker, avatar: PreparedAvatar, client: Client
) -> None:
    stream, ready = open_stream(worker, avatar, StreamMode.LIVE)
    await asyncio.sleep(1.0)  # the engine makes ~25 idle frames before the peer even offers
    sender = WebRtcSender(stream, ready, [])
    try:
        await client.connect(sender)
        run = asyncio.ensure_future(sender.run())
        await client.wait_for(video=10, audio=10)
        # the first frame played is one that was due after the peer connected, not frame 0
        assert sender.clock.base_index is not None and sender.clock.base_index >= 20
        assert sender.skipped >= 20
        stream.cancel()
        result = await asyncio.wait_for(run, 15)
        assert result.state is StreamState.CANCELLED
    finally:
        await sender.close()


async def test_a_peer_that_never_connects_frees_the_slot(worker: FrameWorker, avatar: PreparedAvatar) -> None:
    stream, ready = open_stream(worker, avatar)
    feed_clip(stream, 30.0)
    sender = WebRtcSender(stream, ready, [], connect_timeout_s=0.5)
    silent = Client()
    try:
        await sender.answer(await silent.offer())  # the client never applies the answer
        result = await asyncio.wait_for(sender.run(), 15)
        assert result.state is StreamState.CANCELLED and isinstance(result.error, TimeoutError)
        assert stream.state is StreamState.CANCELLED
    finally:
        await sender.close()
        await silent.close()


# ----- offers -----


@pytest.mark.parametrize("sdp", ["", "hello", "v=0\r\nm=video\r\n", 42])
def test_unparsable_offers_are_refused(sdp: Any) -> None:
    with pytest.raises(ValueError):
        check_offer(sdp)


@pytest.mark.parametrize(
    ("audio", "video", "direction", "missing"),
    [(True, False, "recvonly", "video"), (False, True, "recvonly", "audio"), (True, True, "sendonly", "receive")],
)
async def test_offers_without_audio_and_video_to_receive_are_refused(
    worker: FrameWorker, avatar: PreparedAvatar, audio: bool, video: bool, direction: str, missing: str
) -> None:
    stream, ready = open_stream(worker, avatar)
    sender = WebRtcSender(stream, ready)
    offerer = Client(audio=audio, video=video, direction=direction)
    try:
        with pytest.raises(ValueError, match=missing):
            await sender.answer(await offerer.offer())
        assert sender.pc is None
    finally:
        await offerer.close()
        await sender.close()
        stream.cancel()


def test_ice_servers_become_the_configuration() -> None:
    assert ice_configuration(None).iceServers == []  # never aiortc's public STUN default
    assert ice_configuration([]).iceServers == []
    config = ice_configuration(
        [{"urls": "stun:stun.example.org"}, {"urls": ["turn:t.example.org"], "username": "u", "credential": "p"}]
    )
    assert [s.urls for s in config.iceServers or []] == ["stun:stun.example.org", ["turn:t.example.org"]]
    assert (config.iceServers or [])[1].username == "u"
    with pytest.raises(ValueError):
        ice_configuration([{"username": "u"}])


# ----- the tracks on their own -----


def image(value: int = 0) -> np.ndarray:
    return np.full((16, 16, 3), value, np.uint8)


def tone_frame(level: float) -> np.ndarray:
    return np.full(OUTPUT_SAMPLES_PER_FRAME, level, np.float32)


async def test_the_video_buffer_drops_its_oldest_frames_when_full() -> None:
    clock = SessionClock()
    clock.base_index = 0
    track = EngineVideoTrack(clock, capacity=4)
    for i in range(10):
        track.push(i, image(i))
    assert track.dropped == 6 and track.buffered == 4
    frames = [await asyncio.wait_for(track.recv(), 10) for _ in range(4)]
    assert [f.pts for f in frames] == [3600 * i for i in range(6, 10)]
    assert [int(f.to_ndarray(format="rgb24")[0, 0, 0]) for f in frames] == [6, 7, 8, 9]
    assert all(f.time_base == fractions.Fraction(1, 90_000) for f in frames)


async def test_audio_and_video_run_on_one_clock() -> None:
    clock = SessionClock()
    clock.base_index = 100  # stream time 0 is engine frame 100
    video, audio = EngineVideoTrack(clock), EngineAudioTrack(clock)
    for i in range(100, 104):
        video.push(i, image())
        audio.push(i, tone_frame(0.25))
    got: list[tuple[str, float, float]] = []  # (kind, stream time, when it came out)
    for _ in range(4):
        v = await asyncio.wait_for(video.recv(), 10)
        assert v.pts is not None
        got.append(("video", v.pts / 90_000, time.monotonic()))
        for _ in range(2):
            a = await asyncio.wait_for(audio.recv(), 10)
            assert a.samples == 960 and a.format.name == "s16" and a.sample_rate == 48_000
            assert np.all(a.to_ndarray() == int(0.25 * 32767)) and a.pts is not None
            got.append(("audio", a.pts / 48_000, time.monotonic()))
    assert [t for k, t, _ in got if k == "video"] == [0.0, 0.04, 0.08, 0.12]
    assert [t for k, t, _ in got if k == "audio"] == pytest.approx([0.02 * k for k in range(8)])
    assert clock.origin is not None
    for _, t, out in got:  # nothing left before its time on the one clock
        assert out >= clock.origin + t - 1e-3


async def test_the_tracks_wait_for_the_engine_and_the_clock_slips_after_an_underrun() -> None:
    clock = SessionClock()
    clock.base_index = 0
    video, audio = EngineVideoTrack(clock), EngineAudioTrack(clock)
    video.push(0, image())
    audio.push(0, tone_frame(0.0))
    await video.recv()
    await audio.recv()
    await audio.recv()
    assert clock.slipped_s == 0
    waiting = asyncio.ensure_future(video.recv())
    await asyncio.sleep(0.3)
    assert not waiting.done()  # nothing to send: the track waits rather than inventing frames
    assert video.drained.is_set()
    pushed = time.monotonic()
    video.push(1, image())
    audio.push(1, tone_frame(0.0))
    frame = await asyncio.wait_for(waiting, 10)
    assert frame.pts == 3600
    # frame 1 came at least 0.26 s after it was due: the clock moved back for both tracks, so that
    # frame 1 is due when it came, not in the past
    assert clock.slipped_s >= 0.25
    assert clock.origin is not None and clock.origin + 1 / FPS >= pushed
    a = await asyncio.wait_for(audio.recv(), 10)
    assert a.pts == 1920


async def test_audio_stays_continuous_across_skipped_frames() -> None:
    clock = SessionClock()
    clock.base_index = 0
    audio = EngineAudioTrack(clock)
    audio.push(0, tone_frame(0.5))
    audio.push(2, tone_frame(0.5))  # the engine skipped frame 1 (a live interrupt)
    frames = [await asyncio.wait_for(audio.recv(), 10) for _ in range(6)]
    audio.push(3, tone_frame(0.5))
    audio.clear()  # the transport's own interrupt: frame 3 is dropped too
    audio.push(4, tone_frame(0.5))
    frames += [await asyncio.wait_for(audio.recv(), 10) for _ in range(4)]
    assert [f.pts for f in frames] == [960 * k for k in range(10)]
    levels = [int(np.abs(f.to_ndarray()).max()) for f in frames]
    assert levels == [16383, 16383, 0, 0, 16383, 16383, 0, 0, 16383, 16383]


async def test_stopped_tracks_stop_waiting() -> None:
    clock = SessionClock()
    track = EngineVideoTrack(clock)
    waiting = asyncio.ensure_future(track.recv())
    await asyncio.sleep(0.05)
    track.stop()
    with pytest.raises(MediaStreamError):
        await asyncio.wait_for(waiting, 10)
