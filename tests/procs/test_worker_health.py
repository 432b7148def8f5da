"""Which workers count in the capacity (``inference.worker_health.judge``), from hand-built
reports: down, stalled, slow against the others, or serving."""

from __future__ import annotations

from inference.worker import WorkerStats
from inference.worker_health import SLOW_SHARE, STALL_S, judge


def stats(speed: float, *, busy_s: float = 0.0, fps: float = 10.0) -> WorkerStats:
    return WorkerStats(frames_per_second=fps, render_speed=speed, streams=1, queue_depth=0, busy_s=busy_s)


def test_a_worker_far_slower_than_the_others_is_out_and_comes_back_once_fast() -> None:
    fast = stats(400.0)
    slow = stats(400.0 * SLOW_SHARE * 0.9)
    reasons = judge([True] * 3, [fast, slow, stats(380.0)], [0.0] * 3)
    assert reasons[0] is None and reasons[2] is None
    assert reasons[1] is not None and reasons[1].startswith("slow")
    assert judge([True] * 3, [fast, stats(400.0 * SLOW_SHARE * 1.1), fast], [0.0] * 3) == [None] * 3


def test_an_idle_worker_is_not_slow_and_a_lone_worker_has_nothing_to_compare_with() -> None:
    assert judge([True, True], [stats(400.0), stats(0.0, fps=0.0)], [0.0, 0.0]) == [None, None]
    assert judge([True], [stats(1.0)], [0.0]) == [None]


def test_down_and_stalled_workers_are_out() -> None:
    reasons = judge(
        [False, True, True, True],
        [stats(400.0), stats(400.0, busy_s=STALL_S + 1), stats(400.0), stats(400.0)],
        [0.0, 0.0, STALL_S + 0.5, 0.2],
    )
    assert reasons[0] == "down"
    assert reasons[1] is not None and "one render has run" in reasons[1]
    assert reasons[2] is not None and "no report" in reasons[2]
    assert reasons[3] is None


def test_a_down_workers_old_speed_is_not_the_reference() -> None:
    reasons = judge([False, True], [stats(4000.0), stats(100.0)], [0.0, 0.0])
    assert reasons == ["down", None]
