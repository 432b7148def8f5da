"""The avatar API on a real server: an upload is a job with progress, a failed one says why, an
avatar made through it streams, and deleting it removes its clips too."""

from __future__ import annotations

import asyncio
import io
import time
from pathlib import Path
from typing import Any

import av
import httpx
import numpy as np
import pytest
from PIL import Image

from tests.server_harness import Client, RunningServer, mint, run_server, tone_wav

ASTRONAUT = Path(__file__).resolve().parent.parent / "inference" / "assets" / "astronaut.png"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    with run_server(tmp_path_factory.mktemp("avatar-api")) as running:
        yield running


def admin() -> dict[str, str]:
    return {"Authorization": f"Bearer {mint('root', 'vip', roles=['admin'])}"}


def upload(server: RunningServer, avatar_id: str, body: bytes, content_type: str) -> httpx.Response:
    return httpx.post(
        f"{server.url}/v1/avatars?id={avatar_id}&name={avatar_id.title()}",
        content=body,
        headers={**admin(), "Content-Type": content_type},
        timeout=30,
    )


def wait_finished(server: RunningServer, avatar_id: str, timeout: float = 120) -> tuple[dict[str, Any], list[float]]:
    """The avatar once its job ended, and every progress value seen while it was preparing."""
    seen: list[float] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        view = server.get(f"/v1/avatars/{avatar_id}").json()
        if view["status"] != "preparing":
            return view, seen
        seen.append(view["progress"])
        time.sleep(0.05)
    raise TimeoutError(f"{avatar_id} still preparing:\n{server.log()[-2000:]}")


def png(image: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(image).save(out, format="PNG")
    return out.getvalue()


def test_an_upload_is_a_job_that_ends_ready_and_streams(server: RunningServer) -> None:
    response = upload(server, "astro2", ASTRONAUT.read_bytes(), "image/png")
    assert response.status_code == 202
    body = response.json()
    assert body["id"] == "astro2" and body["status"] == "preparing" and body["ready"] is False
    assert body["job"]["status"] == "preparing" and 0.0 <= body["job"]["progress"] <= 1.0
    view, seen = wait_finished(server, "astro2")
    assert view["status"] == "ready", view
    assert view["frames"] == 1 and view["width"] > 0 and view["job"]["progress"] == 1.0
    assert view["job"]["faces"] == {"frames": 1, "no_face": 0, "fallback": 0, "method": "haar"}
    assert seen == sorted(seen)  # progress never goes back
    assert any(a["id"] == "astro2" and a["ready"] for a in server.get("/v1/avatars").json())

    async def speak() -> Client:
        client = await Client.connect(server)
        await client.hello(mint("astro2-user", "normal"))
        await client.send("start", avatar="astro2", mode="clip", transport="mse", audio={"format": "wav"})
        await client.ws.send(tone_wav(1.0))
        await client.send("audio_end")
        done = await client.expect("done", "error", timeout=120)
        assert done["type"] == "done" and done["frames"] == 25, done
        await client.close()
        return client

    client = asyncio.run(speak())
    clip = client.of_type("done")[0]["clip"]
    assert server.get(clip).status_code == 200

    denied = httpx.delete(f"{server.url}/v1/avatars/astro2", headers={"Authorization": f"Bearer {mint('u', 'vip')}"})
    assert denied.status_code == 403
    deleted = httpx.delete(f"{server.url}/v1/avatars/astro2", headers=admin())
    assert deleted.status_code == 200 and deleted.json()["clips_removed"] == 1
    assert server.get("/v1/avatars/astro2").status_code == 404
    assert server.get(clip).status_code == 404
    assert not any(a["id"] == "astro2" for a in server.get("/v1/avatars").json())
    assert httpx.delete(f"{server.url}/v1/avatars/astro2", headers=admin()).status_code == 404


def mp4(frames: list[np.ndarray]) -> bytes:
    out = io.BytesIO()
    with av.open(out, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = "yuv420p"
        for image in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode(None))
    return out.getvalue()


def test_the_job_says_how_many_frames_had_no_face(server: RunningServer) -> None:
    """A video whose frames 5..8 are blank: the avatar is prepared, and its job counts them."""
    base = np.asarray(Image.open(ASTRONAUT).convert("RGB"))
    frames = [np.full_like(base, 90) if 5 <= i <= 8 else np.roll(base, 10 * i, axis=1) for i in range(24)]
    assert upload(server, "gaps", mp4(frames), "video/mp4").status_code == 202
    view, _ = wait_finished(server, "gaps")
    assert view["status"] == "ready", view
    faces = view["job"]["faces"]
    assert (faces["frames"], faces["no_face"], faces["method"]) == (24, 4, "haar")


@pytest.mark.parametrize(
    ("avatar_id", "body", "content_type", "reason"),
    [
        ("text-file", b"these are notes, not a picture\n" * 20, "image/png", "not a video or image"),
        ("no-face", png(np.tile(np.linspace(0, 255, 320, dtype=np.uint8)[None, :, None], (240, 1, 3))),
         "image/png", "no face found in any frame"),
    ],
)
def test_a_failed_preparation_says_why(
    server: RunningServer, avatar_id: str, body: bytes, content_type: str, reason: str
) -> None:
    response = upload(server, avatar_id, body, content_type)
    if response.status_code != 202:  # refused at the door by the upload checks: also a clear reason
        assert response.status_code in (400, 413, 415, 422) and response.json()["message"], response.text
        return
    view, _ = wait_finished(server, avatar_id)
    assert view["status"] == "failed" and reason in view["reason"], view
    assert not any(a["id"] == avatar_id and a["ready"] for a in server.get("/v1/avatars").json())
    assert "Traceback" not in server.log()
    assert server.get("/readyz").json()["ready"] is True


def test_an_unknown_avatar_is_404_and_a_bad_id_400(server: RunningServer) -> None:
    assert server.get("/v1/avatars/nobody").status_code == 404
    assert server.get("/v1/avatars/Bad.Id").status_code == 400
