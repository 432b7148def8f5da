"""Token attacks against a real server: lone surrogates and tokens that expire mid-session."""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path

import pytest
import websockets

from tests.server_harness import Client, RunningServer, mint, run_server
from tests.test_e2e_queue import hold_slot, wait_position

EXP_GRACE_S = 1.0
CLIP = {"avatar": "astronaut", "mode": "clip", "transport": "mse", "audio": {"format": "wav"}}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    with run_server(
        tmp_path_factory.mktemp("auth"),
        MTS_AUTH__EXP_GRACE_S=str(EXP_GRACE_S),
        MTS_AUTH__LEEWAY_S="0",
        MTS_LIMITS__START_BURST="100",
    ) as running:
        yield running


async def closed_with(client: Client) -> int:
    with pytest.raises(websockets.ConnectionClosed) as closed:
        while True:
            await client.ws.recv()
    assert closed.value.rcvd is not None
    return closed.value.rcvd.code


async def test_a_lone_surrogate_in_the_token_is_an_invalid_token(server: RunningServer) -> None:
    client = await Client.connect(server)
    await client.send("hello", token="\ud800")
    err = await client.expect("error")
    assert err["code"] == "invalid_token"
    assert await closed_with(client) == 4401
    assert "Traceback" not in server.log()


async def test_a_lone_surrogate_in_the_resume_token_is_session_expired(server: RunningServer) -> None:
    client = await Client.connect(server)
    await client.send("hello", resume="abc\udfff.x")
    await client.expect("welcome")
    assert (await client.expect("error"))["code"] == "session_expired"
    await client.send("ping", id="still-open")
    assert (await client.expect("pong"))["id"] == "still-open"
    await client.close()
    assert "Traceback" not in server.log()


async def test_a_start_after_the_token_expired_is_refused_and_closed(server: RunningServer) -> None:
    expires = int(time.time()) + 2
    client = await Client.connect(server)
    welcome = await client.hello(mint("fleeting", "vip", exp=expires))
    assert welcome["tier"] == "vip"
    await asyncio.sleep(max(0.0, expires + EXP_GRACE_S + 0.5 - time.time()))
    with contextlib.suppress(websockets.ConnectionClosed):  # the expiry timer may have closed it first
        await client.send("start", **CLIP)
    err = await client.expect("error")
    assert err["code"] == "invalid_token" and "expired" in err["message"]
    assert await closed_with(client) == 4401


async def test_a_start_within_the_grace_is_still_served(server: RunningServer) -> None:
    client = await Client.connect(server)
    await client.hello(mint("lasting", "vip", exp=int(time.time()) + 3600))
    await client.send("start", **CLIP)
    assert (await client.expect("queued", "error"))["type"] == "queued"
    await client.close()


async def test_a_resume_by_another_identity_leaves_the_owners_place(tmp_path: Path) -> None:
    """A stolen resume token is refused, and the owner's own resume a moment later still works."""
    with run_server(tmp_path, MTS_ENGINE__SLOTS="1") as server:
        holder = await hold_slot(server, "holder")
        owner = await Client.connect(server)
        welcome = await owner.hello(mint("bob", "normal"))
        await owner.send("start", **CLIP)
        await wait_position(owner, 1)
        await owner.close()

        thief = await Client.connect(server)
        await thief.hello(mint("mallory", "normal"), resume=welcome["resume"])
        assert (await thief.expect("error"))["code"] == "session_expired"

        back = await Client.connect(server)
        resumed = await back.hello(mint("bob", "normal"), resume=welcome["resume"])
        assert resumed["session"] == welcome["session"]
        await wait_position(back, 1)
        for client in (holder, thief, back):
            await client.close()
        assert "Traceback" not in server.log()
