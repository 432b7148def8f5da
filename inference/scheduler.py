"""The frame scheduler: which frames a worker renders next, decided from snapshots of its streams.

``FrameScheduler.schedule(streams, now)`` is pure and synchronous: no threads, no clock, no model.
It reads one ``StreamSnapshot`` per stream and returns a ``SchedulePlan``; the ``FrameWorker``
applies the plan. Frame ``i`` of a stream is due at ``started_at + i / FPS``.

The rules, in the order the worker applies them:

* a clip whose audio has ended and whose every frame has been rendered finishes;
* a live stream with nothing to say gets one rest (idle) frame when its next frame falls due,
  without the model. Mid-utterance (audio received, its look-ahead not yet) that frame may be
  ``mid_utterance_grace_s`` late first, so jitter in the incoming audio does not shut the mouth;
* speech frames go earliest deadline first across all streams, frame by frame, up to
  ``max_batch``. A stream gets no more than the room left in its output buffer (a stalled consumer
  stalls only its own stream), and a live stream no more than its lead horizon: frames due within
  ``live_lead_s`` from now;
* when nothing is rendered, the worker may sleep until the next live stream's frame could become
  due (an idle frame or its horizon opening). Inputs and consumers wake it earlier.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from inference.engine import FPS
from inference.stream import StreamMode, StreamSnapshot

MID_UTTERANCE_GRACE_S = 0.08
UNTIMED_SLEEP_S = 0.5
MIN_SLEEP_S = 0.001


@dataclass(frozen=True)
class SchedulePlan:
    """One round's decisions; streams are named by their position in the ``schedule`` input.

    ``render`` maps a stream to the number of speech frames to render for it in this round's one
    batch, in the order of each stream's first pick (earliest deadline first)."""

    finish: tuple[int, ...] = ()
    idle: tuple[int, ...] = ()
    render: Mapping[int, int] = field(default_factory=dict)
    sleep_s: float = 0.0


class FrameScheduler:
    """Earliest-deadline-first batching of speech frames, with idle frames for live streams."""

    def __init__(self, max_batch: int, *, mid_utterance_grace_s: float = MID_UTTERANCE_GRACE_S) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        self.max_batch = max_batch
        self.mid_utterance_grace_s = mid_utterance_grace_s

    def schedule(self, streams: Sequence[StreamSnapshot], now: float) -> SchedulePlan:
        finish = tuple(i for i, s in enumerate(streams) if self.clip_complete(s))
        idle = tuple(i for i, s in enumerate(streams) if self.idle_due(s, now))
        ready = {i: n for i, s in enumerate(streams) if (n := self.speech_ready(s, now)) > 0}
        render = self._earliest_deadline_first(streams, ready)
        if render:
            return SchedulePlan(finish, idle, render, 0.0)
        return SchedulePlan(finish, idle, render, self._sleep(streams, set(idle), now))

    # ----- the rules, one stream at a time -----

    @staticmethod
    def deadline(stream: StreamSnapshot, index: int) -> float:
        return stream.started_at + index / FPS

    @staticmethod
    def clip_complete(stream: StreamSnapshot) -> bool:
        return (
            stream.running
            and stream.mode is StreamMode.CLIP
            and stream.ended
            and stream.in_flight == 0
            and stream.ready == 0
        )

    def idle_due(self, stream: StreamSnapshot, now: float) -> bool:
        return (
            stream.running
            and stream.mode is StreamMode.LIVE
            and stream.in_flight == 0
            and stream.ready == 0
            and stream.room > 0
            and now >= self._idle_time(stream, stream.next_index)
        )

    @staticmethod
    def speech_ready(stream: StreamSnapshot, now: float) -> int:
        """Speech frames that may be rendered now for this stream."""
        if not stream.running:
            return 0
        count = min(stream.ready, stream.room)
        if stream.mode is StreamMode.LIVE:
            horizon = int((now + stream.live_lead_s - stream.started_at) * FPS) + 1
            count = min(count, horizon - stream.next_index - stream.in_flight)
        return max(0, count)

    def _idle_time(self, stream: StreamSnapshot, index: int) -> float:
        """When a rest frame at ``index`` is due: on time, or with the grace mid-utterance."""
        grace = self.mid_utterance_grace_s if stream.pending > 0 else 0.0
        return self.deadline(stream, index) + grace

    # ----- across streams -----

    def _earliest_deadline_first(self, streams: Sequence[StreamSnapshot], ready: Mapping[int, int]) -> dict[int, int]:
        """Frame by frame, the stream whose next unplanned frame is due first (ties: lower position)."""
        heap = [(self.deadline(streams[i], streams[i].next_index + streams[i].in_flight), i) for i in ready]
        heapq.heapify(heap)
        plan: dict[int, int] = {}
        for _ in range(self.max_batch):
            if not heap:
                break
            due, i = heapq.heappop(heap)
            plan[i] = plan.get(i, 0) + 1
            if plan[i] < ready[i]:
                heapq.heappush(heap, (due + 1.0 / FPS, i))
        return plan

    def _sleep(self, streams: Sequence[StreamSnapshot], idled: set[int], now: float) -> float:
        """Seconds until a live stream's next frame could be scheduled without any new input."""
        wakes: list[float] = []
        for i, s in enumerate(streams):
            after_idle = 1 if i in idled else 0
            if not s.running or s.mode is not StreamMode.LIVE or s.room - after_idle <= 0:
                continue
            index = s.next_index + s.in_flight + after_idle
            if s.ready > 0:
                wakes.append(self.deadline(s, index) - s.live_lead_s)
            elif s.in_flight == 0:
                wakes.append(self._idle_time(s, index))
        if not wakes:
            return UNTIMED_SLEEP_S
        return max(MIN_SLEEP_S, min(wakes) - now)
