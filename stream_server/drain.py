"""Graceful drain on SIGTERM (Kubernetes stops a pod that way).

The first SIGTERM does not stop the server: the node turns not ready (``/readyz`` answers 503,
so the load balancer sends no new clients), reserves no new slot, and the sessions streaming here
finish, for at most ``cluster.drain_timeout_s``; then uvicorn shuts down as usual and the
sockets still open close. Waiting clients hear nothing special: their tickets keep their places
(in Redis), and they resume on another node. A second SIGTERM, or SIGINT, stops at once.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from types import FrameType

import uvicorn

from stream_server.app import StreamServerApp

log = logging.getLogger(__name__)


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, app: StreamServerApp, drain_timeout_s: float) -> None:
        super().__init__(config)
        self.stream_app = app
        self.drain_timeout_s = drain_timeout_s
        self._drain: asyncio.Task[None] | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        node = self.stream_app.node
        if sig != signal.SIGTERM or self._drain is not None or node is None or not node.ready:
            super().handle_exit(sig, frame)
            return
        loop = asyncio.get_running_loop()
        self._drain = loop.create_task(self._drain_then_exit(sig, frame), name="drain")

    async def _drain_then_exit(self, sig: int, frame: FrameType | None) -> None:
        node = self.stream_app.node
        assert node is not None
        log.info("SIGTERM: draining (no new grants; waiting for %d session(s))", node.admission.serving_count)
        try:
            await node.drain()
        except Exception:
            log.exception("could not mark the node as draining in the shared store")
        if not await node.wait_drained(self.drain_timeout_s):
            log.warning("drain timeout: %d session(s) still streaming are stopped", node.admission.serving_count)
        super().handle_exit(sig, frame)
