"""The page and the widget on two nodes sharing one line in the real Redis, behind the real nginx:
when the slot is on the other node, they follow the redirect and play the stream there, and the
user sees nothing of it but the video (Chromium driven by Playwright, as in test_pages.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.browser import test_pages
from tests.browser.test_pages import WAIT_MS, current_time_grows, state_is, static_site
from tests.cluster.cluster_harness import run_cluster
from tests.cluster.redis_helpers import SHARED_URL, delete_prefix, shared_redis_available, unique_prefix
from tests.cluster.test_cluster_e2e import hold

pytestmark = pytest.mark.slow
page = test_pages.page  # the Chromium page fixture, its error checks and screenshot


@pytest.fixture
def prefix() -> Iterator[str]:
    if not shared_redis_available():
        pytest.fail(f"these tests need Redis at {SHARED_URL} (.ci/run starts one)")
    name = unique_prefix()
    yield name
    delete_prefix(SHARED_URL, name)


async def test_the_page_waits_on_one_node_and_plays_on_the_other(tmp_path: Path, prefix: str, page: Any) -> None:
    with run_cluster(tmp_path, SHARED_URL, prefix, nodes=2) as cluster:
        holders = [await hold(cluster, n, f"holder{n}") for n in range(2)]  # both slots busy
        await page.goto(cluster.lb_url + "/node/0/")  # the page, and so its socket, on node 0
        await page.wait_for_function("document.querySelector('#avatar').value === 'astronaut'")
        await page.select_option("#sample", "long")
        await page.click("#start")
        await page.wait_for_function("document.querySelector('#status').dataset.position === '1'")
        assert await page.evaluate("window.mts.client.ws.url") == cluster.ws(0)

        await holders[1].send("cancel")  # node 1's slot frees: the page's ticket is granted there
        await state_is(page, "streaming", "done")
        assert await page.evaluate("window.mts.client.ws.url") == cluster.ws(1), "it moved to node 1"
        video = "document.querySelector('#video')"
        await page.wait_for_function(f"{video}.currentTime > 0.2", timeout=WAIT_MS)
        before, after = await current_time_grows(page, video)
        assert after - before > 0.5, (before, after)
        await state_is(page, "done")
        assert await page.evaluate(f"{video}.error") is None
        assert await page.evaluate(f"{video}.getVideoPlaybackQuality().totalVideoFrames") > 10
        shown = await page.evaluate("[...document.querySelectorAll('#log li')].map(li => li.textContent)")
        assert not any(" error {" in line for line in shown), shown
        assert sum(" granted {" in line for line in shown) == 1, shown
        # the clip is kept by the node that made it, and the page links it there
        href = await page.get_attribute("#download", "href")
        assert href is not None and href.startswith(cluster.lb_url + "/node/1/v1/clips/"), href
        assert httpx.head(href, timeout=10).status_code == 200
        for holder in holders:
            await holder.close()


async def test_the_widget_of_a_chat_app_is_granted_the_other_nodes_slot_and_plays(
    tmp_path: Path, prefix: str, page: Any
) -> None:
    site_dir = tmp_path / "site"
    site_dir.mkdir()
    with static_site(site_dir) as chat, run_cluster(
        tmp_path, SHARED_URL, prefix, nodes=2, MTS_SERVER__ALLOWED_ORIGINS=f'["{chat}"]'
    ) as cluster:
        holder = await hold(cluster, 0, "holder")  # node 0 is full, node 1 free
        # The widget's one-line form, from node 0 (its socket goes there).
        (site_dir / "room.html").write_text(
            f"""<!doctype html><title>chat</title><link rel="icon" href="data:,">
            <script type="module" src="{cluster.lb_url}/node/0/embed.js"></script>
            <musetalk-avatar avatar="astronaut"></musetalk-avatar>"""
        )
        await page.goto(f"{chat}/room.html")
        widget = "document.querySelector('musetalk-avatar')"
        await page.wait_for_function(f"typeof {widget}.speak === 'function'")
        await page.evaluate(
            f"""async () => {{
                const {{ encodeWav }} = await import('{cluster.lb_url}/node/0/embed.js');
                const w = {widget};
                window.states = [];
                window.errors = [];
                w.addEventListener('state', (e) => window.states.push(e.detail.state));
                w.addEventListener('error', (e) => window.errors.push(e.detail));
                const n = 16000 * 2, s = new Float32Array(n);
                for (let i = 0; i < n; i++) s[i] = 0.4 * Math.sign(Math.sin(i * 0.055)) * (i % 8000 < 5000);
                window.spoken = w.speak(new Blob([encodeWav(s, 16000)]));
            }}"""
        )
        await page.wait_for_function(f"{widget}.video.currentTime > 0.3", timeout=WAIT_MS)
        done = await page.evaluate("window.spoken")
        assert done["frames"] == 50, done
        assert done["clip"].startswith(cluster.lb_url + "/node/1/v1/clips/"), done
        assert "redirecting" in await page.evaluate("window.states")
        assert await page.evaluate("window.errors") == []
        assert await page.evaluate(f"{widget}.client.ws.url") == cluster.ws(1)
        assert await page.evaluate(f"{widget}.video.error") is None
        status = await page.evaluate(f"{widget}.shadowRoot.querySelector('.status').textContent")
        assert "error" not in status, status
        await holder.close()
