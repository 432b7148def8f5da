"""The real server with the MuseTalk engine on tiny seeded weights in the real layout."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from inference.musetalk.tiny import write_tiny_models
from tests.server_harness import Client, decode_mp4, mint, run_server, tone_wav


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("musetalk-server")
    models = root / "models"
    write_tiny_models(models)
    with run_server(
        root,
        MTS_ENGINE__KIND="auto",
        MTS_ENGINE__MODELS_DIR=str(models),
        MTS_ENGINE__DEVICE="cpu",
        MTS_ENGINE__DTYPE="fp32",
        MTS_ENGINE__SLOTS="2",
    ) as running:
        yield running


async def test_auto_picks_musetalk_when_the_models_folder_is_complete(server) -> None:
    assert server.get("/readyz").json() == {"ready": True, "engine": "musetalk"}
    avatars = server.get("/v1/avatars").json()
    assert [a["id"] for a in avatars] == ["astronaut"] and avatars[0]["ready"]


async def test_two_clips_at_once_stream_lip_synced_video(server, tmp_path: Path) -> None:
    clients = []
    for sub, seconds in (("ana", 1.2), ("ben", 0.8)):
        client = await Client.connect(server)
        welcome = await client.hello(mint(sub, "normal"))
        assert welcome["engine"] == "musetalk"
        await client.send("start", avatar="astronaut", mode="clip", transport="mse", audio={"format": "wav"})
        await client.ws.send(tone_wav(seconds))
        await client.send("audio_end")
        clients.append((client, seconds))
    for client, seconds in clients:
        done = await client.expect("done", "error", timeout=300)
        assert done["type"] == "done", done
        assert done["frames"] == int(seconds * 25)
        frames, _, audio_s = decode_mp4(client.media_bytes)
        assert len(frames) == done["frames"]
        assert abs(audio_s - seconds) < 0.07
        # The face is generated (random tiny weights): the picture differs from the source around
        # the mouth but the frame keeps the avatar's size.
        assert frames[0].shape[:2] == (512, 512)
        assert np.std(frames[0]) > 5
        await client.close()


async def test_slots_come_from_the_measured_render_rate(tmp_path: Path) -> None:
    models = tmp_path / "models"
    write_tiny_models(models)
    with run_server(
        tmp_path,
        MTS_ENGINE__KIND="musetalk",
        MTS_ENGINE__MODELS_DIR=str(models),
        MTS_ENGINE__DEVICE="cpu",
        MTS_ENGINE__DTYPE="fp32",
        MTS_ENGINE__SLOTS="0",
        MTS_ENGINE__MAX_SLOTS="1000",
    ) as server:
        slots = server.get("/v1/queue").json()["slots"]["total"]
        measured = float(
            next(
                line.split("measured ")[1].split(" ")[0]
                for line in server.log().splitlines()
                if "frames/s: admitting" in line
            )
        )
        assert slots == max(1, int(measured * 0.8 / 25))
