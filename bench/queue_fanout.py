"""Queue fan-out: N clients wait in line; how fast does a grant reach them all?

One server process, or ``--nodes`` processes sharing the line in Redis (one slot each, the clients
spread over them; a grant of another node's slot is a redirect, which the client follows as it
must, becoming the new holder). Each slot is held by a session. N clients join (clip mode, each
with its own token). Each round cancels a session holding a slot: the next client is granted and
every other client must hear its new position. Reported: the time from the cancel to each client's
new position (p50, p99, max over all clients and rounds), the servers' memory per waiting client
(RSS growth / N), and the largest event-loop lag while it happens. With ``--upload-s S`` each
waiting client first sends an S-second WAV clip and ``audio_end``: the memory per waiting client
then includes its upload, which the server keeps as received (on disk beyond
``limits.audio_spool_bytes``) until the grant.

    python -m bench.queue_fanout --clients 1000 --rounds 20
    python -m bench.queue_fanout --clients 1000 --rounds 5 --upload-s 10
    python -m bench.queue_fanout --clients 1000 --rounds 10 --nodes 3   # Redis on 127.0.0.1:6379
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import secrets
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import redis
from websockets.client import ClientProtocol
from websockets.frames import Frame, Opcode
from websockets.http11 import Response
from websockets.uri import parse_uri

from bench.common import lag_buckets, lag_p99_between, metric, percentile, redis_scripts
from tests.server_harness import RunningServer, free_port, mint, run_server, tone_wav


class Waiter(asyncio.Protocol):
    """A lean websocket client (websockets' sans-I/O protocol on a bare asyncio transport): with a
    thousand clients on the same two cores as the server, a heavier client would measure itself."""

    def __init__(self, uri: str, hello: dict[str, object], start: dict[str, object], upload: bytes | None) -> None:
        self.ws = ClientProtocol(parse_uri(uri), max_size=None)
        self.transport: asyncio.Transport | None = None
        self.opening = [hello, start]
        self.upload = upload
        self.position: int | None = None
        self.changed_at = 0.0
        self.granted_at: float | None = None
        self.redirect: tuple[str, str] | None = None
        self.error: dict[str, object] | None = None
        self.changed = asyncio.Event()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.ws.send_request(self.ws.connect())
        self._flush()

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter()
        self.ws.receive_data(data)
        for event in self.ws.events_received():
            if isinstance(event, Response):
                for message in self.opening:
                    self.send(message)
                if self.upload is not None:
                    self.ws.send_binary(self.upload)
                    self.send({"type": "audio_end"})
            elif isinstance(event, Frame) and event.opcode is Opcode.TEXT:
                self._on_message(json.loads(event.data), now)
        self._flush()

    def _on_message(self, msg: dict[str, object], now: float) -> None:
        if msg["type"] == "queued" and msg["position"] != self.position:
            self.position = int(msg["position"])  # type: ignore[call-overload]
            self.changed_at = now
            self.changed.set()
        elif msg["type"] == "error":
            self.error = msg
        elif msg["type"] in ("granted", "redirect"):
            self.granted_at = now
            self.position = 0
            if msg["type"] == "redirect":
                self.redirect = (str(msg["url"]), str(msg["grant"]))
            self.changed.set()

    def send(self, message: dict[str, object]) -> None:
        self.ws.send_text(json.dumps(message).encode())
        self._flush()

    def _flush(self) -> None:
        if self.transport is not None:
            for chunk in self.ws.data_to_send():
                if chunk:
                    self.transport.write(chunk)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


START = {"type": "start", "avatar": "astronaut", "mode": "clip", "transport": "mse", "audio": {"format": "wav"}}


async def open_waiter(ws_url: str, sub: str, upload: bytes | None = None, resume: str | None = None) -> Waiter:
    hello: dict[str, object] = {"type": "hello", "token": mint(sub, "normal")}
    if resume:
        hello["resume"] = resume
    host, port = ws_url.removeprefix("ws://").split("/")[0].split(":")
    _, waiter = await asyncio.get_running_loop().create_connection(
        lambda: Waiter(ws_url, hello, START, upload), host, int(port)
    )
    return waiter


async def take_up(waiter: Waiter, sub: str, upload: bytes | None) -> Waiter:
    """The waiter just granted, as the session holding the slot: itself, or (redirected) a socket
    to the slot's node with the grant, sending its start (and upload) there again."""
    if waiter.redirect is None:
        return waiter
    url, grant = waiter.redirect
    moved = await open_waiter(url, sub, upload, resume=grant)
    await asyncio.wait_for(moved.changed.wait(), 30)
    waiter.close()
    return moved


IDLE_S = 3.0


def total_scripts(running: list[RunningServer]) -> dict[str, float]:
    out: dict[str, float] = {}
    for server in running:
        for name, n in redis_scripts(server).items():
            out[name] = out.get(name, 0.0) + n
    return out


def per_script(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {name: n - before.get(name, 0.0) for name, n in after.items()}


async def scripts_idle(running: list[RunningServer], seconds: float) -> tuple[dict[str, float], float]:
    """The scripts every node ran while nothing happened for ``seconds``, and how long that was."""
    before, started = total_scripts(running), time.perf_counter()
    await asyncio.sleep(seconds)
    return per_script(before, total_scripts(running)), time.perf_counter() - started


@contextlib.contextmanager
def servers(tmp: Path, clients: int, nodes: int) -> Iterator[list[RunningServer]]:
    env = {
        "MTS_ENGINE__SLOTS": "1",
        "MTS_QUEUE__GLOBAL_CAP": str(clients + 10),
        "MTS_QUEUE__TIERS__NORMAL__CAP": str(clients + 10),
        "MTS_QUEUE__COALESCE_S": "0.25",
        "MTS_QUEUE__HEARTBEAT_S": "5",
    }
    prefix = f"mts-bench-{secrets.token_hex(4)}:"
    with contextlib.ExitStack() as stack:
        running = []
        for n in range(nodes):
            port = free_port()
            cluster = {} if nodes == 1 else {
                "MTS_QUEUE__STORE": "redis",
                "MTS_QUEUE__REDIS_PREFIX": prefix,
                "MTS_CLUSTER__NODE_ID": f"node-{n}",
                "MTS_SERVER__PUBLIC_URL": f"http://127.0.0.1:{port}",
            }
            (tmp / f"node-{n}").mkdir()
            running.append(stack.enter_context(run_server(tmp / f"node-{n}", port=port, **env, **cluster)))
        try:
            yield running
        finally:
            if nodes > 1:
                client = redis.Redis.from_url("redis://127.0.0.1:6379/0")
                keys = list(client.scan_iter(match=prefix + "*", count=1000))
                if keys:
                    client.delete(*keys)


async def run(clients: int, rounds: int, upload_s: float, settle_s: float, nodes: int) -> dict[str, object]:
    upload = tone_wav(upload_s) if upload_s > 0 else None
    with tempfile.TemporaryDirectory() as tmp, servers(Path(tmp), clients, nodes) as running:
        procs = [psutil.Process(s.process.pid) for s in running]

        def rss() -> int:
            return sum(p.memory_info().rss for p in procs)

        holders = []
        for n, server in enumerate(running):
            holder = await open_waiter(server.ws_url, f"holder-{n}")
            await asyncio.wait_for(holder.changed.wait(), 30)
            holders.append(holder)
        await asyncio.sleep(1.0)
        rss_before = rss()
        waiters: list[Waiter] = []
        subs: dict[int, str] = {}
        joining = time.perf_counter()
        for i in range(clients):  # all at once: each sends its hello and start as soon as it is connected
            waiter = await open_waiter(running[i % nodes].ws_url, f"user-{i}", upload)
            subs[id(waiter)] = f"user-{i}"
            waiters.append(waiter)
        while any(w.position is None for w in waiters):
            failed = [w.error for w in waiters if w.error is not None]
            if failed:
                raise RuntimeError(f"{len(failed)} clients were refused, e.g. {failed[0]}")
            await asyncio.sleep(0.1)
        joined_s = time.perf_counter() - joining
        if upload is not None:
            while sum(metric(s, "mts_queued_audio_bytes") for s in running) < clients * len(upload):
                await asyncio.sleep(0.2)
        await asyncio.sleep(1.0)
        rss_after = rss()
        await asyncio.sleep(settle_s)
        rss_settled = rss()
        lag_joining = max(metric(s, "mts_event_loop_lag_p99_seconds") for s in running)
        idle_scripts, idle_s = await scripts_idle(running, IDLE_S)
        buckets_before = [lag_buckets(s) for s in running]
        scripts_before, rounds_started = total_scripts(running), time.perf_counter()

        latencies: list[float] = []
        round_max: list[float] = []
        redirects = 0
        for _ in range(min(rounds, clients - 1)):
            await asyncio.sleep(0.3)
            waiting = [w for w in waiters if w.position and w.position > 0]
            before = {id(w): w.position for w in waiting}
            for w in waiting:
                w.changed.clear()
            t0 = time.perf_counter()
            holders.pop(0).send({"type": "cancel"})
            try:
                await asyncio.wait_for(asyncio.gather(*(w.changed.wait() for w in waiting)), 30)
            except TimeoutError:
                stuck = [w for w in waiting if not w.changed.is_set()]
                where = [w.position for w in stuck[:5]]
                raise RuntimeError(f"{len(stuck)} clients heard nothing, e.g. at {where}") from None
            got = [w.changed_at - t0 if w.granted_at is None else w.granted_at - t0 for w in waiting]
            assert all(w.position == before[id(w)] - 1 for w in waiting)
            latencies.extend(got)
            round_max.append(max(got))
            granted = next(w for w in waiting if w.position == 0)
            redirects += granted.redirect is not None
            holders.append(await take_up(granted, subs[id(granted)], upload))
        rounds_s = time.perf_counter() - rounds_started
        round_scripts = per_script(scripts_before, total_scripts(running))
        lag_rounds = max(lag_p99_between(b, lag_buckets(s)) for b, s in zip(buckets_before, running, strict=True))
        result = {
            "clients": clients,
            "nodes": nodes,
            "grants_that_were_redirects": redirects,
            "rounds": len(round_max),
            "all_in_line_s": joined_s,
            "p50_ms": 1000 * percentile(latencies, 0.50),
            "p99_ms": 1000 * percentile(latencies, 0.99),
            "max_ms": 1000 * max(latencies),
            "upload_bytes_per_client": len(upload) if upload is not None else 0,
            "kb_per_client": (rss_after - rss_before) / clients / 1024,
            "kb_per_client_settled": (rss_settled - rss_before) / clients / 1024,
            "settle_s": 1.0 + settle_s,
            "round_max_ms": [round(1000 * m, 1) for m in round_max],
            "loop_lag_p99_ms_while_joining": 1000 * lag_joining,
            "loop_lag_p99_ms_during_rounds_at_most": 1000 * lag_rounds,
        }
        if nodes > 1:
            # scripts a grant costs, all nodes together, less what the same time costs idle
            # (heartbeats, leases, the dispatchers' heartbeat rounds)
            grants = max(1, len(round_max))
            result["redis_scripts_per_grant"] = {
                name: round((n - idle_scripts.get(name, 0.0) * rounds_s / idle_s) / grants, 1)
                for name, n in sorted(round_scripts.items())
            }
            result["redis_scripts_idle_per_s"] = {k: round(v / idle_s, 1) for k, v in sorted(idle_scripts.items())}
        for w in [*holders, *waiters]:
            w.close()
        return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--upload-s", type=float, default=0.0, help="each waiting client sends a clip this long")
    parser.add_argument("--settle-s", type=float, default=15.0,
                        help="measure memory again this much later (allocators give freed memory back with a delay)")
    parser.add_argument("--nodes", type=int, default=1, help="server processes sharing the line in Redis")
    args = parser.parse_args()
    result = asyncio.run(run(args.clients, args.rounds, args.upload_s, args.settle_s, args.nodes))
    print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in result.items()}, indent=2))


if __name__ == "__main__":
    main()
