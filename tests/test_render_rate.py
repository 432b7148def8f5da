"""The worker's render rate: recorded by the worker thread while the server reads it."""

from __future__ import annotations

import threading

import pytest

from inference.worker import RenderRate


def test_reading_the_rate_while_the_worker_records_loses_no_batch() -> None:
    rate = RenderRate(keep=10_000)
    batches = 5_000
    stop = threading.Event()
    readings: list[float] = []

    def server() -> None:
        while not stop.is_set():
            readings.append(rate.per_second(window_s=100.0, now=10.0))

    reader = threading.Thread(target=server)
    reader.start()
    try:
        for i in range(batches):
            rate.record(8, at=i * 0.001)  # 8 frames a millisecond
    finally:
        stop.set()
        reader.join()
    assert readings
    assert rate.per_second(window_s=100.0, now=10.0) == pytest.approx(8_000.0)


def test_the_rate_covers_only_the_window() -> None:
    rate = RenderRate()
    for t in (0.0, 1.0, 2.0):
        rate.record(100, at=t)  # an old burst
    for t in (20.0, 20.5, 21.0):
        rate.record(10, at=t)
    assert rate.per_second(window_s=5.0, now=22.0) == pytest.approx(20 / 1.0)
    assert rate.per_second(window_s=5.0, now=40.0) == 0.0
