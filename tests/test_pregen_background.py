"""Background pre-generation on a real server: it renders the template library for a hot avatar
while the node is idle, stops for a user who joins before that user's ticket exists, and
finishes once the node is idle again; a template it rendered is then answered without queueing."""

from __future__ import annotations

import time

import pytest

from tests.server_harness import Client, RunningServer, mint, run_server, tone_wav

LIVE = {"avatar": "astronaut", "mode": "live", "transport": "mse", "audio": {"format": "pcm_s16le"}}


def metric(server: RunningServer, name: str) -> float:
    for line in server.get("/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not in /metrics")


def wait_metric(server: RunningServer, name: str, value: float, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while metric(server, name) < value:
        assert time.monotonic() < deadline, f"{name} < {value}:\n{server.log()[-3000:]}"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("pregen")
    (folder / "long.wav").write_bytes(tone_wav(12.0))
    (folder / "templates.toml").write_text('[long]\naudio = "long.wav"\ntext = "A long phrase."\n')
    with run_server(
        folder,
        MTS_TEMPLATES__FILE=str(folder / "templates.toml"),
        MTS_TEMPLATES__PREGEN_TOP_K="1",
        MTS_AVATARS__HOT_AFTER_USES="0",  # one use makes an avatar hot
        MTS_ENGINE__SLOTS="1",
        MTS_LIMITS__START_BURST="50",
    ) as running:
        yield running


async def clip(server: RunningServer, sub: str, seconds: float) -> Client:
    client = await Client.connect(server)
    await client.hello(mint(sub, "normal"))
    await client.send("start", avatar="astronaut", mode="clip", transport="mse", audio={"format": "wav"})
    await client.ws.send(tone_wav(seconds))
    await client.send("audio_end")
    done = await client.expect("done", "error", timeout=120)
    assert done["type"] == "done", done
    return client


async def test_pregen_yields_to_a_user_and_finishes_when_idle(server: RunningServer) -> None:
    warm = await clip(server, "pg-first", 0.4)  # astronaut is hot now
    await warm.close()
    wait_metric(server, "mts_pregen_active", 1)  # rendering the long phrase, nobody waiting

    user = await Client.connect(server)
    await user.hello(mint("pg-user", "normal"))
    await user.send("start", **LIVE)
    granted = await user.expect("granted", "error")
    assert granted["type"] == "granted", granted
    assert metric(server, "mts_pregen_yields_total") == 1  # stopped before the user's ticket joined
    assert metric(server, "mts_pregen_active") == 0
    assert metric(server, "mts_pregen_clips_total") == 0
    await user.close()

    wait_metric(server, "mts_pregen_clips_total", 1)  # idle again: rendered from the start
    holder = await Client.connect(server)
    await holder.hello(mint("pg-holder", "vip"))
    await holder.send("start", **LIVE)
    await holder.expect("granted")
    asker = await Client.connect(server)
    await asker.hello(mint("pg-asker", "normal"))
    await asker.send("start", avatar="astronaut", mode="clip", transport="mse", template="long")
    done = await asker.expect("done", "error", timeout=60)
    assert done["type"] == "done" and done["frames"] == 300, done
    assert asker.of_type("queued") == []
    for client in (holder, asker):
        await client.close()
    assert "Traceback" not in server.log()

