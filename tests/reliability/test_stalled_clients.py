"""Clients that stop reading: a stalled stream (a clip, or a live session) frees its slot, a slow
one is still served, and text replies to a client that never reads are bounded."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import re
import socket
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
import websockets

from tests.server_harness import Client, RunningServer, mint, run_server, tone_wav

STALL_TIMEOUT_S = 3.0
OUTBOX_BYTES = 512 * 1024
CLIP = {"avatar": "astronaut", "mode": "clip", "transport": "mse", "audio": {"format": "wav"}}
LIVE = {"avatar": "astronaut", "mode": "live", "transport": "mse",
        "audio": {"format": "pcm_s16le", "sample_rate": 16000, "channels": 1}}
USERS = itertools.count()
ARTIFACTS = Path(__file__).resolve().parent.parent.parent / "test-artifacts"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    with run_server(
        tmp_path_factory.mktemp("stalls"),
        MTS_ENGINE__SLOTS="1",
        MTS_LIMITS__START_BURST="100",
        MTS_STREAM__STALL_TIMEOUT_S=str(STALL_TIMEOUT_S),
        MTS_LIMITS__OUTBOX_BYTES=str(OUTBOX_BYTES),
    ) as running:
        yield running


def metric(server: RunningServer, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} (\S+)$", server.get("/metrics").text, re.M)
    return float(match.group(1)) if match else 0.0


async def non_reader(server: RunningServer) -> Any:
    """A websocket whose kernel receive buffer is tiny and whose client never reads: what the
    server sends piles up in its own send buffer."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    host, port = server.url.removeprefix("http://").split(":")
    sock.connect((host, int(port)))
    sock.setblocking(False)
    return await websockets.connect(server.ws_url, sock=sock, max_queue=1, max_size=None, ping_interval=None)


async def send_clip(ws: Any, audio: bytes, start: dict[str, Any] = CLIP) -> None:
    await ws.send(json.dumps({"type": "hello", "token": mint(f"user-{next(USERS)}", "normal")}))
    await ws.send(json.dumps({"type": "start", **start}))
    for i in range(0, len(audio), 256 * 1024):
        await ws.send(audio[i : i + 256 * 1024])
    if start["mode"] == "clip":
        await ws.send(json.dumps({"type": "audio_end"}))


async def wait_idle(server: RunningServer, timeout: float = 60.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        summary = server.get("/v1/queue").json()
        if summary["slots"]["busy"] == 0 and all(t["size"] == 0 for t in summary["tiers"].values()):
            return summary
        if time.monotonic() > deadline:
            raise TimeoutError(f"the server did not go idle: {summary}")
        await asyncio.sleep(0.2)


async def next_in_line(server: RunningServer) -> tuple[Client, float]:
    """A reading client with a short clip, queued behind the slot holder; its wait for the grant.
    Its audio is new each time (the voice stops at another place), or the clip store would answer."""
    n = next(USERS)
    client = await Client.connect(server)
    await client.hello(mint(f"user-{n}", "normal"))
    await client.send("start", **CLIP)
    await client.ws.send(tone_wav(1.0, speech=[(0.0, 0.5 + 0.001 * n)]))
    await client.send("audio_end")
    queued = await client.expect("queued", "granted", timeout=30)
    granted = queued if queued["type"] == "granted" else await client.expect("granted", timeout=120)
    return client, granted["waited_s"]


async def test_a_client_that_stops_reading_loses_its_slot(server: RunningServer) -> None:
    stalled_before = metric(server, 'mts_rejections_total{code="stalled"}')
    holder = await non_reader(server)
    await send_clip(holder, tone_wav(60.0))
    await asyncio.sleep(1.0)
    assert server.get("/v1/queue").json()["slots"]["busy"] == 1
    client, waited_s = await next_in_line(server)
    done = await client.expect("done", timeout=60)
    assert done["frames"] == 25
    assert metric(server, 'mts_rejections_total{code="stalled"}') == stalled_before + 1
    with pytest.raises(websockets.ConnectionClosed):  # the stalled connection was cut
        async with asyncio.timeout(30):
            while True:
                await holder.recv()
    await client.close()
    await wait_idle(server)
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "stall_free_s.txt").write_text(
        f"stall_timeout_s={STALL_TIMEOUT_S} next_in_line_waited_s={waited_s}\n"
    )
    print(f"a stalled slot was free after the next client waited {waited_s:.1f} s (stall timeout {STALL_TIMEOUT_S} s)")
    assert "Traceback" not in server.log()


@pytest.mark.slow
async def test_a_stalled_live_session_loses_its_slot(server: RunningServer) -> None:
    """A live MSE session whose client goes on sending audio but reads nothing: its media never
    ends by itself, and it holds the slot until ``stream.stall_timeout_s`` cuts it, like a clip.
    Slow: live media comes at 25 frames/s (about 180 kB/s), and the kernel's send buffer for the
    socket (up to 4 MB on Linux) fills before a write waits."""
    stalled_before = metric(server, 'mts_rejections_total{code="stalled"}')
    holder = await non_reader(server)
    await holder.send(json.dumps({"type": "hello", "token": mint(f"user-{next(USERS)}", "normal")}))
    await holder.send(json.dumps({"type": "start", **LIVE}))

    async def talk() -> None:
        """Half a second of audio every half second, until the server cuts the connection."""
        with contextlib.suppress(websockets.ConnectionClosed):
            for _ in range(240):
                await holder.send(bytes(16_000))
                await asyncio.sleep(0.5)

    talking = asyncio.create_task(talk())
    await asyncio.sleep(1.0)
    assert server.get("/v1/queue").json()["slots"]["busy"] == 1
    client, waited_s = await next_in_line(server)
    assert (await client.expect("done", timeout=60))["frames"] == 25
    assert metric(server, 'mts_rejections_total{code="stalled"}') == stalled_before + 1
    async with asyncio.timeout(30):  # the stalled connection was cut: its audio can no longer go
        await talking
    assert holder.protocol.close_rcvd is None  # aborted, not closed: a close would wait for the client
    await client.close()
    await wait_idle(server)
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "stall_free_live_s.txt").write_text(
        f"stall_timeout_s={STALL_TIMEOUT_S} next_in_line_waited_s={waited_s}\n"
    )
    print(f"a stalled live session's slot was free after the next client waited {waited_s:.1f} s")
    assert "Traceback" not in server.log()


async def test_a_slow_but_moving_client_is_served(server: RunningServer) -> None:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    host, port = server.url.removeprefix("http://").split(":")
    sock.connect((host, int(port)))
    sock.setblocking(False)
    ws = await websockets.connect(server.ws_url, sock=sock, max_queue=1, max_size=None)
    await send_clip(ws, tone_wav(8.0))
    received = 0
    last: dict[str, Any] = {}
    async with asyncio.timeout(120):
        while last.get("type") not in ("done", "error"):
            raw = await ws.recv()
            if isinstance(raw, bytes):
                received += len(raw)
                await asyncio.sleep(len(raw) / 200_000)  # about 200 kB/s: slower than the server makes it
            else:
                last = json.loads(raw)
    assert last["type"] == "done" and last["frames"] == 200
    assert received > OUTBOX_BYTES  # more than the outbox holds: the client was behind, and still served
    await ws.close()
    await wait_idle(server)


async def test_pings_with_huge_ids_from_a_client_that_never_reads_are_bounded(server: RunningServer) -> None:
    rss = psutil.Process(server.process.pid).memory_info().rss
    big = await non_reader(server)
    await big.send(json.dumps({"type": "ping", "id": "x" * 1000}))
    probe = await Client.connect(server)
    await probe.send("ping", id="x" * 1000)
    err = await probe.expect("error")
    assert err["code"] == "bad_message" and "id" in err["message"] and "id" not in err
    await probe.send("ping", id="y" * 256)
    assert (await probe.expect("pong"))["id"] == "y" * 256
    await probe.close()
    # 500 pings whose pongs are as large as an id may make them, and never read
    ping = json.dumps({"type": "ping", "id": "z" * 256})
    stalled_before = metric(server, 'mts_rejections_total{code="stalled"}')
    with contextlib.suppress(websockets.ConnectionClosed):
        for _ in range(20_000):
            await big.send(ping)
    async with asyncio.timeout(30):  # the server cut the connection that read none of its replies
        while metric(server, "mts_connections") > 0:
            await asyncio.sleep(0.2)
    assert metric(server, 'mts_rejections_total{code="stalled"}') == stalled_before + 1
    big.transport.abort()
    grown = psutil.Process(server.process.pid).memory_info().rss - rss
    assert grown < 64 << 20, f"RSS grew {grown >> 20} MiB"
    assert metric(server, "mts_outbox_bytes") < OUTBOX_BYTES
    assert "Traceback" not in server.log()
