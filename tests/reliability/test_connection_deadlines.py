"""Connections that never start are cut: trickled upgrade headers, silent sockets, sockets that
never say hello (a hundred at once, while a live session goes on being served)."""

from __future__ import annotations

import asyncio
import json
import re
import time

import httpx
import pytest
import websockets

from tests.server_harness import Client, RunningServer, run_server

HELLO_TIMEOUT_S = 1.0
HEADER_TIMEOUT_S = 1.5
ALLOWED = "https://chat.example"
IDLE_SOCKETS = 100
LIVE = {"avatar": "astronaut", "mode": "live", "transport": "mse",
        "audio": {"format": "pcm_s16le", "sample_rate": 16000, "channels": 1}}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    with run_server(
        tmp_path_factory.mktemp("deadlines"),
        MTS_LIMITS__HELLO_TIMEOUT_S=str(HELLO_TIMEOUT_S),
        MTS_SERVER__HEADER_TIMEOUT_S=str(HEADER_TIMEOUT_S),
        MTS_SERVER__ALLOWED_ORIGINS=json.dumps([ALLOWED]),
    ) as running:
        yield running


def metric(server: RunningServer, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} (\S+)$", server.get("/metrics").text, re.M)
    return float(match.group(1)) if match else 0.0


def host_port(server: RunningServer) -> tuple[str, int]:
    host, port = server.url.removeprefix("http://").split(":")
    return host, int(port)


async def trickle_until_closed(server: RunningServer, opening: bytes, give_up_s: float) -> bool:
    """Send ``opening``, then one more header byte every 0.2 s; True if the server hung up."""
    reader, writer = await asyncio.open_connection(*host_port(server))
    try:
        writer.write(opening)
        deadline = time.monotonic() + give_up_s
        while time.monotonic() < deadline:
            try:
                data = await asyncio.wait_for(reader.read(1024), 0.2)
            except TimeoutError:
                writer.write(b"x")
                continue
            if not data:
                return True
        return False
    except ConnectionError:
        return True
    finally:
        writer.close()


async def test_trickled_upgrade_headers_are_cut(server: RunningServer) -> None:
    opening = b"GET /v1/stream HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nX-Slow: "
    closed = await asyncio.gather(
        *(trickle_until_closed(server, opening, give_up_s=10 * HEADER_TIMEOUT_S) for _ in range(30))
    )
    assert all(closed)
    assert server.get("/healthz").status_code == 200


async def test_a_connection_that_sends_nothing_is_cut(server: RunningServer) -> None:
    assert await trickle_until_closed(server, b"", give_up_s=0) is False  # sanity: it opens
    reader, writer = await asyncio.open_connection(*host_port(server))
    data = await asyncio.wait_for(reader.read(1024), 10 * HEADER_TIMEOUT_S)
    writer.close()
    assert data == b""


async def test_a_kept_alive_connection_is_not_cut_mid_request(server: RunningServer) -> None:
    async with httpx.AsyncClient(base_url=server.url) as client:
        for _ in range(3):
            assert (await client.get("/healthz")).status_code == 200
            await asyncio.sleep(HEADER_TIMEOUT_S / 3)


async def closed_without_hello(client: Client, n: int) -> int | None:
    """A socket that answers its own ping but never says hello: its error, then its close code."""
    await client.send("ping", id=n)
    assert (await client.expect("pong"))["id"] == n
    err = await client.expect("error", timeout=10 * HELLO_TIMEOUT_S)
    assert err["code"] == "bad_message" and "hello" in err["message"]
    with pytest.raises(websockets.ConnectionClosed) as closed:
        await client.ws.recv()
    return closed.value.rcvd.code if closed.value.rcvd is not None else None


async def test_sockets_without_hello_are_closed_with_1008_while_others_are_served(server: RunningServer) -> None:
    served = await Client.connect(server)
    await served.hello()
    await served.send("start", **LIVE)
    await served.expect("granted")
    await served.expect("stream")
    idle = await asyncio.gather(*(Client.connect(server) for _ in range(IDLE_SOCKETS)))
    assert int(metric(server, "mts_connections")) == IDLE_SOCKETS + 1
    codes = await asyncio.gather(*(closed_without_hello(client, n) for n, client in enumerate(idle)))
    assert codes == [1008] * IDLE_SOCKETS
    async with asyncio.timeout(10):  # the server let go of them too
        while int(metric(server, "mts_connections")) != 1:
            await asyncio.sleep(0.1)
    media_before = len(served.media)
    await served.ws.send(bytes(16_000))  # half a second of audio
    await served.drain(1.0)
    assert len(served.media) > media_before, "the live session was still served"
    await served.send("cancel")
    await served.send("ping", id="end")
    assert (await served.expect("pong"))["id"] == "end"
    await served.close()
    assert server.get("/v1/queue").json()["slots"]["busy"] == 0


async def test_a_socket_that_said_hello_stays_open(server: RunningServer) -> None:
    client = await Client.connect(server)
    await client.hello()
    await asyncio.sleep(2 * HELLO_TIMEOUT_S)
    await client.send("ping", id="later")
    assert (await client.expect("pong"))["id"] == "later"
    await client.close()


async def test_avatars_list_sends_cors_headers_to_allowed_origins(server: RunningServer) -> None:
    allowed = server.get("/v1/avatars", headers={"Origin": ALLOWED})
    assert allowed.status_code == 200 and allowed.headers["access-control-allow-origin"] == ALLOWED
    other = server.get("/v1/avatars", headers={"Origin": "http://chat.example"})
    assert "access-control-allow-origin" not in other.headers


async def test_the_origin_allow_list_compares_the_scheme(server: RunningServer) -> None:
    await (await websockets.connect(server.ws_url, origin=ALLOWED)).close()  # type: ignore[arg-type]
    with pytest.raises(websockets.InvalidStatus) as refused:
        await websockets.connect(server.ws_url, origin="http://chat.example")  # type: ignore[arg-type]
    assert refused.value.response.status_code == 403


async def test_same_origin_compares_the_scheme(tmp_path) -> None:
    with run_server(tmp_path) as plain:
        host = plain.url.removeprefix("http://")
        await (await websockets.connect(plain.ws_url, origin=f"http://{host}")).close()  # type: ignore[arg-type]
        with pytest.raises(websockets.InvalidStatus) as refused:
            await websockets.connect(plain.ws_url, origin=f"https://{host}")  # type: ignore[arg-type]
        assert refused.value.response.status_code == 403
