"""Queue fan-out: N clients wait in line on one server process; how fast does a grant reach them all?

One slot, held by a live session. N clients join (clip mode, each with its own token). Each round
cancels the session holding the slot: the next client is granted and every other client must hear
its new position. Reported: the time from the cancel to each client's new position (p50, p99, max
over all clients and rounds), the server's memory per waiting client (RSS growth / N), and the
server's event-loop lag while it happens. With ``--upload-s S`` each waiting client first sends an
S-second WAV clip and ``audio_end``: the memory per waiting client then includes its upload, which
the server keeps as received (on disk beyond ``limits.audio_spool_bytes``) until the grant.

    python -m bench.queue_fanout --clients 1000 --rounds 20
    python -m bench.queue_fanout --clients 1000 --rounds 5 --upload-s 10
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path

import psutil
from websockets.client import ClientProtocol
from websockets.frames import Frame, Opcode
from websockets.http11 import Response
from websockets.uri import parse_uri

from bench.common import lag_buckets, lag_p99_between, metric, percentile
from tests.server_harness import RunningServer, mint, run_server, tone_wav


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
        elif msg["type"] == "granted":
            self.granted_at = now
            self.position = 0
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


async def open_waiter(server: RunningServer, sub: str, upload: bytes | None = None) -> Waiter:
    hello = {"type": "hello", "token": mint(sub, "normal")}
    start = {"type": "start", "avatar": "astronaut", "mode": "clip", "transport": "mse", "audio": {"format": "wav"}}
    host, port = server.url.removeprefix("http://").split(":")
    _, waiter = await asyncio.get_running_loop().create_connection(
        lambda: Waiter(server.ws_url, hello, start, upload), host, int(port)
    )
    return waiter


async def run(clients: int, rounds: int, upload_s: float, settle_s: float) -> dict[str, object]:
    upload = tone_wav(upload_s) if upload_s > 0 else None
    with tempfile.TemporaryDirectory() as tmp, run_server(
        Path(tmp),
        MTS_ENGINE__SLOTS="1",
        MTS_QUEUE__GLOBAL_CAP=str(clients + 10),
        MTS_QUEUE__TIERS__NORMAL__CAP=str(clients + 10),
        MTS_QUEUE__COALESCE_S="0.25",
        MTS_QUEUE__HEARTBEAT_S="5",
    ) as server:
        proc = psutil.Process(server.process.pid)
        holder = await open_waiter(server, "holder")
        await asyncio.wait_for(holder.changed.wait(), 30)
        await asyncio.sleep(1.0)
        rss_before = proc.memory_info().rss
        waiters: list[Waiter] = []
        for i in range(clients):
            waiters.append(await open_waiter(server, f"user-{i}", upload))
        while any(w.position is None for w in waiters):
            await asyncio.sleep(0.1)
        if upload is not None:
            while metric(server, "mts_queued_audio_bytes") < clients * len(upload):
                await asyncio.sleep(0.2)
        await asyncio.sleep(1.0)
        rss_after = proc.memory_info().rss
        await asyncio.sleep(settle_s)
        rss_settled = proc.memory_info().rss
        lag_joining = metric(server, "mts_event_loop_lag_p99_seconds")
        buckets_before = lag_buckets(server)

        latencies: list[float] = []
        round_max: list[float] = []
        current = holder
        for _ in range(min(rounds, clients - 1)):
            await asyncio.sleep(0.3)
            waiting = [w for w in waiters if w.position and w.position > 0]
            before = {id(w): w.position for w in waiting}
            for w in waiting:
                w.changed.clear()
            t0 = time.perf_counter()
            current.send({"type": "cancel"})
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
            current = next(w for w in waiting if w.position == 0)
        result = {
            "clients": clients,
            "rounds": len(round_max),
            "p50_ms": 1000 * percentile(latencies, 0.50),
            "p99_ms": 1000 * percentile(latencies, 0.99),
            "max_ms": 1000 * max(latencies),
            "upload_bytes_per_client": len(upload) if upload is not None else 0,
            "kb_per_client": (rss_after - rss_before) / clients / 1024,
            "kb_per_client_settled": (rss_settled - rss_before) / clients / 1024,
            "settle_s": 1.0 + settle_s,
            "round_max_ms": [round(1000 * m, 1) for m in round_max],
            "loop_lag_p99_ms_while_joining": 1000 * lag_joining,
            "loop_lag_p99_ms_during_rounds_at_most": 1000 * lag_p99_between(buckets_before, lag_buckets(server)),
        }
        for w in [holder, *waiters]:
            w.close()
        return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--upload-s", type=float, default=0.0, help="each waiting client sends a clip this long")
    parser.add_argument("--settle-s", type=float, default=15.0,
                        help="measure memory again this much later (allocators give freed memory back with a delay)")
    args = parser.parse_args()
    result = asyncio.run(run(args.clients, args.rounds, args.upload_s, args.settle_s))
    print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in result.items()}, indent=2))


if __name__ == "__main__":
    main()
