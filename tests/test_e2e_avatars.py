"""Avatars made through the admin API from the real face video, then served; bad uploads refused."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import pytest

from tests.server_harness import Client, RunningServer, decode_mp4, mint, run_server

ASSETS = Path(__file__).resolve().parent.parent.parent / "shared" / "assets"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    with run_server(tmp_path_factory.mktemp("avatars")) as running:
        yield running


def admin(server: RunningServer) -> dict[str, str]:
    return {"Authorization": f"Bearer {mint('root', 'vip', roles=['admin'])}"}


def wait_ready(server: RunningServer, avatar_id: str, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        listed = {a["id"]: a for a in server.get("/v1/avatars").json()}
        if listed.get(avatar_id, {}).get("ready"):
            return listed[avatar_id]
        time.sleep(0.5)
    raise TimeoutError(f"{avatar_id} not ready:\n{server.log()[-2000:]}")


def test_creating_avatars_needs_an_admin_token(server: RunningServer) -> None:
    url = server.url + "/v1/avatars?id=x1&name=X"
    assert httpx.post(url, content=b"img").status_code == 403
    assert httpx.post(url, content=b"img", headers={"Authorization": "Bearer forged"}).status_code == 401
    user = {"Authorization": f"Bearer {mint('eve', 'vip')}"}
    assert httpx.post(url, content=b"img", headers=user).status_code == 403
    bad_id = server.url + "/v1/avatars?id=../../etc&name=X"
    assert httpx.post(bad_id, content=b"img", headers=admin(server)).status_code == 400


def test_an_upload_that_is_not_a_picture_never_becomes_ready(server: RunningServer) -> None:
    response = httpx.post(server.url + "/v1/avatars?id=broken&name=Broken", content=b"not an image",
                          headers={**admin(server), "Content-Type": "image/png"})
    assert response.status_code == 415 and response.json()["code"] == "bad_media"
    time.sleep(2.0)
    assert not any(a["id"] == "broken" and a["ready"] for a in server.get("/v1/avatars").json())
    assert server.get("/readyz").json()["ready"] is True


@pytest.mark.assets
async def test_avatar_from_the_real_face_video_speaks_the_real_speech(server: RunningServer) -> None:
    video = (ASSETS / "yongen.mp4").read_bytes()
    response = httpx.post(server.url + "/v1/avatars?id=yongen&name=Yongen", content=video,
                          headers={**admin(server), "Content-Type": "video/mp4"}, timeout=60)
    assert response.status_code == 202 and response.json()["ready"] is False
    info = await asyncio.to_thread(wait_ready, server, "yongen")
    assert info["frames"] > 100 and info["width"] > 0 and info["height"] > 0

    client = await Client.connect(server)
    await client.hello(mint("yongen-user", "normal"))
    await client.send("start", avatar="yongen", mode="clip", transport="mse", audio={"format": "wav"})
    speech = (ASSETS / "yongen.wav").read_bytes()
    for offset in range(0, len(speech), 256 * 1024):
        await client.ws.send(speech[offset : offset + 256 * 1024])
    await client.send("audio_end")
    done = await client.expect("done", "error", timeout=120)
    assert done["type"] == "done", done
    assert done["frames"] == 200
    frames, _, audio_s = decode_mp4(client.media_bytes)
    assert len(frames) == 200 and abs(audio_s - 8.0) < 0.07
    stream = client.of_type("stream")[0]
    assert (frames[0].shape[1], frames[0].shape[0]) == (stream["width"], stream["height"])
    await client.close()
