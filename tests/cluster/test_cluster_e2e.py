"""Three real nodes sharing one line in the real Redis, behind a real nginx: global priority,
redirects that stream end to end, a node killed while clients wait and while it streams."""

from __future__ import annotations

import asyncio
import io
import time
from pathlib import Path
from typing import Any

import pytest

from stream_server.client import Display, Standing, fetch_clip
from tests.cluster.cluster_harness import Cluster, run_cluster, slots
from tests.server_harness import Client, decode_mp4, mint, tone_wav

pytestmark = pytest.mark.slow

LIVE = {"avatar": "astronaut", "mode": "live", "transport": "mse", "audio": {"format": "pcm_s16le"}}
CLIP = {"avatar": "astronaut", "mode": "clip", "transport": "mse", "audio": {"format": "wav"}}


async def hold(cluster: Cluster, node: int, sub: str, tier: str = "vip") -> Client:
    """A live session holding node ``node``'s one slot."""
    client = await cluster.connect(node)
    await client.hello(mint(sub, tier))
    await client.send("start", **LIVE)
    await client.expect("granted")
    return client


async def wait_position(client: Client, position: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while client.of_type("queued")[-1:] == [] or client.of_type("queued")[-1]["position"] != position:
        await client.expect("queued", timeout=max(0.1, deadline - time.monotonic()))


async def take_slot(cluster: Cluster, client: Client, token: str, start: dict[str, Any], audio: bytes = b"") -> Client:
    """Wait for ``granted`` or ``redirect``; follow a redirect as a client must: a socket to the
    node named, ``hello{token, resume: grant}``, the same ``start`` and audio again. Returns the
    socket that streams."""
    msg = await client.expect("granted", "redirect", timeout=60)
    if msg["type"] == "granted":
        return client
    assert msg["url"].startswith(cluster.ws(None).rsplit("/v1/stream", 1)[0] + "/node/"), msg["url"]
    moved = await cluster.connect(int(msg["url"].split("/node/")[1].split("/")[0]))
    await moved.hello(token, resume=msg["grant"])
    await moved.send("start", **start)
    if audio:
        await moved.ws.send(audio)
        await moved.send("audio_end")
    await moved.expect("granted", timeout=30)
    assert not moved.of_type("queued"), "a redirected request does not queue again"
    await client.close()
    return moved


async def test_three_nodes_behind_nginx_keep_one_line_in_global_priority_order(
    tmp_path: Path, redis_url: str, prefix: str
) -> None:
    with run_cluster(tmp_path, redis_url, prefix) as cluster:
        holders = [await hold(cluster, n, f"holder{n}") for n in range(3)]
        joins = [("low1", "low"), ("normal1", "normal"), ("low2", "low"), ("vip1", "vip"), ("normal2", "normal"),
                 ("vip2", "vip")]
        waiting: dict[str, Client] = {}
        for sub, tier in joins:  # round robin: two on each node
            client = await cluster.connect()
            await client.hello(mint(sub, tier))
            await client.send("start", **LIVE)
            await client.expect("queued")
            waiting[sub] = client
        order = ["vip1", "vip2", "normal1", "normal2", "low1", "low2"]
        for position, sub in enumerate(order, start=1):
            await wait_position(waiting[sub], position)
        summary = cluster.queue(1)
        assert {t: s["size"] for t, s in summary["tiers"].items()} == {"vip": 2, "normal": 2, "low": 2}
        assert slots(summary) == (3, 3)

        # free one slot at a time: grants follow the global order, wherever the slot is
        serving = list(holders)
        granted = []
        for sub in order:
            await serving.pop(0).send("cancel")
            streaming = await take_slot(cluster, waiting[sub], mint(sub, dict(joins)[sub]), LIVE)
            granted.append(sub)
            serving.append(streaming)
            for other in order[len(granted):]:
                assert not waiting[other].of_type("granted") and not waiting[other].of_type("redirect")
        assert granted == order
        # nothing granted twice: one grant or redirect per request, and never more slots busy than there are
        for sub in order:
            client = waiting[sub]
            assert len(client.of_type("granted")) + len(client.of_type("redirect")) == 1
        assert slots(cluster.queue(0)) == (3, 3)
        for client in serving:
            await client.close()


async def test_a_redirect_streams_end_to_end_through_nginx_and_an_unused_grant_returns_its_slot(
    tmp_path: Path, redis_url: str, prefix: str
) -> None:
    with run_cluster(tmp_path, redis_url, prefix, MTS_CLUSTER__GRANT_TTL_S="2") as cluster:
        h0, h2 = await hold(cluster, 0, "h0"), await hold(cluster, 2, "h2")
        # node 0 is full and node 1 free: a client of node 0 is granted node 1's slot and ignores it
        ignorer = await cluster.connect(0)
        await ignorer.hello(mint("ignorer", "normal"))
        await ignorer.send("start", **LIVE)
        redirect = await ignorer.expect("redirect", "granted")
        assert redirect["type"] == "redirect" and redirect["url"] == cluster.ws(1)
        await ignorer.close()
        assert cluster.queue(1)["slots"]["busy"] == 3, "node 1's slot is reserved for the grant"
        # the command-line client follows its redirect: same request, same audio, on node 1
        audio = tone_wav(2.0)
        out = io.StringIO()
        media, done = await fetch_clip(
            cluster.ws(0), "astronaut", audio, "wav", mint("cli", "normal"), Display(out), Standing()
        )
        assert f"moving to {cluster.ws(1)}" in out.getvalue()
        frames, video_s, audio_s = decode_mp4(media)
        assert len(frames) == done.frames == 50 and abs(audio_s - 2.0) < 0.1
        assert frames[0].shape[2] == 3
        # node 1's slot was free for it only once the ignored grant had expired (ttl 2 s)
        waited = float(out.getvalue().split("granted after ")[1].split(" s")[0])
        assert waited >= 1.5, out.getvalue()
        log = cluster.nodes[1].log()
        assert "Traceback" not in log
        summary = cluster.queue(2)
        assert summary["slots"]["busy"] == 2, "the clip released node 1's slot, the ignored grant's slot returned"
        # a grant is single-use: the ignorer's grant, presented now, is refused
        late = await cluster.connect(1)
        await late.hello(mint("ignorer", "normal"), resume=redirect["grant"])
        err = await late.expect("error")
        assert err["code"] == "session_expired"
        for c in (h0, h2, late):
            await c.close()


async def test_sigkill_of_a_node_while_clients_wait_and_while_it_streams(
    tmp_path: Path, redis_url: str, prefix: str
) -> None:
    lease = 1.5
    with run_cluster(tmp_path, redis_url, prefix, MTS_CLUSTER__LEASE_S=str(lease)) as cluster:
        h0, h1, h2 = [await hold(cluster, n, f"h{n}") for n in range(3)]  # h1 streams on node 1
        w1 = await cluster.connect(1)  # a vip clip waits on node 1, its audio sent there
        welcome = await w1.hello(mint("w1", "vip"))
        await w1.send("start", **CLIP)
        audio = tone_wav(1.0)
        await w1.ws.send(audio)
        await w1.send("audio_end")
        await wait_position(w1, 1)
        w2 = await cluster.connect(0)
        await w2.hello(mint("w2", "normal"))
        await w2.send("start", **LIVE)
        await wait_position(w2, 2)
        assert slots(cluster.queue(0)) == (3, 3)

        cluster.nodes[1].process.kill()
        killed = time.monotonic()
        # within the lease: node 1's slots and its streaming session are gone, w1 is held for a resume
        while slots(cluster.queue(0)) != (2, 2):
            assert time.monotonic() - killed < lease + 3, cluster.queue(0)
            await asyncio.sleep(0.1)
        await wait_position(w2, 1)
        assert not w2.of_type("granted"), "no slot is free: nothing is granted"
        # w1 reconnects through nginx (to a live node) with its resume: its place comes back
        back = await cluster.connect()
        await back.send("hello", token=mint("w1", "vip"), resume=welcome["resume"])
        assert (await back.expect("welcome"))["session"] == welcome["session"]
        err = await back.expect("error")
        assert err["code"] == "bad_audio" and "again" in err["message"], "its audio stayed on the dead node"
        await back.ws.send(audio)
        await back.send("audio_end")
        await wait_position(back, 1)
        await wait_position(w2, 2)
        # a slot frees: w1 first, then w2; each exactly once
        await h0.send("cancel")
        streaming = await take_slot(cluster, back, mint("w1", "vip"), CLIP, audio)
        done = await streaming.expect("done", timeout=60)
        frames, _, _ = decode_mp4(streaming.media_bytes)
        assert len(frames) == done["frames"] == 25
        await h2.send("cancel")
        w2_streaming = await take_slot(cluster, w2, mint("w2", "normal"), LIVE)
        for client in (back, streaming, w2):
            assert len(client.of_type("granted")) + len(client.of_type("redirect")) <= 1
        assert slots(cluster.queue(2)) == (2, 1)
        for c in (w2_streaming, h1, w1):
            await c.close()
