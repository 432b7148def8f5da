"""The real server, real websocket clients: tiers, pushed positions, grant order, bad input, resume."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import websockets

from tests.server_harness import Client, RunningServer, mint, run_server, tone_wav

CLIP = {"avatar": "astronaut", "mode": "clip", "transport": "mse", "audio": {"format": "wav"}}
LIVE = {"avatar": "astronaut", "mode": "live", "transport": "mse", "audio": {"format": "pcm_s16le"}}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    with run_server(
        tmp_path_factory.mktemp("queue"),
        MTS_ENGINE__SLOTS="1",
        MTS_LIMITS__MAX_MESSAGE_BYTES="65536",
        MTS_LIMITS__START_BURST="50",
    ) as running:
        yield running


def positions(client: Client) -> list[int]:
    """The positions a client was told, consecutive repeats (heartbeats) folded."""
    seen: list[int] = []
    for msg in client.of_type("queued"):
        if not seen or seen[-1] != msg["position"]:
            seen.append(msg["position"])
    return seen


async def wait_position(client: Client, position: int) -> dict:
    while True:
        msg = await client.expect("queued")
        if msg["position"] == position:
            return msg


async def hold_slot(server: RunningServer, sub: str) -> Client:
    holder = await Client.connect(server)
    await holder.hello(mint(sub, "vip"))
    await holder.send("start", **LIVE)
    await holder.expect("granted")
    return holder


async def test_three_tiers_one_slot_positions_and_grant_order(server: RunningServer) -> None:
    holder = await hold_slot(server, "holder-1")
    low = await Client.connect(server)
    normal = await Client.connect(server)
    vip = await Client.connect(server)
    assert (await low.hello())["tier"] == "low"
    assert (await normal.hello(mint("bob", "normal")))["tier"] == "normal"
    assert (await vip.hello(mint("alice", "vip")))["tier"] == "vip"

    await low.send("start", **CLIP)
    first = await wait_position(low, 1)
    assert first["tier"] == "low" and first["queue_size"] == 1
    await normal.send("start", **CLIP)
    await wait_position(normal, 1)
    await wait_position(low, 2)
    await vip.send("start", **CLIP)
    await wait_position(vip, 1)
    await wait_position(normal, 2)
    await wait_position(low, 3)
    for client in (low, normal, vip):
        await client.ws.send(tone_wav(1.0))
        await client.send("audio_end")

    await holder.send("cancel")
    grants = {}
    for name, client in (("vip", vip), ("normal", normal), ("low", low)):
        grants[name] = (await client.expect("granted", timeout=60))["_t"]
        done = await client.expect("done", timeout=60)
        assert done["frames"] == 25
    assert grants["vip"] < grants["normal"] < grants["low"]
    assert positions(vip) == [1]
    assert positions(normal) == [1, 2, 1]
    assert positions(low) == [1, 2, 3, 2, 1]
    for client in (holder, low, normal, vip):
        await client.close()


async def test_forged_and_expired_tokens_are_refused_and_closed(server: RunningServer) -> None:
    forged = mint("mallory", "vip", secret="not-the-server-secret-but-long-enough-0123")
    for token in (forged, mint("old", "vip", exp=1_000)):
        client = await Client.connect(server)
        await client.send("hello", token=token)
        err = await client.expect("error")
        assert err["code"] == "invalid_token"
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await client.ws.recv()
        assert closed.value.rcvd.code == 4401


async def test_unsigned_tier_field_is_ignored(server: RunningServer) -> None:
    client = await Client.connect(server)
    await client.send("hello", tier="vip")
    assert (await client.expect("welcome"))["tier"] == "low"
    await client.close()


async def test_malformed_messages_get_bad_message_and_the_socket_stays_open(server: RunningServer) -> None:
    client = await Client.connect(server)
    await client.ws.send("{not json")
    assert (await client.expect("error"))["code"] == "bad_message"
    await client.send("start", avatar="astronaut", mode="clip", transport="mse")
    assert (await client.expect("error"))["code"] == "bad_message"
    await client.hello()
    await client.send("dance", id=7)
    err = await client.expect("error")
    assert err["code"] == "bad_message" and err["id"] == 7
    await client.send("start", avatar="astronaut", mode="sing", transport="mse", id="s1")
    err = await client.expect("error")
    assert err["code"] == "bad_message" and err["id"] == "s1" and "mode" in err["message"]
    await client.send("start", avatar="nobody", mode="clip", transport="mse", audio={"format": "wav"})
    assert (await client.expect("error"))["code"] == "unknown_avatar"
    await client.send("ping", id=1)
    assert (await client.expect("pong"))["id"] == 1
    await client.close()


async def test_repeated_bad_messages_close_with_policy_violation(tmp_path: Path) -> None:
    with run_server(tmp_path, MTS_LIMITS__BAD_MESSAGE_LIMIT="3") as server:
        client = await Client.connect(server)
        for _ in range(3):
            await client.ws.send("[]")
        with pytest.raises(websockets.ConnectionClosed) as closed:
            while True:
                await client._pull(10)
        assert closed.value.rcvd.code == 1008
        assert [m["code"] for m in client.of_type("error")] == ["bad_message"] * 3


async def test_oversized_frame_closes_with_1009(server: RunningServer) -> None:
    client = await Client.connect(server)
    await client.hello()
    await client.ws.send(b"\0" * 200_000)
    with pytest.raises(websockets.ConnectionClosed) as closed:
        while True:
            await client._pull(10)
    assert closed.value.rcvd.code == 1009


async def test_disconnect_frees_the_place_and_resume_restores_it(server: RunningServer) -> None:
    holder = await hold_slot(server, "holder-2")
    first, second = await Client.connect(server), await Client.connect(server)
    welcome = await first.hello(mint("carol", "normal"))
    await second.hello(mint("dave", "normal"))
    await first.send("start", **CLIP)
    await wait_position(first, 1)
    await second.send("start", **CLIP)
    await wait_position(second, 2)

    await first.close()
    await wait_position(second, 1)
    assert server.get("/v1/queue").json()["tiers"]["normal"]["size"] == 1

    again = await Client.connect(server)
    resumed = await again.hello(mint("carol", "normal"), resume=welcome["resume"])
    assert resumed["session"] == welcome["session"]
    await wait_position(again, 1)
    await wait_position(second, 2)

    forged = await Client.connect(server)
    await forged.hello(resume=welcome["resume"][:-2] + "xx")
    assert (await forged.expect("error"))["code"] == "session_expired"

    for client in (again, second):
        await client.send("cancel")
    await holder.send("cancel")
    await asyncio.sleep(0.3)
    summary = server.get("/v1/queue").json()
    assert summary["slots"]["busy"] == 0
    assert all(t["size"] == 0 for t in summary["tiers"].values())
    for client in (holder, again, second, forged):
        await client.close()


async def test_resume_after_the_grace_period_is_refused(tmp_path: Path) -> None:
    with run_server(tmp_path, MTS_ENGINE__SLOTS="1", MTS_QUEUE__RESUME_GRACE_S="0.5") as server:
        holder = await hold_slot(server, "holder-3")
        client = await Client.connect(server)
        welcome = await client.hello(mint("erin", "low"))
        await client.send("start", **CLIP)
        await wait_position(client, 1)
        await client.close()
        await asyncio.sleep(1.5)
        again = await Client.connect(server)
        await again.hello(mint("erin", "low"), resume=welcome["resume"])
        assert (await again.expect("error"))["code"] == "session_expired"
        await again.send("start", **CLIP)
        await wait_position(again, 1)
        await holder.close()
        await again.close()


async def test_overload_is_refused_at_once_with_retry_after(tmp_path: Path) -> None:
    with run_server(tmp_path, MTS_ENGINE__SLOTS="1", MTS_QUEUE__GLOBAL_CAP="2") as server:
        holder = await hold_slot(server, "holder-4")
        waiting = []
        for i in range(2):
            c = await Client.connect(server)
            await c.hello(mint(f"user{i}", "normal"))
            await c.send("start", **CLIP)
            await c.expect("queued")
            waiting.append(c)
        late = await Client.connect(server)
        await late.hello(mint("late", "vip"))
        await late.send("start", **CLIP)
        err = await late.expect("error", "queued")
        assert err["type"] == "error" and err["code"] == "queue_full" and err["retry_after_s"] > 0
        metrics = server.get("/metrics").text
        assert 'mts_rejections_total{code="queue_full"} 1.0' in metrics
        for c in (holder, late, *waiting):
            await c.close()


async def test_one_active_request_per_identity_and_per_socket(server: RunningServer) -> None:
    holder = await hold_slot(server, "holder-5")
    a, b = await Client.connect(server), await Client.connect(server)
    await a.hello(mint("frank", "normal"))
    await b.hello(mint("frank", "normal"))
    await a.send("start", **CLIP)
    await a.expect("queued")
    await a.send("start", **CLIP)
    assert (await a.expect("error"))["code"] == "busy"
    await b.send("start", **CLIP)
    assert (await b.expect("error"))["code"] == "busy"
    await a.send("cancel")
    await asyncio.sleep(0.2)
    await b.send("start", **CLIP)
    assert (await b.expect("queued", "error"))["type"] == "queued"
    for c in (holder, a, b):
        await c.close()


async def test_start_rate_limit(tmp_path: Path) -> None:
    with run_server(tmp_path, MTS_LIMITS__START_BURST="2", MTS_LIMITS__START_RATE_PER_MINUTE="1") as server:
        client = await Client.connect(server)
        await client.hello(mint("gina", "normal"))
        codes = []
        for _ in range(3):
            await client.send("start", **CLIP)
            msg = await client.expect("granted", "error")
            codes.append(msg.get("code", msg["type"]))
            await client.send("cancel")
        assert codes == ["granted", "granted", "rate_limited"]
        await client.close()


async def test_foreign_origin_is_refused_before_accept(server: RunningServer) -> None:
    with pytest.raises(websockets.InvalidStatus) as refused:
        await websockets.connect(server.ws_url, origin="https://evil.example")
    assert refused.value.response.status_code == 403
    assert json.loads(refused.value.response.body)["code"] == "forbidden_origin"


async def test_queue_metrics_and_endpoints(server: RunningServer) -> None:
    assert server.get("/healthz").json() == {"status": "ok"}
    assert server.get("/readyz").json()["ready"] is True
    avatars = server.get("/v1/avatars").json()
    assert {"id": "astronaut", "ready": True}.items() <= avatars[0].items()
    metrics = server.get("/metrics").text
    for name in ("mts_queue_waiting", "mts_queue_wait_seconds", "mts_grants_total", "mts_sessions_active",
                 "mts_event_loop_lag_seconds"):
        assert name in metrics


async def test_origin_allow_list(tmp_path: Path) -> None:
    with run_server(tmp_path, MTS_SERVER__ALLOWED_ORIGINS='["https://chat.example"]') as server:
        allowed = await websockets.connect(server.ws_url, origin="https://chat.example")
        await allowed.send(json.dumps({"type": "hello"}))
        assert json.loads(await allowed.recv())["type"] == "welcome"
        await allowed.close()
        for origin in ("https://evil.example", server.url):
            with pytest.raises(websockets.InvalidStatus) as refused:
                await websockets.connect(server.ws_url, origin=origin)
            assert refused.value.response.status_code == 403
