"""Process mode with MuseTalk on tiny seeded weights: each spawned worker loads the models from
the folder itself; slots come from the workers' own measurements."""

from __future__ import annotations

import pytest

from inference.musetalk.tiny import write_tiny_models
from tests.procs.test_process_mode import worker_pids
from tests.server_harness import Client, decode_mp4, mint, run_server, tone_wav


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("musetalk-procs")
    models = root / "models"
    write_tiny_models(models)
    with run_server(
        root,
        MTS_ENGINE__KIND="musetalk",
        MTS_ENGINE__MODELS_DIR=str(models),
        MTS_ENGINE__DEVICE="cpu",
        MTS_ENGINE__DTYPE="fp32",
        MTS_ENGINE__PROCESS_MODE="process",
        MTS_ENGINE__WORKERS="2",
        MTS_ENGINE__SLOTS="0",
    ) as running:
        yield running


async def test_two_musetalk_worker_processes_serve_clips_with_measured_slots(server) -> None:
    assert server.get("/readyz").json() == {"ready": True, "engine": "musetalk"}
    assert len(worker_pids(server)) == 2
    assert "worker-0: " in server.log() and "worker-1: " in server.log()  # each measured its rate
    assert server.get("/v1/queue").json()["slots"]["total"] >= 1
    clients = []
    for sub, seconds in (("ana", 1.2), ("ben", 0.8)):
        client = await Client.connect(server)
        await client.hello(mint(sub, "normal"))
        await client.send("start", avatar="astronaut", mode="clip", transport="mse", audio={"format": "wav"})
        await client.ws.send(tone_wav(seconds))
        await client.send("audio_end")
        clients.append((client, seconds))
    for client, seconds in clients:
        done = await client.expect("done", "error", timeout=300)
        assert done["type"] == "done", done
        assert done["frames"] == int(seconds * 25)
        frames, _, audio_s = decode_mp4(client.media_bytes)
        assert len(frames) == done["frames"] and abs(audio_s - seconds) < 0.07
        assert frames[0].shape[:2] == (512, 512)
        await client.close()
