"""The Python SDK on two real nodes sharing one line (behind the real nginx): a live request
granted the other node's slot follows the redirect by itself and streams there; the caller only
sees a ``Redirect`` event. (The command-line client, built on the SDK, follows a clip's redirect
in test_cluster_e2e.py.)"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from stream_server.sdk import Granted, Redirect, StreamStart, VideoFrame, connect
from tests.cluster.cluster_harness import run_cluster
from tests.cluster.test_cluster_e2e import hold
from tests.server_harness import mint

pytestmark = pytest.mark.slow


async def test_a_live_request_moves_to_the_node_of_its_slot_and_streams_what_it_is_sent(
    tmp_path: Path, redis_url: str, prefix: str
) -> None:
    with run_cluster(tmp_path, redis_url, prefix, nodes=2) as cluster:
        holder = await hold(cluster, 0, "holder")  # node 0 is full, node 1 free
        conn = await connect(cluster.ws(0), token=mint("sdk-live", "normal"))
        first_session = conn.welcome.session if conn.welcome else None
        live = await conn.live(avatar="astronaut")
        granted = await asyncio.wait_for(live.wait_granted(), 30)
        assert isinstance(granted, Granted)
        assert conn.welcome is not None and conn.welcome.session != first_session, "a new session on node 1"
        seen: list[Any] = []
        t = np.arange(16_000) / 16_000
        speech = (0.4 * np.sign(np.sin(2 * np.pi * 140 * t)) * 32767).astype(np.int16)
        sent = False
        async with asyncio.timeout(30):
            async for event in live:
                seen.append(event)
                if isinstance(event, VideoFrame) and not sent:
                    await live.send_audio(speech)
                    await live.end_utterance()
                    sent = True
                if isinstance(event, VideoFrame) and event.pts_s >= 2.0:
                    break
        await live.cancel()
        kinds = [type(e).__name__ for e in seen]
        assert "Redirect" in kinds and kinds.index("Redirect") < kinds.index("StreamStart"), kinds[:6]
        redirect = next(e for e in seen if isinstance(e, Redirect))
        assert redirect.url == cluster.ws(1)
        assert any(isinstance(e, StreamStart) for e in seen)
        video = [e for e in seen if isinstance(e, VideoFrame)]
        assert len(video) >= 50 and np.allclose(np.diff([f.pts_s for f in video]), 0.04, atol=1e-3)
        # the cancel gave node 1's slot back; node 0's holder keeps its own
        deadline = asyncio.get_running_loop().time() + 10
        while cluster.queue(1)["slots"]["busy"] != 1:
            assert asyncio.get_running_loop().time() < deadline, "the live session's slot was not released"
            await asyncio.sleep(0.1)
        await conn.close()
        await holder.close()
