"""Helpers the reliability tests share: clients that vanish, and the node's own count of what it holds."""

from __future__ import annotations

import asyncio
import socket
import struct
import time
from typing import Any

import httpx

from tests.server_harness import RunningServer, mint

ADMIN = mint("root", "vip", roles=["admin"])


def vanish(ws: Any, how: str = "reset") -> None:
    """The client is gone without a close handshake: ``"reset"`` (an RST, SO_LINGER 0) or
    ``"fin"`` (the TCP connection closed, no websocket close)."""
    if how == "reset":
        sock = ws.transport.get_extra_info("socket")
        if sock is not None and sock.fileno() >= 0:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        ws.transport.abort()
    else:
        ws.transport.close()


def admin_stats(server: RunningServer) -> dict[str, Any]:
    response = httpx.get(server.url + "/v1/admin/stats", headers={"Authorization": f"Bearer {ADMIN}"}, timeout=10)
    response.raise_for_status()
    stats: dict[str, Any] = response.json()
    return stats


def holds_nothing(stats: dict[str, Any]) -> bool:
    """No busy slot, nobody waiting, no session, connection, ticket handle or queued upload."""
    return (
        stats["slots"]["busy"] == 0
        and all(t["size"] == 0 for t in stats["waiting"].values())
        and stats["sessions_active"] == 0
        and stats["connections"] == 0
        and not any(stats["tickets"].values())
        and stats["queued_audio_bytes"] == 0
    )


async def wait_holds_nothing(server: RunningServer, timeout: float = 20.0) -> dict[str, Any]:
    """Once the clients are gone (parked tickets expire after ``queue.resume_grace_s``)."""
    deadline = time.monotonic() + timeout
    while not holds_nothing(stats := await asyncio.to_thread(admin_stats, server)):
        if time.monotonic() > deadline:
            raise AssertionError(f"the server still holds something once the clients are gone: {stats}")
        await asyncio.sleep(0.05)
    # and it let go of each upload where its request ended, not later through the garbage collector
    assert "dropped without being closed" not in server.log(), "an audio upload was released late"
    return stats
