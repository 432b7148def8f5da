"""Limits for the whole session: a token's ``exp`` (with its grace) whatever the socket does, and
live sessions that go quiet. (Clients that vanish mid-cache-replay: test_vanish_every_stage.py.)"""

from __future__ import annotations

import asyncio
import itertools
import time

import pytest
import websockets

from tests.server_harness import Client, RunningServer, mint, run_server

EXP_GRACE_S = 1.0
LIVE_IDLE_S = 2.0
LIVE = {"avatar": "astronaut", "mode": "live", "transport": "mse",
        "audio": {"format": "pcm_s16le", "sample_rate": 16000, "channels": 1}}
USERS = itertools.count()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    with run_server(
        tmp_path_factory.mktemp("session-limits"),
        MTS_ENGINE__SLOTS="1",
        MTS_LIMITS__START_BURST="100",
        MTS_AUTH__EXP_GRACE_S=str(EXP_GRACE_S),
        MTS_LIMITS__LIVE_IDLE_TIMEOUT_S=str(LIVE_IDLE_S),
    ) as running:
        yield running


def user_token(exp_in_s: float = 3600) -> str:
    return mint(f"user-{next(USERS)}", "vip", exp=int(time.time() + exp_in_s))


def busy_slots(server: RunningServer) -> int:
    return int(server.get("/v1/queue").json()["slots"]["busy"])


async def closed_with(client: Client, timeout: float) -> int | None:
    with pytest.raises(websockets.ConnectionClosed) as closed:  # noqa: PT012
        async with asyncio.timeout(timeout):
            while True:
                await client._pull(timeout)
    return closed.value.rcvd.code if closed.value.rcvd is not None else None


@pytest.mark.parametrize("stage", ["idle", "streaming"])
async def test_a_socket_past_its_token_exp_and_grace_is_closed_with_4401(server: RunningServer, stage: str) -> None:
    client = await Client.connect(server)
    await client.hello(user_token(exp_in_s=2.0))
    if stage == "streaming":
        await client.send("start", **LIVE)
        await client.expect("granted")
        assert busy_slots(server) == 1
    code = await closed_with(client, timeout=30)
    errors = client.of_type("error")
    assert errors and errors[-1]["code"] == "invalid_token" and code == 4401
    assert busy_slots(server) == 0
    assert "Traceback" not in server.log()


async def test_a_quiet_live_session_ends_and_frees_its_slot(server: RunningServer) -> None:
    talking = await Client.connect(server)
    await talking.hello(user_token())
    await talking.send("start", **LIVE)
    await talking.expect("granted")
    for _ in range(int(3 * LIVE_IDLE_S)):  # audio every second: never idle
        await talking.ws.send(bytes(2 * 16_000 // 4))
        await talking.drain(1.0)
    assert not talking.of_type("done") and busy_slots(server) == 1
    done = await talking.expect("done", timeout=10 * LIVE_IDLE_S)  # now quiet
    assert "clip" not in done
    assert busy_slots(server) == 0
    await talking.send("ping", id=1)  # the socket stays usable
    assert (await talking.expect("pong"))["id"] == 1
    await talking.close()
