"""The worker process: one renderer, its ``FrameWorker``, and the encoding of its streams.

``worker_main`` runs in a spawned interpreter. Its main thread reads the server's messages; the
frame worker thread renders; each stream has a pump thread that takes its frames and encodes
them, to fMP4 (MSE: only segment bytes go back) or to H.264 packets (WebRTC: the packets and
each frame's audio bytes go back), or writes them raw into the stream's shared ring. A pump
sends no more than the server has room for (``FreeSlots``): a slow client stalls only its own
stream. The process ends when the server says so, or when its pipe closes (the server is
gone)."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path

import numpy as np

from inference.avatars.cache import DeviceAvatarCache
from inference.avatars.layout import FaceBox
from inference.engine import FPS, PreparedAvatar, Renderer
from inference.pool import EngineConfig, build_renderer
from inference.procs.frame_ring import FrameRing, FreeSlots
from inference.procs.messages import (
    AvatarLoaded,
    Call,
    CallProgress,
    Credit,
    FramesReady,
    OpenStream,
    Packets,
    Preload,
    Ready,
    Release,
    Reply,
    Segments,
    Shutdown,
    Stats,
    StreamEnded,
    StreamInput,
)
from inference.serving_engine import EncodeOptions, PacketOptions
from inference.stream import EngineStream, StreamMode, StreamState
from inference.worker import FrameWorker

log = logging.getLogger(__name__)

SEGMENT_BATCHES_IN_FLIGHT = 2
PACKETS_IN_FLIGHT = 16
"""H.264 frames of one WebRTC stream sent and not yet taken by the server's sender."""
PACKET_BATCH_FRAMES = 4
STATS_EVERY_S = 1.0
LOW_PRIORITY_NICE = 10
"""Avatar preparations never compete with rendering and encoding for the CPU."""
WORKER_NICE = 5
"""Rendering and encoding are throughput; the server's event loop is latency: where the cores
are all busy, it gets them first."""


class _Uplink:
    """The pipe to the server, shared by every thread of the worker."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self._lock = threading.Lock()

    def send(self, message: object) -> None:
        with self._lock:
            self.conn.send(message)


class _Stopped(Exception):
    """The pump was stopped while it waited for the server."""


class _Pump(threading.Thread):
    """Takes one stream's frames and sends them on; ends by sending ``StreamEnded``."""

    def __init__(
        self, open_msg: OpenStream, stream: EngineStream, uplink: _Uplink, forget: Callable[[int], None]
    ) -> None:
        super().__init__(name=f"pump-{open_msg.stream_id}", daemon=True)
        self.forget = forget
        self.open_msg = open_msg
        self.stream = stream
        self.uplink = uplink
        encode = open_msg.encode
        tokens = (
            open_msg.ring_slots if encode is None
            else PACKETS_IN_FLIGHT if isinstance(encode, PacketOptions)
            else SEGMENT_BATCHES_IN_FLIGHT
        )
        self.free = FreeSlots(tokens)
        self._keyframe = False
        self._keyframe_lock = threading.Lock()

    def request_keyframe(self) -> None:
        """H.264 packets: the next frame encoded is an IDR frame."""
        with self._keyframe_lock:
            self._keyframe = True

    def _take_keyframe_request(self) -> bool:
        with self._keyframe_lock:
            wanted, self._keyframe = self._keyframe, False
            return wanted

    def run(self) -> None:
        error: str | None = None
        try:
            encode = self.open_msg.encode
            if isinstance(encode, PacketOptions):
                self._encode_packets(encode)
            elif encode is not None:
                self._encode(encode)
            else:
                self._write_frames()
        except Exception as exc:  # an encoder or ring fault ends this stream only
            log.exception("stream %d failed in its pump", self.open_msg.stream_id)
            self.stream.fail(exc)
            error = repr(exc)
        state = self.stream.state
        if error is None and self.stream.error is not None:
            error = repr(self.stream.error)
        self.stream.cancel()
        self.forget(self.open_msg.stream_id)
        self.uplink.send(StreamEnded(self.open_msg.stream_id, state.value, error))

    def stop(self) -> None:
        self.free.close()
        self.stream.cancel()

    def _encode(self, options: EncodeOptions) -> None:
        """The same loop as the MSE sender's in thread mode; only segment bytes leave."""
        from stream_server.transports.encode_loop import encode_stream
        from stream_server.transports.fmp4 import FragmentedMp4Muxer

        info = self.stream.avatar.info
        muxer = FragmentedMp4Muxer(
            info.width, info.height, FPS, segment_seconds=options.segment_s, crf=options.crf,
            preset=options.preset, audio_bitrate=options.audio_bitrate, threads=1,
        )
        init_sent = False

        def emit(segments: list[bytes], frames: int) -> None:
            nonlocal init_sent
            if self.free.take() is None:  # wait until the server forwarded an earlier batch
                raise _Stopped
            message = Segments(self.open_msg.stream_id, segments, frames)
            if segments and not init_sent:
                init_sent = True
                assert muxer.init_segment is not None
                message = Segments(
                    self.open_msg.stream_id, segments, frames, muxer.init_segment, muxer.mime, muxer.width,
                    muxer.height,
                )
            self.uplink.send(message)

        try:
            encode_stream(self.stream, muxer, emit)
        except _Stopped:
            return
        finally:
            muxer.close()

    def _encode_packets(self, options: PacketOptions) -> None:
        """H.264 for WebRTC: only each frame's access unit and audio bytes leave."""
        from stream_server.transports.h264_packets import H264PacketEncoder

        info = self.stream.avatar.info
        encoder = H264PacketEncoder(
            info.width, info.height, FPS, bitrate=options.bitrate,
            keyframe_interval_frames=max(1, round(options.keyframe_interval_s * FPS)), preset=options.preset,
        )
        while frames := self.stream.wait_frames(PACKET_BATCH_FRAMES):
            encoded: list[tuple[int, bool, bool, bytes, bytes]] = []
            for frame in frames:
                if self.free.take() is None:
                    return
                video, keyframe = encoder.encode(frame.image, keyframe=self._take_keyframe_request())
                audio = np.ascontiguousarray(frame.audio, dtype=np.float32).tobytes()
                encoded.append((frame.index, frame.speech, keyframe, video, audio))
            self.uplink.send(Packets(self.open_msg.stream_id, encoded))

    def _write_frames(self) -> None:
        msg = self.open_msg
        assert msg.ring is not None
        info = self.stream.avatar.info
        ring = FrameRing.attach(msg.ring, msg.ring_slots, info.height, info.width)
        try:
            while frames := self.stream.wait_frames():
                written: list[tuple[int, int, bool]] = []
                for frame in frames:
                    slot = self.free.take()
                    if slot is None:
                        return
                    ring.write(slot, frame.image, frame.audio)
                    written.append((slot, frame.index, frame.speech))
                self.uplink.send(FramesReady(msg.stream_id, written))
        finally:
            ring.close()


class WorkerProcess:
    """The state of one worker process; ``serve`` runs its message loop on the main thread."""

    def __init__(self, conn: Connection, renderer: Renderer, config: EngineConfig, name: str) -> None:
        self.uplink = _Uplink(conn)
        self.conn = conn
        self.renderer = renderer
        self.worker = FrameWorker(renderer, max_batch=config.max_batch, name=name)
        self.avatars = DeviceAvatarCache(config.device_cache)
        """What this worker holds on its device, by avatar key. The server's copy of this
        worker's cache decides what goes (``Release``); this one only bounds it."""
        self._avatar_lock = threading.Lock()
        self.pumps: dict[int, _Pump] = {}
        self.pending: dict[int, list[StreamInput]] = {}
        self._lock = threading.Lock()
        self._stopped = threading.Event()

    def serve(self) -> None:
        self.worker.start()
        threading.Thread(target=self._report_stats, name="stats", daemon=True).start()
        self.uplink.send(
            Ready(os.getpid(), self.renderer.name, self.renderer.preparation_version, self.renderer.avatar_files)
        )
        try:
            while True:
                try:
                    message = self.conn.recv()
                except (EOFError, OSError):
                    log.warning("the server's pipe closed: this worker ends")
                    return
                if isinstance(message, Shutdown):
                    return
                self._handle(message)
        finally:
            self._stopped.set()
            with self._lock:
                pumps = list(self.pumps.values())
            for pump in pumps:
                pump.stop()
            self.worker.stop()

    def _handle(self, message: object) -> None:
        if isinstance(message, StreamInput):
            self._input(message)
        elif isinstance(message, Credit):
            with self._lock:
                pump = self.pumps.get(message.stream_id)
            if pump is not None:
                pump.free.give_back(max(0, message.slot))
        elif isinstance(message, OpenStream):
            with self._lock:
                self.pending[message.stream_id] = []
            threading.Thread(target=self._open, args=(message,), name="open", daemon=True).start()
        elif isinstance(message, Call):
            threading.Thread(target=self._call, args=(message,), name=f"call-{message.method}", daemon=True).start()
        elif isinstance(message, Release):
            self._release(message.avatar_keys)
        elif isinstance(message, Preload):
            threading.Thread(target=self._preload, args=(message,), name="preload", daemon=True).start()
        else:
            raise TypeError(f"a worker cannot handle {type(message).__name__}")

    # ----- streams -----

    def _input(self, message: StreamInput) -> None:
        with self._lock:
            waiting = self.pending.get(message.stream_id)
            if waiting is not None:  # the stream is still being opened: keep the order
                waiting.append(message)
                return
            pump = self.pumps.get(message.stream_id)
        if pump is not None:
            _apply(pump, message)
            if message.kind == "cancel":
                pump.stop()  # (it may wait for room the server will not make any more)

    def _open(self, message: OpenStream) -> None:
        try:
            avatar = self._avatar(message.avatar_key, message.avatar_dir)
            stream = self.worker.open_stream(
                avatar, StreamMode(message.mode), buffer_frames=message.buffer_frames, background=message.background
            )
            stream.started_at = message.started_at
        except Exception as exc:
            log.exception("stream %d could not be opened", message.stream_id)
            with self._lock:
                self.pending.pop(message.stream_id, None)
            self.uplink.send(StreamEnded(message.stream_id, StreamState.FAILED.value, repr(exc)))
            return
        pump = _Pump(message, stream, self.uplink, self._forget)
        with self._lock:
            for waiting in self.pending.pop(message.stream_id, []):
                _apply(pump, waiting)
            self.pumps[message.stream_id] = pump
        pump.start()

    def _forget(self, stream_id: int) -> None:
        with self._lock:
            self.pumps.pop(stream_id, None)

    def _avatar(self, key: str, directory: Path) -> PreparedAvatar:
        with self._avatar_lock:
            avatar = self.avatars.get(key)
            if avatar is None:
                avatar = self.renderer.load_avatar_dir(directory)
                if avatar is None:
                    problem = self.renderer.avatar_problem(directory) or "damaged"
                    raise ValueError(f"avatar {key} in {directory} cannot be served: {problem}")
                for evicted in self.avatars.put(key, avatar):
                    self.renderer.release_avatar(evicted)
            return avatar

    def _release(self, keys: tuple[str, ...]) -> None:
        with self._avatar_lock:
            for key in keys:
                avatar = self.avatars.discard(key)
                if avatar is not None:
                    self.renderer.release_avatar(avatar)

    def _preload(self, message: Preload) -> None:
        for key, directory in message.avatars:
            try:
                self._avatar(key, directory)
            except Exception:
                log.exception("avatar %s could not be loaded again after the restart", key)

    # ----- avatar operations and measurements -----

    def _call(self, message: Call) -> None:
        try:
            result = self._run_call(message)
        except Exception as exc:
            self.uplink.send(Reply(message.call_id, None, str(exc) or type(exc).__name__, type(exc).__name__))
            return
        self.uplink.send(Reply(message.call_id, result))

    def _run_call(self, message: Call) -> object:
        if message.method == "prepare_avatar_dir":
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), LOW_PRIORITY_NICE)  # (Linux: per thread)
            directory, avatar_id, name, source, face_box = message.args
            assert isinstance(directory, Path) and isinstance(source, Path)

            def progress(done: int, total: int) -> None:
                self.uplink.send(CallProgress(message.call_id, done, total))

            avatar = self.renderer.prepare_avatar_dir(
                directory, str(avatar_id), str(name), source, face_box=_face_box(face_box), progress=progress
            )
            return AvatarLoaded(avatar.info, None, avatar.face_report)
        if message.method == "load_avatar_dir":
            directory = message.args[0]
            assert isinstance(directory, Path)
            loaded = self.renderer.load_avatar_dir(directory)
            if loaded is None:
                problem = self.renderer.avatar_problem(directory) or "damaged (its files cannot be read)"
                return AvatarLoaded(None, problem)
            return AvatarLoaded(loaded.info, None, loaded.face_report)
        if message.method == "recorded_version":
            directory = message.args[0]
            assert isinstance(directory, Path)
            return self.renderer.recorded_version(directory)
        if message.method == "measure_capacity":
            key, directory = message.args
            assert isinstance(key, str) and isinstance(directory, Path)
            return self.worker.measure_capacity(self._avatar(key, directory))
        raise ValueError(f"no worker call {message.method!r}")

    def _report_stats(self) -> None:
        while not self._stopped.wait(STATS_EVERY_S):
            try:
                self.uplink.send(Stats(self.worker.stats(), self.worker.take_batch_sizes()))
            except (OSError, ValueError):
                return


def _face_box(value: object) -> FaceBox | None:
    if value is None:
        return None
    assert isinstance(value, tuple) and len(value) == 4
    x, y, w, h = (float(v) for v in value)
    return (x, y, w, h)


def _apply(pump: _Pump, message: StreamInput) -> None:
    stream = pump.stream
    if message.kind == "keyframe":
        pump.request_keyframe()
    elif message.kind == "audio":
        stream.feed(np.frombuffer(message.f16, dtype=np.float32), np.frombuffer(message.f48, dtype=np.float32))
    elif message.kind == "end":
        stream.end_audio()
    elif message.kind == "interrupt":
        stream.interrupt()
    elif message.kind == "cancel":
        stream.cancel()
    else:
        raise ValueError(f"unknown stream input {message.kind!r}")


def worker_main(conn: Connection, config: EngineConfig, kind: str, device: str, name: str) -> None:
    """The spawned process's entry point."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the server decides when workers end
    os.nice(WORKER_NICE)
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {name} %(levelname)s %(name)s: %(message)s")
    started = time.monotonic()
    renderer = build_renderer(config, kind, device)
    log.info("%s: the %s engine on %s, loaded in %.1f s", name, renderer.name, device, time.monotonic() - started)
    WorkerProcess(conn, renderer, config, name).serve()
