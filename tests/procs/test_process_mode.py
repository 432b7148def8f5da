"""``engine.process_mode = "process"``: real worker processes (spawned) render and encode; the
server process relays bytes, supervises its workers and leaves nothing behind."""

from __future__ import annotations

import asyncio
import io
import os
import signal
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.server_harness import Client, RunningServer, decode_mp4, mint, run_server, tone_wav
from tests.test_e2e_webrtc import negotiate

ASTRONAUT = Path(__file__).resolve().parents[2] / "inference" / "assets" / "astronaut.png"
CLIP = {"mode": "clip", "transport": "mse", "audio": {"format": "wav"}}
PROCESS_MODE = {"MTS_ENGINE__PROCESS_MODE": "process", "MTS_ENGINE__WORKERS": "2", "MTS_LIMITS__START_BURST": "100"}


def children(pid: int) -> list[int]:
    """Child processes, whichever of its threads started them."""
    return [int(p) for task in Path(f"/proc/{pid}/task").iterdir() for p in (task / "children").read_text().split()]


def worker_pids(server: RunningServer) -> list[int]:
    """The server's spawned worker processes, oldest (worker-0) first."""
    pids = [p for p in children(server.process.pid) if b"spawn_main" in Path(f"/proc/{p}/cmdline").read_bytes()]
    return sorted(pids)


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/status").read_text().find("State:\tZ") < 0
    except FileNotFoundError:
        return False


def shm_entries() -> set[str]:
    return set(os.listdir("/dev/shm"))


def metric(server: RunningServer, prefix: str) -> float:
    lines = [ln for ln in server.get("/metrics").text.splitlines() if ln.startswith(prefix)]
    return sum(float(ln.split()[-1]) for ln in lines)


def wait_for(condition, what: str, server: RunningServer, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}:\n{server.log()[-3000:]}")
        time.sleep(0.1)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    with run_server(tmp_path_factory.mktemp("procs"), MTS_ENGINE__SLOTS="4", **PROCESS_MODE) as running:
        wait_for(lambda: len(worker_pids(running)) == 2, "two worker processes", running)
        yield running


def mirrored_astronaut() -> np.ndarray:
    image = np.asarray(Image.open(ASTRONAUT).convert("RGB"))[:, ::-1]
    return np.ascontiguousarray(image)


def upload_mirrored(server: RunningServer) -> np.ndarray:
    image = mirrored_astronaut()
    png = io.BytesIO()
    Image.fromarray(image).save(png, format="PNG")
    admin = {"Authorization": f"Bearer {mint('root', 'vip', roles=['admin'])}", "Content-Type": "image/png"}
    response = httpx.post(server.url + "/v1/avatars?id=mirror&name=Mirror", content=png.getvalue(),
                          headers=admin, timeout=60)
    assert response.status_code == 202, response.text
    ready = lambda: {a["id"]: a for a in server.get("/v1/avatars").json()}.get("mirror", {}).get("ready")  # noqa: E731
    wait_for(ready, "the mirrored avatar is prepared (by a worker)", server)
    return image


async def run_clip(server: RunningServer, sub: str, avatar: str, seconds: float) -> Client:
    client = await Client.connect(server)
    await client.hello(mint(sub, "normal"))
    await client.send("start", avatar=avatar, **CLIP)
    await client.ws.send(tone_wav(seconds))
    await client.send("audio_end")
    await client.expect("done", "error", timeout=120)
    return client


def distance(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


async def test_two_workers_serve_four_sessions_each_with_its_own_face(server: RunningServer) -> None:
    mirrored = await asyncio.to_thread(upload_mirrored, server)
    original = np.asarray(Image.open(ASTRONAUT).convert("RGB"))
    avatars = ["astronaut", "mirror", "astronaut", "mirror"]
    clients = await asyncio.gather(*(run_clip(server, f"mix-{i}", a, 2.0) for i, a in enumerate(avatars)))
    faces = {"astronaut": original, "mirror": mirrored}
    for avatar, client in zip(avatars, clients, strict=True):
        done = client.of_type("done")
        assert done and done[0]["frames"] == 50, client.of_type("error")
        frames, _, audio_s = decode_mp4(client.media_bytes)
        assert abs(len(frames) - 50) <= 1 and abs(audio_s - 2.0) < 0.07
        other = "mirror" if avatar == "astronaut" else "astronaut"
        # the rest of the face (all but the mouth) is the avatar's own picture
        assert distance(frames[0], faces[avatar]) * 3 < distance(frames[0], faces[other])
        await client.close()
    assert metric(server, 'mts_worker_batch_size_count{worker="worker-0"}') > 0
    assert metric(server, 'mts_worker_batch_size_count{worker="worker-1"}') > 0


async def start_long_clip(server: RunningServer, sub: str) -> Client:
    client = await Client.connect(server)
    await client.hello(mint(sub, "normal"))
    await client.send("start", avatar="astronaut", **CLIP)
    await client.ws.send(tone_wav(20.0))
    await client.send("audio_end")
    await client.expect("stream", timeout=60)
    return client


async def test_a_killed_worker_fails_only_its_sessions_and_comes_back(server: RunningServer) -> None:
    first, second = await start_long_clip(server, "kill-a"), await start_long_clip(server, "kill-b")
    before = worker_pids(server)
    os.kill(before[0], signal.SIGKILL)
    ends = await asyncio.gather(first.expect("done", "error", timeout=120), second.expect("done", "error", timeout=120))
    kinds = sorted(e["type"] for e in ends)
    assert kinds == ["done", "error"], ends
    assert [e["code"] for e in ends if e["type"] == "error"] == ["internal"]
    for client in (first, second):
        await client.close()
    wait_for(lambda: metric(server, "mts_worker_restarts_total") >= 1, "the worker restarts", server)
    wait_for(lambda: metric(server, "mts_worker_up") == 2, "both workers up", server)
    after = worker_pids(server)
    assert len(after) == 2 and before[0] not in after and before[1] in after
    # out of capacity while down (half of engine.slots = 4), back in once it runs again
    changes = [line.rsplit("admitting ", 1)[1] for line in server.log().splitlines() if "capacity changed" in line]
    assert changes[-2:] == ["2 sessions at once", "4 sessions at once"], changes
    wait_for(lambda: server.get("/v1/queue").json()["slots"]["busy"] == 0, "the slots come back", server)
    clients = await asyncio.gather(*(run_clip(server, f"again-{i}", "astronaut", 1.0) for i in range(2)))
    for client in clients:
        assert client.of_type("done") and client.of_type("done")[0]["frames"] == 25, client.of_type("error")
        await client.close()


async def test_a_vanished_webrtc_client_frees_its_shared_memory(server: RunningServer) -> None:
    before = shm_entries()
    client = await Client.connect(server)
    await client.hello(mint("vanish", "normal"))
    await client.send("start", avatar="astronaut", mode="live", transport="webrtc", audio={"format": "pcm_s16le"})
    await client.expect("granted")
    pc, video, _, tasks = await negotiate(client)
    for _ in range(100):
        if len(video) >= 10:
            break
        await asyncio.sleep(0.1)
    assert len(video) >= 10, "live idle frames come through the shared ring"
    assert len(shm_entries() - before) == 1, "one ring for the stream"
    await client.ws.close()  # the client vanishes
    await pc.close()
    for task in tasks:
        task.cancel()
    wait_for(lambda: server.get("/v1/queue").json()["slots"]["busy"] == 0, "the slot comes back", server)
    wait_for(lambda: not (shm_entries() - before), "the ring is unlinked", server)


async def test_sigterm_ends_every_worker_and_leaves_no_shared_memory(tmp_path: Path) -> None:
    before = shm_entries()
    with run_server(tmp_path, MTS_ENGINE__SLOTS="2", **PROCESS_MODE) as running:
        await asyncio.to_thread(wait_for, lambda: len(worker_pids(running)) == 2, "two worker processes", running)
        family = children(running.process.pid)
        client = await Client.connect(running)
        await client.hello(mint("term", "normal"))
        await client.send("start", avatar="astronaut", mode="live", transport="webrtc",
                          audio={"format": "pcm_s16le"})
        await client.expect("granted")
        pc, video, _, tasks = await negotiate(client)
        for _ in range(100):
            if len(video) >= 5:
                break
            await asyncio.sleep(0.1)
        assert len(video) >= 5 and len(shm_entries() - before) == 1, "mid-stream, its ring exists"
        running.process.send_signal(signal.SIGTERM)
        await asyncio.to_thread(running.process.wait, 30)  # (uvicorn re-raises SIGTERM once shut down)
        await pc.close()
        for task in tasks:
            task.cancel()
        await client.close()
        assert "Application shutdown complete" in running.log(), running.log()[-3000:]
    # (the resource tracker and the workers see the server's end of their pipes close, then exit)
    for _ in range(100):
        if not any(alive(p) for p in family):
            break
        await asyncio.sleep(0.1)
    assert not [p for p in family if alive(p)], "no orphan processes"
    assert shm_entries() == before, "no leaked shared-memory segments"
