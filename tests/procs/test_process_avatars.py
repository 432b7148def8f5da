"""Avatars in process mode: a worker process prepares them (its progress and face report reach
the API), and each worker holds at most ``avatars.device_cache`` of them, evicting under a
budget of one without ever showing one session another avatar's face."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.server_harness import Client, RunningServer, decode_mp4, mint, run_server, tone_wav
from tests.test_avatar_caches import metric, png, sources, upper_face

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
        for avatar_id, image in sources().items():
            response = httpx.post(f"{running.url}/v1/avatars?id={avatar_id}", content=png(image),
                                  headers={**ADMIN, "Content-Type": "image/png"}, timeout=30)
            assert response.status_code == 202, response.text
        deadline = time.monotonic() + 120
        while not all(running.get(f"/v1/avatars/{a}").json()["status"] == "ready" for a in sources()):
            assert time.monotonic() < deadline, running.log()[-2000:]
            time.sleep(0.2)
        yield running


async def test_alternating_avatars_on_two_worker_processes_never_swap_faces(server: RunningServer) -> None:
    faces = sources()
    for turn in range(6):
        avatar_id = "plain" if turn % 2 == 0 else "mirror"
        client = await Client.connect(server)
        await client.hello(mint(f"proc-cache-{turn}", "normal"))
        await client.send("start", avatar=avatar_id, mode="clip", transport="mse", audio={"format": "wav"})
        await client.ws.send(tone_wav(0.4 + 0.04 * turn))
        await client.send("audio_end")
        done = await client.expect("done", "error", timeout=120)
        assert done["type"] == "done", done
        frames, _, _ = decode_mp4(client.media_bytes)
        await client.close()
        assert frames
        size = (frames[0].shape[1], frames[0].shape[0])
        own = upper_face(faces[avatar_id], size)
        other = upper_face(faces["mirror" if avatar_id == "plain" else "plain"], size)
        for frame in frames:
            top = frame[: own.shape[0]].astype(np.float32)
            own_error = float(np.abs(top - own).mean())
            assert own_error < 12.0, (turn, avatar_id, own_error)
            assert own_error * 4 < float(np.abs(top - other).mean())
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
