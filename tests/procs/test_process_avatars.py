"""Avatars in process mode: a worker process prepares them (its progress and face report reach
the API), and each worker holds at most ``avatars.device_cache`` of them, evicting under a
budget of one without ever showing one session another avatar's face."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from tests.server_harness import RunningServer, mint, run_server
from tests.test_avatar_caches import alternate_avatars, metric, upload_sources

VIDEO = Path(__file__).resolve().parents[3] / "shared" / "assets" / "yongen.mp4"
ADMIN = {"Authorization": f"Bearer {mint('root', 'vip', roles=['admin'])}"}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    with run_server(
        tmp_path_factory.mktemp("avatars-procs"),
        MTS_AVATARS__DEVICE_CACHE="1",
        MTS_ENGINE__PROCESS_MODE="process",
        MTS_ENGINE__WORKERS="2",
        MTS_LIMITS__START_BURST="50",
    ) as running:
        upload_sources(running)
        yield running


async def test_alternating_avatars_on_two_worker_processes_never_swap_faces(server: RunningServer) -> None:
    await alternate_avatars(server, "proc-cache")
    # one session at a time: each goes to the least loaded worker (the first, on a tie), which
    # holds one avatar: every turn after the first evicts the other one there, and the worker
    # frees it and loads the new one from disk
    assert metric(server, "mts_avatar_cache_evictions_total", "device") >= 4
    assert metric(server, "mts_avatar_cache_misses_total", "device") >= 5


@pytest.mark.skipif(not VIDEO.is_file(), reason=f"{VIDEO} (the shared assets) is absent")
def test_a_worker_prepares_a_video_avatar_and_reports_its_progress(server: RunningServer) -> None:
    response = httpx.post(f"{server.url}/v1/avatars?id=yongen&name=Yongen", content=VIDEO.read_bytes(),
                          headers={**ADMIN, "Content-Type": "video/mp4"}, timeout=60)
    assert response.status_code == 202, response.text
    seen: list[float] = []
    deadline = time.monotonic() + 300
    while (view := server.get("/v1/avatars/yongen").json())["status"] == "preparing":
        seen.append(view["progress"])
        assert time.monotonic() < deadline, server.log()[-3000:]
        time.sleep(0.1)
    assert view["status"] == "ready", view
    assert any(0 < p < 1 for p in seen), f"progress from the worker while it prepared: {seen}"
    assert seen == sorted(seen)
    faces = view["job"]["faces"]
    assert faces["frames"] == view["frames"] > 0, view
