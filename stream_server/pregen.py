"""Background pre-generation: the template library rendered for the hottest avatars while the
node is idle, so their users' template requests are answered from the clip store at once.

It runs only while no ticket waits and no slot is busy, holds no admission slot, and yields at
once to real users, twice over: its engine stream is a ``background`` one, which the frame
scheduler leaves out of any round where a user's stream has a frame to render (so the two never
share a batch), and a joining user calls ``yield_to_users`` before its ticket exists, which
cancels it. Nothing it had rendered of that phrase is kept; it is tried again at the next idle
time.
"""

from __future__ import annotations

import asyncio
import logging
import time

from inference.serving_engine import ServedStream, ServingEngine
from inference.stream import StreamMode, StreamState
from stream_server.admission.admission import Admission
from stream_server.audio_input import AudioInput
from stream_server.clips import ClipStore
from stream_server.metrics import Metrics
from stream_server.outbox import Outbox
from stream_server.protocol import AudioSpec
from stream_server.session.owner import RequestOwner
from stream_server.session.serving import Serving
from stream_server.settings import Settings
from stream_server.templates import Template, TemplateLibrary
from stream_server.transports.mse import MseSender
from stream_server.upload_budget import UploadBudget

log = logging.getLogger(__name__)

IDLE_POLL_S = 0.5
"""How often an idle node looks for work (and how soon after the line empties it starts)."""


async def _discard(item: str | bytes) -> None:
    """The pre-generation's media goes only into the clip store."""


class BackgroundPregen:
    def __init__(
        self,
        settings: Settings,
        engine: ServingEngine,
        clips: ClipStore,
        templates: TemplateLibrary,
        admission: Admission[RequestOwner],
        serving: Serving,
        metrics: Metrics,
        upload_budget: UploadBudget,
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.clips = clips
        self.templates = templates
        self.admission = admission
        self.serving = serving
        self.metrics = metrics
        self.upload_budget = upload_budget
        self.top_k = settings.templates.pregen_top_k
        self._stream: ServedStream | None = None
        self._yielded = False
        self._joins = 0
        """Users who joined so far: a render decided before one joined does not start."""

    def yield_to_users(self) -> None:
        """A user is about to join: stop rendering now (called on the event loop)."""
        self._joins += 1
        if self._stream is not None and self._stream.state is StreamState.RUNNING:
            self._yielded = True
            self._stream.cancel()
            self.metrics.pregen_yields.inc()
            self.metrics.pregen_active.set(0)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(IDLE_POLL_S)
            if not await self._idle():
                continue
            work = await self._next()
            if work is not None:
                await self._render(*work)

    async def _idle(self) -> bool:
        view = await self.admission.view(time.monotonic())
        return not view.waiting and view.slots_busy == 0

    async def _next(self) -> tuple[str, Template, AudioInput, str] | None:
        """The first (hot avatar, template) whose clip is not in the store yet."""
        for avatar_id in self.engine.hot.hottest(self.top_k):
            for template_id in self.templates.ids():
                template = self.templates.get(template_id)
                assert template is not None
                audio = await self._audio(template)
                key = await self.serving.clip_key_for(avatar_id, audio.digest, audio.spec.model_dump())
                if not await asyncio.to_thread(self.clips.exists, key):
                    return avatar_id, template, audio, key
                audio.close()
        return None

    async def _audio(self, template: Template) -> AudioInput:
        limits = self.settings.limits
        audio = AudioInput(
            AudioSpec(format=template.format),  # type: ignore[arg-type]
            live=False,
            max_seconds=limits.max_audio_seconds,
            max_bytes=limits.max_audio_bytes,
            budget=self.upload_budget,
            spool_bytes=limits.audio_spool_bytes,
        )
        await audio.add(await asyncio.to_thread(template.read_audio))
        await audio.end()
        return audio

    async def _render(self, avatar_id: str, template: Template, audio: AudioInput, key: str) -> None:
        try:
            joins = self._joins
            avatar = await asyncio.to_thread(self.engine.avatars.get, avatar_id)
            decoded = await audio.grant()
        finally:
            audio.close()
        if avatar is None or not await self._idle() or self._joins != joins:
            return
        stream = self.serving.open_stream(avatar, StreamMode.CLIP, mse=True, background=True)
        self._stream, self._yielded = stream, False
        self.metrics.pregen_active.set(1)
        for pcm in decoded:
            if pcm is None:
                stream.end_audio()
            else:
                stream.feed(*pcm)
        sender = MseSender(
            stream,
            Outbox(_discard, coalesce_s=self.settings.queue.coalesce_s),
            self.settings.stream,
            open_clip=lambda: self.clips.writer(key, avatar_id),
        )
        try:
            result = await sender.run()
        finally:
            stream.cancel()
            self._stream = None
            self.metrics.pregen_active.set(0)
        if self._yielded:
            log.info("pre-generation of %s/%s yielded to a user", avatar_id, template.id)
        elif result.clip_key is not None:
            self.metrics.pregen_clips.inc()
            log.info("pre-generated %s/%s (%d frames)", avatar_id, template.id, result.frames)
        else:
            log.warning("pre-generation of %s/%s ended %s", avatar_id, template.id, result.state.value)
