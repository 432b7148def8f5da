"""Avatar caches under a tiny budget: every request is an eviction, and still each session gets
its own avatar's face (decoded with PyAV and compared with both sources); the metrics count it."""

from __future__ import annotations

import io
import time
from pathlib import Path

import cv2
import httpx
import numpy as np
import pytest
from PIL import Image

from tests.server_harness import Client, RunningServer, decode_mp4, mint, run_server, tone_wav

ASTRONAUT = Path(__file__).resolve().parent.parent / "inference" / "assets" / "astronaut.png"


def sources() -> dict[str, np.ndarray]:
    """Two avatars with faces that differ everywhere: the astronaut, and mirrored with red and
    blue swapped."""
    plain = np.asarray(Image.open(ASTRONAUT).convert("RGB"))
    return {"plain": plain, "mirror": np.ascontiguousarray(plain[:, ::-1, ::-1])}


def png(image: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(image).save(out, format="PNG")
    return out.getvalue()


def upload_sources(server: RunningServer) -> None:
    """Upload both avatars of ``sources`` and wait until they are prepared."""
    admin = {"Authorization": f"Bearer {mint('root', 'vip', roles=['admin'])}"}
    for avatar_id, image in sources().items():
        response = httpx.post(f"{server.url}/v1/avatars?id={avatar_id}", content=png(image),
                              headers={**admin, "Content-Type": "image/png"}, timeout=30)
        assert response.status_code == 202, response.text
    deadline = time.monotonic() + 120
    while not all(server.get(f"/v1/avatars/{a}").json()["status"] == "ready" for a in sources()):
        assert time.monotonic() < deadline, server.log()[-2000:]
        time.sleep(0.2)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    with run_server(
        tmp_path_factory.mktemp("caches"),
        MTS_AVATARS__DEVICE_CACHE="1",
        MTS_AVATARS__HOST_CACHE_BYTES="1",
        MTS_ENGINE__WORKERS="2",
        MTS_LIMITS__START_BURST="50",
    ) as running:
        upload_sources(running)
        yield running


def upper_face(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The top 40 % of the frame (above the mouth the engine animates), at ``size`` (w, h)."""
    resized = cv2.resize(image, size, interpolation=cv2.INTER_AREA).astype(np.float32)
    return resized[: int(size[1] * 0.4)]


def metric(server: RunningServer, name: str, level: str) -> float:
    for line in server.get("/metrics").text.splitlines():
        if line.startswith(f'{name}{{level="{level}"}}'):
            return float(line.split()[-1])
    raise AssertionError(f"{name} {level} not in /metrics")


async def alternate_avatars(server: RunningServer, sub: str, turns: int = 6) -> None:
    """``turns`` clips, one at a time, alternating the two avatars; each shows its own face."""
    faces = sources()
    for turn in range(turns):
        avatar_id = "plain" if turn % 2 == 0 else "mirror"
        client = await Client.connect(server)
        await client.hello(mint(f"{sub}-{turn}", "normal"))
        await client.send("start", avatar=avatar_id, mode="clip", transport="mse", audio={"format": "wav"})
        await client.ws.send(tone_wav(0.4 + 0.04 * turn))  # another clip each turn: no clip-cache hit
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
            assert own_error < 12.0, (turn, avatar_id, own_error)  # its own face, up to compression
            assert own_error * 4 < float(np.abs(top - other).mean())


async def test_alternating_avatars_under_a_budget_of_one_never_swap_faces(server: RunningServer) -> None:
    await alternate_avatars(server, "cache")
    assert metric(server, "mts_avatar_cache_evictions_total", "host") >= 4
    assert metric(server, "mts_avatar_cache_evictions_total", "device") >= 2
    assert metric(server, "mts_avatar_cache_misses_total", "host") >= 4
    assert metric(server, "mts_avatar_cache_hits_total", "disk") >= 4
