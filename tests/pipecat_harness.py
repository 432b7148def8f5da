"""A real Pipecat pipeline around one processor, with recorders on both sides, for tests and bench."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import numpy as np
from pipecat.frames.frames import (
    ErrorFrame,
    Frame,
    OutputAudioRawFrame,
    OutputImageRawFrame,
    TTSAudioRawFrame,
)
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineParams, PipelineWorker, ProcessorUnusablePolicy
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.workers.runner import WorkerRunner

TTS_RATE = 24_000


class Recorder(FrameProcessor):
    """Passes every frame on; keeps ``(monotonic time, frame)`` for those going ``direction``."""

    def __init__(self, direction: FrameDirection) -> None:
        super().__init__(enable_direct_mode=True)
        self.direction = direction
        self.frames: list[tuple[float, Frame]] = []
        self.changed = asyncio.Event()

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if direction == self.direction:
            self.frames.append((time.monotonic(), frame))
            self.changed.set()
        await self.push_frame(frame, direction)

    def of(self, kind: type[Frame]) -> list[Frame]:
        return [f for _, f in self.frames if isinstance(f, kind)]

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 30.0) -> None:
        async with asyncio.timeout(timeout):
            while not predicate():
                self.changed.clear()
                await self.changed.wait()


@dataclass
class PipelineRun:
    worker: PipelineWorker
    up: Recorder
    down: Recorder
    finished: bool = False
    errors: list[ErrorFrame] = field(default_factory=list)

    @property
    def images(self) -> list[OutputImageRawFrame]:
        return [f for f in self.down.of(OutputImageRawFrame) if isinstance(f, OutputImageRawFrame)]

    @property
    def audio(self) -> list[OutputAudioRawFrame]:
        return [f for f in self.down.of(OutputAudioRawFrame) if isinstance(f, OutputAudioRawFrame)]

    async def send(self, frame: Frame) -> None:
        await self.worker.queue_frame(frame)


async def run_pipeline(
    processor: FrameProcessor,
    drive: Callable[[PipelineRun], Awaitable[None]],
    *,
    policy: ProcessorUnusablePolicy = ProcessorUnusablePolicy.END,
    timeout: float = 90.0,
) -> PipelineRun:
    """Run ``[up recorder, processor, down recorder]`` until ``drive`` ends it (or the policy does)."""
    up, down = Recorder(FrameDirection.UPSTREAM), Recorder(FrameDirection.DOWNSTREAM)
    worker = PipelineWorker(
        Pipeline([up, processor, down]),
        params=PipelineParams(),
        cancel_on_idle_timeout=False,
        processor_unusable_policy=policy,
    )
    run = PipelineRun(worker, up, down)
    started = asyncio.Event()

    @worker.event_handler("on_pipeline_started")
    async def _started(_worker: PipelineWorker, _frame: Frame) -> None:
        started.set()

    runner = WorkerRunner(handle_sigint=False)
    await runner.add_workers(worker)

    async def driver() -> None:
        await started.wait()
        await drive(run)

    async with asyncio.timeout(timeout):
        pipeline = asyncio.ensure_future(runner.run())
        steering = asyncio.ensure_future(driver())
        await asyncio.wait({pipeline, steering}, return_when=asyncio.FIRST_COMPLETED)
        if steering.done() and steering.exception() is not None:
            pipeline.cancel()
            raise steering.exception()  # type: ignore[misc]
        await pipeline
        steering.cancel()
    run.finished = True
    run.errors = [f for f in up.of(ErrorFrame) if isinstance(f, ErrorFrame)]
    return run


def syllables(seconds: float, rate: int = TTS_RATE) -> np.ndarray:
    """Speech-like int16: a 140 Hz buzz in syllables of 160 ms with 120 ms pauses."""
    t = np.arange(int(rate * seconds)) / rate
    voice = 0.5 * np.sign(np.sin(2 * np.pi * 140 * t))
    on = (t % 0.28) < 0.16
    return (np.where(on, voice, 0.0) * 32767).astype(np.int16)


async def speak(run: PipelineRun, pcm: np.ndarray, *, rate: int = TTS_RATE, frame_s: float = 0.02,
                pace: float = 1.0) -> None:
    """``pcm`` as TTS audio frames of ``frame_s``, each sent ``frame_s / pace`` after the last."""
    step = int(rate * frame_s)
    start = time.monotonic()
    for i, offset in enumerate(range(0, len(pcm), step)):
        await run.send(TTSAudioRawFrame(audio=pcm[offset : offset + step].tobytes(), sample_rate=rate, num_channels=1))
        delay = start + (i + 1) * frame_s / pace - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
