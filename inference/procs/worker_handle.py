"""The server's handle on one worker process: spawning it, talking to it, and supervising it.

A reader thread receives everything the worker sends. When the process dies its pipe closes at
once (the server holds no copy of the child's end), so the reader notices within milliseconds:
the worker's streams fail with ``WorkerDied``, its calls fail, it leaves the pool's capacity, and
it is spawned again with the avatars it had loaded."""

from __future__ import annotations

import concurrent.futures
import contextlib
import itertools
import logging
import multiprocessing
import queue
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path

from inference.avatars.jobs import Progress
from inference.pool import EngineConfig
from inference.procs.messages import (
    Call,
    CallProgress,
    OpenStream,
    Preload,
    Ready,
    Reply,
    Shutdown,
    Stats,
    StreamEnded,
)
from inference.procs.remote_stream import RemoteStream, WorkerDied
from inference.procs.worker_process import worker_main
from inference.worker import WorkerStats

log = logging.getLogger(__name__)

READY_TIMEOUT_S = 600.0
STOP_TIMEOUT_S = 5.0
_call_ids = itertools.count(1)
_END_OF_OUTPUT = object()
NO_STATS = WorkerStats(0.0, 0.0, 0, 0, 0.0)


class WorkerHandle:
    """``preload()`` names the avatars (key, folder) the worker should hold again when it is
    started after a death; ``on_change`` hears when it goes down and when it is up again."""

    def __init__(
        self,
        index: int,
        config: EngineConfig,
        kind: str,
        device: str,
        on_change: Callable[[], None],
        preload: Callable[[], tuple[tuple[str, Path], ...]],
    ) -> None:
        self.index = index
        self.name = f"worker-{index}"
        self.config = config
        self.kind = kind
        self.device = device
        self.on_change = on_change
        self.preload = preload
        self.restarts = 0
        self.up = False
        self.ready: Ready | None = None
        self.stats = NO_STATS
        self.last_heard = time.monotonic()
        """When the worker last sent anything (it reports about once a second)."""
        self._batch_sizes: list[int] = []
        self._lock = threading.Lock()
        self._outgoing: queue.SimpleQueue[object] | None = None
        self._streams: dict[int, RemoteStream] = {}
        self._calls: dict[int, tuple[concurrent.futures.Future[object], Progress | None]] = {}
        self._stopping = False
        self._restarting = False
        self._process: BaseProcess | None = None
        self._conn: Connection | None = None

    # ----- lifecycle -----

    def start(self) -> None:
        """Spawn the process and wait until its renderer is loaded."""
        context = multiprocessing.get_context("spawn")
        parent, child = context.Pipe()
        process = context.Process(
            target=worker_main, args=(child, self.config, self.kind, self.device, self.name),
            name=f"mts-{self.name}", daemon=True,
        )
        process.start()
        child.close()  # only the child holds its end: its death closes the pipe
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not parent.poll(0.2):
            if not process.is_alive() or time.monotonic() > deadline:
                process.kill()
                process.join()
                parent.close()
                raise RuntimeError(f"{self.name} did not start (exit code {process.exitcode})")
        ready = parent.recv()
        if not isinstance(ready, Ready):
            raise RuntimeError(f"{self.name} said {type(ready).__name__} before it was ready")
        with self._lock:
            if self._stopping:  # (stopped while it was starting again)
                parent.send(Shutdown())
                process.join(STOP_TIMEOUT_S)
                parent.close()
                return
            self._process, self._conn, self.ready = process, parent, ready
            self._outgoing = queue.SimpleQueue()
            self.up = True
            self.last_heard = time.monotonic()
            if self._restarting:
                held = self.preload()
                if held:
                    self._send_locked(Preload(held))
        threading.Thread(target=self._read, args=(parent, process), name=f"{self.name}-reader", daemon=True).start()
        threading.Thread(
            target=self._write, args=(parent, self._outgoing), name=f"{self.name}-writer", daemon=True
        ).start()
        log.info("%s started: pid %d, the %s engine on %s", self.name, ready.pid, ready.renderer, self.device)

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            process, conn = self._process, self._conn
        if process is None or conn is None:
            return
        with contextlib.suppress(WorkerDied):  # (then it is ending already)
            self.send(Shutdown())
        process.join(STOP_TIMEOUT_S)
        if process.is_alive():
            log.warning("%s did not stop within %.0f s: killing it", self.name, STOP_TIMEOUT_S)
            process.kill()
            process.join()
        conn.close()

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    # ----- talking to it -----

    def send(self, message: object) -> None:
        with self._lock:
            self._send_locked(message)

    def _send_locked(self, message: object) -> None:
        """Queue a message for the writer thread: a caller on the event loop never waits for the
        worker to read a large one (a clip's audio) from the pipe."""
        if not self.up or self._outgoing is None:
            raise WorkerDied(f"{self.name} is down")
        self._outgoing.put(message)

    def _write(self, conn: Connection, outgoing: queue.SimpleQueue[object]) -> None:
        while (message := outgoing.get()) is not _END_OF_OUTPUT:
            try:
                conn.send(message)
            except (OSError, ValueError):  # the worker is gone: the reader sees it and fails its streams
                return

    def call(
        self, method: str, args: tuple[object, ...], progress: Progress | None = None
    ) -> concurrent.futures.Future[object]:
        future: concurrent.futures.Future[object] = concurrent.futures.Future()
        call_id = next(_call_ids)
        with self._lock:
            self._calls[call_id] = (future, progress)
        try:
            self.send(Call(call_id, method, args))
        except WorkerDied as exc:
            with self._lock:
                self._calls.pop(call_id, None)
            future.set_exception(exc)
        return future

    def add_stream(self, stream: RemoteStream, open_message: OpenStream) -> None:
        with self._lock:
            self._streams[stream.stream_id] = stream
            try:
                self._send_locked(open_message)
            except WorkerDied:
                del self._streams[stream.stream_id]
                raise

    @property
    def active_streams(self) -> int:
        with self._lock:
            return len(self._streams)

    def drain_batch_sizes(self) -> list[int]:
        with self._lock:
            sizes, self._batch_sizes = self._batch_sizes, []
            return sizes

    # ----- the reader thread -----

    def _read(self, conn: Connection, process: BaseProcess) -> None:
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):
                break
            self._dispatch(message)
        self._down(process)

    def _dispatch(self, message: object) -> None:
        self.last_heard = time.monotonic()
        if isinstance(message, Reply):
            with self._lock:
                future, _ = self._calls.pop(message.call_id, (None, None))
            if future is not None:
                if message.error is None:
                    future.set_result(message.result)
                else:
                    future.set_exception(_call_error(message))
            return
        if isinstance(message, CallProgress):
            with self._lock:
                _, progress = self._calls.get(message.call_id, (None, None))
            if progress is not None:
                progress(message.done, message.total)
            return
        if isinstance(message, Stats):
            with self._lock:
                self.stats = message.stats
                if len(self._batch_sizes) < 65536:
                    self._batch_sizes.extend(message.batch_sizes)
            return
        stream_id = getattr(message, "stream_id", None)
        with self._lock:
            stream = self._streams.get(stream_id) if isinstance(stream_id, int) else None
            if stream is not None and isinstance(message, StreamEnded):
                del self._streams[stream.stream_id]
        if stream is None:
            log.debug("%s: %s for a stream that is gone", self.name, type(message).__name__)
            return
        stream.on_message(message)

    def _down(self, process: BaseProcess) -> None:
        """The pipe closed: the worker has ended (stopped, or died)."""
        process.join(STOP_TIMEOUT_S)
        with self._lock:
            self.up = False
            if self._outgoing is not None:
                self._outgoing.put(_END_OF_OUTPUT)
                self._outgoing = None
            stopping = self._stopping
            streams, self._streams = list(self._streams.values()), {}
            calls, self._calls = [future for future, _ in self._calls.values()], {}
            self.stats = NO_STATS
        if stopping:
            for stream in streams:
                stream.fail(WorkerDied(f"{self.name} stopped"))
            for future in calls:
                future.set_exception(WorkerDied(f"{self.name} stopped"))
            return
        error = WorkerDied(f"{self.name} (pid {process.pid}) died with exit code {process.exitcode}")
        log.error("%s; failing its %d stream(s) and starting it again", error, len(streams))
        for stream in streams:
            stream.fail(error)
        for future in calls:
            future.set_exception(error)
        self.on_change()
        self._restart()

    def _restart(self) -> None:
        delay = 0.5
        self._restarting = True
        while True:
            with self._lock:
                if self._stopping:
                    return
            try:
                self.start()
            except Exception:
                log.exception("%s could not be started again; retrying in %.1f s", self.name, delay)
                time.sleep(delay)
                delay = min(delay * 2, 30.0)
                continue
            self._restarting = False
            if self.up:
                self.restarts += 1
                self.on_change()
            return


def _call_error(reply: Reply) -> Exception:
    """The worker's exception, as the type callers catch (``ValueError`` for a bad source)."""
    kinds: dict[str, type[Exception]] = {"ValueError": ValueError, "FileNotFoundError": FileNotFoundError}
    return kinds.get(reply.error_type, RuntimeError)(reply.error)
