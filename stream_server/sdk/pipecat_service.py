"""``MuseTalkVideoService``: the avatar of a Pipecat bot, served by musetalk-stream.

Put it after the TTS service. It takes the bot's TTS audio (any sample rate) into a live session,
and pushes the avatar's ``OutputImageRawFrame`` (RGB, 25 fps) with the matching audio re-timed to
the frames, so sound and picture stay within one frame. It replaces the TTS audio downstream: the
transport plays what the avatar says, in step with its lips.

- ``InterruptionFrame`` / ``UserStartedSpeakingFrame``: ``interrupt``; speech not shown yet is
  dropped and the avatar is at rest at once (its last idle frame) until the bot speaks again.
- ``EndFrame`` / ``CancelFrame``: the session ends and the slot is given back.
- While queued: the ``on_queue_position(service, position, eta_s)`` event, and the still frame
  (``still_image``) is shown. ``on_granted(service, waited_s)`` when the slot is granted.
- Failures (refused, ``queue_timeout_s`` passed, the server gone) are an ``ErrorFrame`` upstream
  that marks the service unusable: the ``PipelineWorker``'s ``processor_unusable_policy`` decides
  whether the pipeline ends (``END`` / ``CANCEL``) or carries on without a face (``CONTINUE``).

Needs ``pip install "musetalk-stream[pipecat]"``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import numpy as np
from av.audio.frame import AudioFrame
from av.audio.resampler import AudioResampler
from loguru import logger
from pipecat.frames.frames import (
    CancelFrame,
    EndFrame,
    Frame,
    InterruptionFrame,
    OutputAudioRawFrame,
    OutputImageRawFrame,
    StartFrame,
    TTSAudioRawFrame,
    TTSStoppedFrame,
    UserStartedSpeakingFrame,
)
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor

from stream_server.sdk.av_sync import AvAligner, SyncedFrame
from stream_server.sdk.client import Connection, LiveSession, MuseTalkError, Transport, connect
from stream_server.sdk.media import AUDIO_RATE, AudioChunk, VideoFrame
from stream_server.sdk.messages import ErrorMessage, Granted, Queued, StreamStart

SERVER_AUDIO_RATE = 16_000
"""What the service sends the server: mono pcm_s16le at this rate."""
PTS_KEY = "musetalk_pts_s"
"""``frame.metadata`` key holding a pushed frame's time on the session clock."""
SPEAKING_KEY = "musetalk_speaking"
"""``frame.metadata`` key: True for frames whose audio is speech."""


class MuseTalkVideoService(FrameProcessor):
    def __init__(
        self,
        *,
        url: str,
        avatar: str,
        token: str | None = None,
        transport: Transport = "mse",
        queue_timeout_s: float | None = None,
        still_image: np.ndarray | None = None,
        jitter_s: float | None = None,
        **kwargs: Any,
    ) -> None:
        """``url``: the server (``http(s)://`` or ``ws(s)://``). ``still_image``: RGB shown while
        queued (default: mid-grey at the avatar's size until its first frame). ``jitter_s``: how far
        behind the session clock frames are played out, to absorb delivery bursts (default 0.6 s
        for MSE, whose segments are 0.5 s, and 0.15 s for WebRTC)."""
        super().__init__(**kwargs)
        self._url = url
        self._avatar = avatar
        self._token = token
        self._transport: Transport = transport
        self._queue_timeout_s = queue_timeout_s
        self._still = still_image
        self._jitter_s = jitter_s if jitter_s is not None else (0.6 if transport == "mse" else 0.15)
        self._connection: Connection | None = None
        self._live: LiveSession | None = None
        self._session_task: asyncio.Task[None] | None = None
        self._pacer_task: asyncio.Task[None] | None = None
        self._outgoing: asyncio.Queue[tuple[float, SyncedFrame]] = asyncio.Queue()
        self._aligner = AvAligner()
        self._resampler: AudioResampler | None = None
        self._resampler_key: tuple[int, int] | None = None
        self._early_speech: list[bytes] = []
        self._rest_image: np.ndarray | None = None
        self._resting = False
        self._interrupted_at: float | None = None
        self._last_pts = 0.0
        self.replaced_after_interrupt_s: float | None = None
        """After the last interruption: how far (session clock) the server's speech ran on before its
        frames turned idle; those frames were shown as the rest image instead."""
        self._size: tuple[int, int] = (512, 512)
        self._ending = False
        self._register_event_handler("on_queue_position")
        self._register_event_handler("on_granted")

    # ----- frames -----

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if isinstance(frame, StartFrame):
            await self.push_frame(frame, direction)
            self._ending = False
            self._session_task = self.create_task(self._run_session(), "musetalk-session")
            self._pacer_task = self.create_task(self._pace(), "musetalk-pacer")
        elif isinstance(frame, TTSAudioRawFrame):
            await self._send_speech(frame)
        elif isinstance(frame, TTSStoppedFrame):
            if self._live is not None and self._live.granted is not None:
                await self._quietly(self._live.end_utterance())
            await self.push_frame(frame, direction)
        elif isinstance(frame, (InterruptionFrame, UserStartedSpeakingFrame)):
            await self._interrupt()
            await self.push_frame(frame, direction)
        elif isinstance(frame, (EndFrame, CancelFrame)):
            await self._stop()
            await self.push_frame(frame, direction)
        else:
            await self.push_frame(frame, direction)

    async def _send_speech(self, frame: TTSAudioRawFrame) -> None:
        if self._ending:
            return
        self._resting = False
        key = (frame.sample_rate, frame.num_channels)
        if self._resampler is None or self._resampler_key != key:
            self._resampler = AudioResampler(format="s16", layout="mono", rate=SERVER_AUDIO_RATE)
            self._resampler_key = key
        samples = np.frombuffer(frame.audio, dtype=np.int16).reshape(1, -1)
        source = AudioFrame.from_ndarray(samples, format="s16", layout="mono" if frame.num_channels == 1 else "stereo")
        source.sample_rate = frame.sample_rate
        pcm = b"".join(out.to_ndarray().tobytes() for out in self._resampler.resample(source))
        if self._live is None:
            self._early_speech.append(pcm)  # the session is still being opened
        else:
            await self._quietly(self._live.send_audio(pcm))

    async def _interrupt(self) -> None:
        self._resting = True
        self._interrupted_at = self._last_pts
        self.replaced_after_interrupt_s = None
        live = self._live
        if live is not None and live.granted is not None and not live.finished:
            await self._quietly(live.interrupt())
        if self._rest_image is not None:
            await self._push_image(self._rest_image, None, speaking=False)

    async def _quietly(self, call: Any) -> None:
        """A control message to the server; a lost connection is reported by the session task."""
        with contextlib.suppress(MuseTalkError):
            await call

    # ----- the session -----

    async def _run_session(self) -> None:
        try:
            self._connection = await connect(self._url, token=self._token)
            self._live = await self._connection.live(avatar=self._avatar, transport=self._transport)
            early, self._early_speech = self._early_speech, []
            for pcm in early:
                await self._live.send_audio(pcm)
            await self._push_still()
            watchdog = self.create_task(self._queue_watchdog(self._live), "musetalk-queue-timeout")
            try:
                await self._consume(self._live)
            finally:
                await self.cancel_task(watchdog)
        except MuseTalkError as exc:
            await self._fail(f"MuseTalk avatar: {exc}")
            return
        if self._ending:
            return
        error = self._live.error if self._live is not None else None
        reason = str(error) if error is not None else "the server ended the live session"
        await self._fail(f"MuseTalk avatar: {reason}")

    async def _consume(self, live: LiveSession) -> None:
        async for event in live:
            if isinstance(event, (VideoFrame, AudioChunk)):
                arrived = time.monotonic()
                for synced in self._aligner.add(event):
                    self._outgoing.put_nowait((arrived, synced))
            elif isinstance(event, Queued):
                await self._call_event_handler("on_queue_position", event.position, event.eta_s)
                await self._push_still()
            elif isinstance(event, Granted):
                await self._call_event_handler("on_granted", event.waited_s)
            elif isinstance(event, StreamStart):
                self._size = (event.width, event.height)
                self._aligner.reset()
            elif isinstance(event, ErrorMessage):
                logger.warning(f"{self}: server error {event.code}: {event.message}")

    async def _queue_watchdog(self, live: LiveSession) -> None:
        if self._queue_timeout_s is None:
            return
        try:
            await asyncio.wait_for(live.wait_granted(), self._queue_timeout_s)
        except TimeoutError:
            where = f" at position {live.position}" if live.position is not None else ""
            await self._fail(
                f"MuseTalk avatar: still waiting for a slot{where} after queue_timeout_s={self._queue_timeout_s:g} s"
            )
            await live.cancel()
        except MuseTalkError:
            return  # the session task reports it

    async def _fail(self, message: str) -> None:
        if self._ending:
            return
        self._ending = True
        await self.push_error(message, force_treat_as_permanent=True)
        await self._close_session()

    # ----- output, paced on the session clock -----

    async def _pace(self) -> None:
        """Push frames when they are due: session time ``pts`` plays at ``anchor + pts``."""
        anchor: float | None = None
        while True:
            arrived, frame = await self._outgoing.get()
            earliest = arrived - frame.pts_s + self._jitter_s
            if anchor is None or anchor + frame.pts_s < time.monotonic() - 2 * self._jitter_s:
                anchor = earliest  # the first frame, or far behind: start again from this one
            else:
                # Frames that come sooner than the first did (its delivery was slow): catch up.
                anchor = min(anchor, earliest)
            delay = anchor + frame.pts_s - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            if not frame.speaking:
                self._rest_image = frame.image
                await self._push_image(frame.image, frame, speaking=False)
            elif self._resting:
                if self._interrupted_at is not None:
                    self.replaced_after_interrupt_s = frame.pts_s - self._interrupted_at
                if self._rest_image is not None:
                    await self._push_image(self._rest_image, frame, speaking=False)
            else:
                await self._push_image(frame.image, frame, speaking=True)

    async def _push_image(self, image: np.ndarray, frame: SyncedFrame | None, *, speaking: bool) -> None:
        out = OutputImageRawFrame(image=image.tobytes(), size=(image.shape[1], image.shape[0]), format="RGB")
        out.sync_with_audio = True
        out.metadata[SPEAKING_KEY] = speaking
        if frame is not None:
            out.metadata[PTS_KEY] = frame.pts_s
            self._last_pts = frame.pts_s
        await self.push_frame(out)
        if speaking and frame is not None:
            audio = OutputAudioRawFrame(audio=frame.audio.tobytes(), sample_rate=AUDIO_RATE, num_channels=1)
            audio.metadata[PTS_KEY] = frame.pts_s
            await self.push_frame(audio)

    async def _push_still(self) -> None:
        if self._rest_image is not None:
            return
        still = self._still
        if still is None:
            width, height = self._size
            still = np.full((height, width, 3), 128, dtype=np.uint8)
        await self._push_image(still, None, speaking=False)

    # ----- ending -----

    async def _stop(self) -> None:
        self._ending = True
        await self._close_session()
        for task in (self._pacer_task, self._session_task):
            if task is not None and task is not asyncio.current_task():
                await self.cancel_task(task)
        self._pacer_task = self._session_task = None

    async def _close_session(self) -> None:
        live, self._live = self._live, None
        connection, self._connection = self._connection, None
        if live is not None:
            await self._quietly(live.cancel())
        if connection is not None:
            await connection.close()

    async def cleanup(self) -> None:
        await super().cleanup()  # type: ignore[no-untyped-call]
        await self._stop()
