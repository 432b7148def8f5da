"""The frame scheduler alone: hand-built stream snapshots in, exact plans out. No threads, no model.

Frame ``i`` of a stream started at ``s`` is due at ``s + i / 25``.
"""

from __future__ import annotations

import dataclasses

import pytest

from inference.scheduler import UNTIMED_SLEEP_S, FrameScheduler, SchedulePlan
from inference.stream import StreamMode, StreamSnapshot

CLIP, LIVE = StreamMode.CLIP, StreamMode.LIVE


def rounded(plan: SchedulePlan) -> SchedulePlan:
    """The plan with its sleep rounded to the nanosecond, to compare with decimal literals."""
    return dataclasses.replace(plan, sleep_s=round(plan.sleep_s, 9))


def snap(
    mode: StreamMode = CLIP,
    *,
    ready: int = 0,
    pending: int | None = None,
    room: int = 50,
    next_index: int = 0,
    started_at: float = 0.0,
    ended: bool = False,
    running: bool = True,
    in_flight: int = 0,
) -> StreamSnapshot:
    return StreamSnapshot(
        mode=mode,
        running=running,
        ended=ended,
        ready=ready,
        pending=ready if pending is None else pending,
        room=room,
        next_index=next_index,
        in_flight=in_flight,
        started_at=started_at,
        live_lead_s=0.2,
    )


def test_speech_frames_go_earliest_deadline_first_across_streams() -> None:
    late = snap(ready=4, next_index=10)  # due 0.40, 0.44, ...
    early = snap(ready=4, started_at=0.1)  # due 0.10, 0.14, 0.18, 0.22
    middle = snap(ready=4, next_index=5)  # due 0.20, 0.24, ...
    plan = FrameScheduler(max_batch=6).schedule([late, early, middle], now=1.0)
    assert plan == SchedulePlan(render={1: 4, 2: 2}, sleep_s=0.0)
    assert list(plan.render) == [1, 2]  # the batch starts with the most urgent stream


def test_a_batch_never_exceeds_max_batch() -> None:
    scheduler = FrameScheduler(max_batch=8)
    assert rounded(scheduler.schedule([snap(ready=20)], now=0.0)) == SchedulePlan(render={0: 8})
    three = [snap(ready=20), snap(ready=20, started_at=0.001), snap(ready=20, started_at=0.002)]
    assert scheduler.schedule(three, now=0.0).render == {0: 3, 1: 3, 2: 2}
    assert FrameScheduler(max_batch=1).schedule(three, now=0.0).render == {0: 1}
    with pytest.raises(ValueError, match="max_batch"):
        FrameScheduler(max_batch=0)


def test_streams_of_different_avatars_share_one_batch() -> None:
    """The plan is per stream, never per avatar: two sessions on two avatars, started together,
    fill one batch frame by frame in turn (a renderer batches across avatars)."""
    astronaut, robot = snap(ready=5), snap(ready=3)
    plan = FrameScheduler(max_batch=8).schedule([astronaut, robot], now=0.5)
    assert plan == SchedulePlan(render={0: 5, 1: 3})
    assert sum(plan.render.values()) == 8


def test_a_stalled_consumer_gets_nothing_while_the_others_proceed() -> None:
    stalled = snap(ready=30, room=0)  # the most urgent, but its buffer is full
    nearly = snap(ready=30, room=2, started_at=0.01)
    other = snap(ready=5, started_at=0.3)
    plan = FrameScheduler(max_batch=8).schedule([stalled, nearly, other], now=1.0)
    assert plan == SchedulePlan(render={1: 2, 2: 5})
    # frames in flight count against the room too
    assert FrameScheduler(max_batch=8).schedule([snap(ready=30, room=0, in_flight=3)], now=1.0).render == {}


def test_a_stalled_live_stream_gets_no_idle_frame_and_sets_no_timer() -> None:
    stalled = snap(LIVE, room=0, next_index=5)  # due at 0.2, nothing to say, no room
    assert rounded(FrameScheduler(max_batch=8).schedule([stalled], now=1.0)) == SchedulePlan(sleep_s=UNTIMED_SLEEP_S)


def test_a_live_stream_with_nothing_ready_gets_an_idle_frame_when_due() -> None:
    scheduler = FrameScheduler(max_batch=8)
    quiet = snap(LIVE, next_index=5)  # due at 0.20
    assert rounded(scheduler.schedule([quiet], now=0.19)) == SchedulePlan(sleep_s=0.01)
    # due: one idle frame now, then sleep until the next one is due at 0.24
    assert rounded(scheduler.schedule([quiet], now=0.21)) == SchedulePlan(idle=(0,), sleep_s=0.03)
    # a clip stream never gets idle frames
    assert rounded(scheduler.schedule([snap(CLIP, next_index=5)], now=1.0)) == SchedulePlan(sleep_s=UNTIMED_SLEEP_S)


def test_mid_utterance_an_idle_frame_waits_for_the_grace() -> None:
    """Audio received but its look-ahead not yet: the frame may be up to 80 ms late first."""
    scheduler = FrameScheduler(max_batch=8, mid_utterance_grace_s=0.08)
    waiting = snap(LIVE, pending=2, next_index=5)  # due at 0.20, rest frame at 0.28
    assert rounded(scheduler.schedule([waiting], now=0.25)) == SchedulePlan(sleep_s=0.03)
    assert rounded(scheduler.schedule([waiting], now=0.29)) == SchedulePlan(idle=(0,), sleep_s=0.03)
    assert scheduler.schedule([snap(LIVE, next_index=5)], now=0.25).idle == (0,)  # no audio: no grace


def test_live_speech_is_limited_to_the_lead_horizon() -> None:
    scheduler = FrameScheduler(max_batch=32)
    # at 0.30 the horizon is 0.50 ahead: frames up to index 12 (due 0.48)
    talking = snap(LIVE, ready=20, next_index=10)
    assert rounded(scheduler.schedule([talking], now=0.3)) == SchedulePlan(render={0: 3})
    # all rendered up to the horizon: sleep until frame 13 (due 0.52) is within the lead, at 0.32
    ahead = snap(LIVE, ready=17, next_index=13)
    assert rounded(scheduler.schedule([ahead], now=0.3)) == SchedulePlan(sleep_s=0.02)
    # speech ready but not yet within the horizon is not an idle frame either
    assert scheduler.schedule([ahead], now=0.3).idle == ()
    # a clip is not bound to real time
    assert scheduler.schedule([snap(CLIP, ready=20, next_index=10)], now=0.3).render == {0: 20}


def test_idle_and_speech_in_one_round() -> None:
    quiet, talking = snap(LIVE, next_index=10), snap(LIVE, ready=4, next_index=10)
    plan = FrameScheduler(max_batch=8).schedule([quiet, talking], now=0.41)
    assert plan == SchedulePlan(idle=(0,), render={1: 4})


def test_a_clip_finishes_when_its_audio_ended_and_every_frame_is_rendered() -> None:
    scheduler = FrameScheduler(max_batch=8)
    done = snap(ended=True, next_index=75)
    assert rounded(scheduler.schedule([done], now=3.0)) == SchedulePlan(finish=(0,), sleep_s=UNTIMED_SLEEP_S)
    assert rounded(scheduler.schedule([snap(ended=True, ready=3)], now=3.0)) == SchedulePlan(render={0: 3})
    assert scheduler.schedule([snap(ended=True, in_flight=2)], now=3.0).finish == ()
    assert scheduler.schedule([snap(ended=False)], now=3.0).finish == ()
    # a live utterance that ended does not end the stream; a cancelled clip is not "finished"
    assert scheduler.schedule([snap(LIVE, ended=True, next_index=75)], now=1.0).finish == ()
    assert scheduler.schedule([snap(ended=True, running=False)], now=3.0).finish == ()


def test_a_stream_that_is_not_running_gets_nothing() -> None:
    gone = snap(LIVE, ready=10, running=False)
    assert rounded(FrameScheduler(max_batch=8).schedule([gone], now=5.0)) == SchedulePlan(sleep_s=UNTIMED_SLEEP_S)


def test_sleep_until_the_earliest_live_event() -> None:
    scheduler = FrameScheduler(max_batch=8)
    streams = [
        snap(LIVE, next_index=30),  # idle frame due at 1.20
        snap(LIVE, ready=5, next_index=30, started_at=-0.15),  # horizon opens at 1.05 - 0.2 = 0.85
        snap(LIVE, pending=1, next_index=21),  # due 0.84 + 0.08 grace = 0.92
        snap(CLIP, ended=False),  # waits for input: no timer
    ]
    assert rounded(scheduler.schedule(streams, now=0.8)) == SchedulePlan(sleep_s=0.05)
    # rendering: no sleep at all
    assert rounded(scheduler.schedule(streams, now=0.86)) == SchedulePlan(render={1: 1})
    # nothing timed: the worker waits for a wake-up, with a long safety timeout
    assert rounded(scheduler.schedule([snap(CLIP)], now=0.0)) == SchedulePlan(sleep_s=UNTIMED_SLEEP_S)
