"""The web pages against the real server, in Debian's Chromium driven by Playwright.

Chromium runs with fake media devices, loopback WebRTC and no mDNS candidates; both peers use empty
ICE server lists. Every test leaves a screenshot in ``test-artifacts/`` and fails on any uncaught
page error. Skipped when Playwright or Chromium is missing (``pip install playwright`` and
``apt-get install chromium``; ``playwright install`` is not needed).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import http.server
import os
import re
import shutil
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.server_harness import ROOT, Client, RunningServer, mint, run_server

async_api = pytest.importorskip("playwright.async_api", reason="Playwright is not installed (pip install playwright)")
CHROMIUM = os.environ.get("MTS_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
if not Path(CHROMIUM).exists():
    pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium)", allow_module_level=True)

ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM_ARGS = [
    "--use-fake-ui-for-media-stream",
    "--use-fake-device-for-media-stream",
    "--allow-loopback-in-peer-connection",
    "--disable-features=WebRtcHideLocalIpsWithMdns",
    "--autoplay-policy=no-user-gesture-required",
    "--no-sandbox",
]
WAIT_MS = 30_000
EXPECTED_REFUSAL = re.compile(r"Failed to load resource: the server responded with a status of 40[13]")


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RunningServer]:
    with run_server(tmp_path, MTS_ENGINE__SLOTS="2") as running:
        yield running


def is_error(msg: Any) -> bool:
    """A console error, except the log line of a refused admin request (the admin test's point)."""
    return bool(msg.type == "error" and not EXPECTED_REFUSAL.search(msg.text))


@pytest.fixture
async def page(request: pytest.FixtureRequest) -> AsyncIterator[Any]:
    """A fresh Chromium page; its uncaught errors fail the test; a screenshot is kept at the end."""
    errors: list[str] = []
    async with async_api.async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            context = await browser.new_context(viewport={"width": 1200, "height": 900}, locale="en-US")
            tab = await context.new_page()
            tab.on("pageerror", lambda exc: errors.append(f"pageerror: {exc}"))
            tab.on("console", lambda msg: errors.append(f"console: {msg.text}") if is_error(msg) else None)
            yield tab
            ARTIFACTS.mkdir(exist_ok=True)
            await tab.screenshot(path=str(ARTIFACTS / f"{request.node.name}.png"), full_page=True)
        finally:
            await browser.close()
    assert not errors, errors


async def state_is(tab: Any, *states: str, timeout: float = WAIT_MS) -> str:
    """Wait until the page's status is in one of ``states``; returns it. Fails early on an error."""
    expected = list(states)
    handle = await tab.wait_for_function(
        """(expected) => {
            const s = document.querySelector('#status').dataset.state;
            return (expected.includes(s) || s === 'error') && s;
        }""",
        arg=expected,
        timeout=timeout,
    )
    state = await handle.json_value()
    if state not in states:
        raise AssertionError(f"page status {state}: {await tab.text_content('#status')}")
    return str(state)


async def current_time_grows(tab: Any, selector_js: str, seconds: float = 1.5) -> tuple[float, float]:
    """video.currentTime now and ``seconds`` later."""
    before = await tab.evaluate(f"() => {selector_js}.currentTime")
    await asyncio.sleep(seconds)
    after = await tab.evaluate(f"() => {selector_js}.currentTime")
    return before, after


async def open_index(tab: Any, server: RunningServer) -> None:
    await tab.goto(server.url + "/")
    await tab.wait_for_function("document.querySelector('#avatar').value === 'astronaut'")


async def live_client(server: RunningServer, sub: str, tier: str) -> Client:
    client = await Client.connect(server)
    await client.hello(mint(sub, tier))
    await client.send("start", avatar="astronaut", mode="live", transport="mse")
    return client


def dedupe(values: list[int]) -> list[int]:
    return [v for i, v in enumerate(values) if i == 0 or values[i - 1] != v]


async def test_queue_positions_change_then_granted(server: RunningServer, page: Any) -> None:
    # Two live sessions hold both slots; two more wait ahead of the page (same tier, earlier).
    holders = [await live_client(server, f"holder{i}", "normal") for i in range(2)]
    for holder in holders:
        await holder.expect("granted")
    waiters = [await live_client(server, f"waiter{i}", "low") for i in range(2)]
    for i, waiter in enumerate(waiters, start=1):
        assert (await waiter.expect("queued"))["position"] == i

    await open_index(page, server)
    await page.select_option("#sample", "vowels")
    await page.click("#start")
    position = "document.querySelector('#status').dataset.position"
    await page.wait_for_function(f"{position} === '3'")
    assert await page.get_attribute("#status", "aria-live") == "polite"
    assert "position 3 of 3" in (await page.text_content("#status") or "")
    await page.screenshot(path=str(ARTIFACTS / "queue-position-3.png"))

    await waiters[0].send("cancel")
    await page.wait_for_function(f"{position} === '2'")
    vip = await live_client(server, "vip0", "vip")  # joins ahead: the page's position grows
    await page.wait_for_function(f"{position} === '3'")
    await waiters[1].send("cancel")
    await vip.send("cancel")
    await page.wait_for_function(f"{position} === '1'")
    assert "position 1" in (await page.text_content("#status") or "")
    assert await page.evaluate("document.querySelector('#queue-bar').value") > 0

    # The socket drops while queued: the SDK resumes the same session and keeps the place.
    session = await page.evaluate("window.mts.client.welcome.session")
    seen_before = len(await page.evaluate("window.mts.positions"))
    await page.evaluate("window.mts.client.ws.close()")
    await page.wait_for_function(
        f"window.mts.client.state === 'queued' && window.mts.positions.length > {seen_before}", timeout=WAIT_MS
    )
    assert await page.evaluate("window.mts.client.welcome.session") == session
    assert (await page.evaluate("window.mts.positions"))[-1] == 1

    # Granted while the tab is hidden: a notification (the API stubbed, headless has none).
    await page.evaluate(
        """() => {
            window.notes = [];
            window.Notification = class { static permission = 'granted';
                constructor(title) { window.notes.push(title); } close() {} };
            Object.defineProperty(document, 'hidden', { configurable: true, get: () => true });
        }"""
    )
    await holders[0].send("cancel")
    await state_is(page, "granted", "streaming", "done")
    assert await page.evaluate("window.notes") == ["Your avatar video is starting"]
    await state_is(page, "done")
    seen = dedupe(await page.evaluate("window.mts.positions"))
    assert seen[:3] == [3, 2, 3] and seen[-1] == 1, seen
    for client in [*holders, *waiters, vip]:
        await client.close()


async def test_mse_playback_advances(server: RunningServer, page: Any) -> None:
    await open_index(page, server)
    await page.select_option("#sample", "long")
    assert await page.is_checked("input[name=transport][value=mse]")
    await page.click("#start")
    await state_is(page, "streaming", "done")
    await page.wait_for_function("document.querySelector('#video').currentTime > 0.2", timeout=WAIT_MS)
    before, after = await current_time_grows(page, "document.querySelector('#video')")
    assert after - before > 0.5, (before, after)
    await state_is(page, "done")
    video = await page.evaluate(
        """() => { const v = document.querySelector('#video');
                   return { error: v.error && v.error.message, frames: v.getVideoPlaybackQuality().totalVideoFrames,
                            src: v.src, latency: window.mts.latency }; }"""
    )
    assert video["error"] is None
    assert video["src"].startswith("blob:")
    assert video["frames"] > 10
    assert video["latency"] is not None and video["latency"] >= 0
    assert (await page.text_content("#stat-transport")) == "mse"
    assert await page.is_visible("#download")
    href = await page.get_attribute("#download", "href")
    assert href and httpx.head(href, timeout=10).status_code == 200

    # The same clip again: a replay from the server's clip cache (no progress; init box split).
    logged = await page.evaluate("document.querySelectorAll('#log li').length")
    await page.click("#start")
    await state_is(page, "done")
    replay = await page.evaluate(f"[...document.querySelectorAll('#log li')].slice({logged}).map(li => li.textContent)")
    assert any(" stream " in line for line in replay) and not any(" progress " in line for line in replay), replay
    video = "document.querySelector('#video')"
    await page.wait_for_function(f"{video}.src.startsWith('blob:') && {video}.currentTime > 0.3", timeout=WAIT_MS)
    assert await page.evaluate(f"{video}.error") is None


async def test_webrtc_playback_decodes_frames(server: RunningServer, page: Any) -> None:
    assert await play_webrtc(server, page) in ("video/VP8", "video/H264")


async def test_webrtc_in_process_mode_plays_the_workers_h264(tmp_path: Path, page: Any) -> None:
    with run_server(tmp_path, MTS_ENGINE__SLOTS="2", MTS_ENGINE__PROCESS_MODE="process",
                    MTS_ENGINE__WORKERS="1") as running:
        assert await play_webrtc(running, page) == "video/H264"


async def play_webrtc(server: RunningServer, page: Any) -> str:
    """Play the long sample over WebRTC: frames decoded, the video element's time moving, ``done``.
    Returns the video codec Chromium received."""
    await open_index(page, server)
    await page.select_option("#sample", "long")
    await page.check("input[name=transport][value=webrtc]")
    await page.click("#start")
    state = await page.wait_for_function(
        "['streaming', 'done', 'error'].includes(document.querySelector('#status').dataset.state) "
        "&& document.querySelector('#status').dataset.state",
        timeout=WAIT_MS,
    )
    if await state.json_value() == "error":
        raise AssertionError(await page.text_content("#status"))
    # framesDecoded from the receiver's own statistics, while the clip plays.
    deadline = time.monotonic() + WAIT_MS / 1000
    while True:
        stats = await page.evaluate(
            """async () => {
                const pc = window.mts.client.pc;
                const out = {};
                if (pc) (await pc.getStats()).forEach((s) => { if (s.type === 'inbound-rtp') out[s.kind] = s; });
                const codec = out.video ? (await pc.getStats()).get(out.video.codecId) : null;
                return { frames: out.video?.framesDecoded ?? 0, audio: out.audio?.packetsReceived ?? 0,
                         codec: codec?.mimeType ?? "" };
            }"""
        )
        if stats["frames"] > 10 and stats["audio"] > 0:
            break
        assert time.monotonic() < deadline, f"no frames decoded: {stats}"
        await asyncio.sleep(0.25)
    video = "document.querySelector('#video')"
    assert await page.evaluate(f"{video}.srcObject instanceof MediaStream")
    before, after = await current_time_grows(page, video)
    assert after > before
    assert (await page.text_content("#stat-transport")) == "webrtc"
    await state_is(page, "done")
    return str(stats["codec"])


async def test_embed_demo_plays(server: RunningServer, page: Any) -> None:
    await page.goto(server.url + "/demo-chat.html")
    widget = "document.querySelector('musetalk-avatar')"
    await page.wait_for_function(f"{widget} && typeof {widget}.speak === 'function'")
    await page.fill("#text", "Hello there, this is the chat demo speaking for a little while.")
    await page.press("#text", "Enter")
    assert await page.text_content("#messages li") == "Hello there, this is the chat demo speaking for a little while."
    await page.wait_for_function(f"{widget}.video.currentTime > 0.2", timeout=WAIT_MS)
    before, after = await current_time_grows(page, f"{widget}.video")
    assert after - before > 0.5, (before, after)
    assert await page.evaluate(f"{widget}.video.error") is None
    await page.wait_for_function(f"{widget}.client.request === null", timeout=WAIT_MS)
    assert await page.evaluate(f"{widget}.video.getVideoPlaybackQuality().totalVideoFrames") > 10


@contextlib.contextmanager
def static_site(folder: Path) -> Iterator[str]:
    """Another origin (a chat app's): ``folder`` served over HTTP on a free port."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    site = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=site.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{site.server_address[1]}"
    finally:
        site.shutdown()
        site.server_close()


async def test_widget_embeds_in_a_page_of_another_origin(tmp_path: Path, page: Any) -> None:
    site_dir = tmp_path / "site"
    site_dir.mkdir()
    with static_site(site_dir) as chat, run_server(tmp_path, MTS_SERVER__ALLOWED_ORIGINS=f'["{chat}"]') as server:
        # The widget's one-line form; no `server` attribute: it uses the server embed.js came from.
        (site_dir / "room.html").write_text(
            f"""<!doctype html><title>chat</title><link rel="icon" href="data:,">
            <script type="module" src="{server.url}/embed.js"></script>
            <musetalk-avatar avatar="astronaut"></musetalk-avatar>"""
        )
        await page.goto(f"{chat}/room.html")
        widget = "document.querySelector('musetalk-avatar')"
        await page.wait_for_function(f"typeof {widget}.speak === 'function'")
        await page.evaluate(
            f"""async () => {{
                const {{ encodeWav }} = await import('{server.url}/embed.js');
                const n = 16000 * 2, s = new Float32Array(n);
                for (let i = 0; i < n; i++) s[i] = 0.4 * Math.sign(Math.sin(i * 0.055)) * (i % 8000 < 5000);
                window.spoken = {widget}.speak(new Blob([encodeWav(s, 16000)]));
            }}"""
        )
        await page.wait_for_function(f"{widget}.video.currentTime > 0.3", timeout=WAIT_MS)
        done = await page.evaluate("window.spoken")
        assert done["frames"] == 50, done
        assert done["clip"].startswith("/v1/clips/")


async def test_admin_page_needs_an_admin_token(server: RunningServer, page: Any) -> None:
    client = await Client.connect(server)
    await client.hello()
    await client.send("start", avatar="nobody", mode="live", transport="mse")
    assert (await client.expect("error"))["code"] == "unknown_avatar"
    await client.close()

    assert server.get("/v1/admin/stats").status_code == 403
    assert server.get("/v1/admin/stats", headers={"Authorization": f"Bearer {mint('u', 'vip')}"}).status_code == 403
    assert server.get("/v1/admin/stats", headers={"Authorization": "Bearer not-a-token"}).status_code == 401

    await page.goto(server.url + "/admin")
    await page.click("text=Show stats")
    await page.wait_for_selector("#message.error")
    assert not await page.is_visible("#stats-panel")

    await page.fill("#token", mint("u", "vip"))
    await page.click("text=Show stats")
    await page.wait_for_function("document.querySelector('#message').textContent.includes('403')")
    assert not await page.is_visible("#stats-panel")

    await page.fill("#token", mint("root", "vip", roles=["admin"]))
    await page.click("text=Show stats")
    await page.wait_for_selector("#stats-panel", state="visible")
    assert await page.text_content("#slots-total") == "2"
    assert await page.text_content("#slots-free") == "2"
    assert await page.text_content("tr[data-tier=low] td") == "0"
    assert "unknown_avatar" in (await page.text_content("#errors") or "")
    assert float(await page.text_content("#fps") or "nan") >= 0
    # It refreshes by itself (every 2 s).
    updated = await page.text_content("#message")
    assert updated and updated.startswith("Updated")
    await page.wait_for_function("(text) => document.querySelector('#message').textContent !== text", arg=updated)


async def test_admin_page_uploads_an_avatar_and_shows_its_job(
    server: RunningServer, page: Any, tmp_path: Path
) -> None:
    astronaut = Path(__file__).resolve().parents[2] / "inference" / "assets" / "astronaut.png"
    faceless = tmp_path / "faceless.png"  # a real picture, so it passes the upload checks
    Image.fromarray(np.tile(np.linspace(0, 255, 320, dtype=np.uint8)[None, :, None], (240, 1, 3))).save(faceless)
    await page.goto(server.url + "/admin")
    await page.fill("#token", mint("root", "vip", roles=["admin"]))
    await page.click("text=Show stats")
    await page.wait_for_selector("#avatars-panel", state="visible")
    await page.set_input_files("#avatar-file", str(astronaut))
    await page.fill("#avatar-id", "browser-made")
    await page.click("#upload button[type=submit]")
    await page.wait_for_function("document.querySelector('#avatar-job-text').textContent === 'ready'", timeout=WAIT_MS)
    assert await page.get_attribute("#avatar-progress", "value") == "1"
    await page.wait_for_selector("tr[data-avatar=browser-made]")
    assert server.get("/v1/avatars/browser-made").json()["status"] == "ready"

    await page.set_input_files("#avatar-file", str(faceless))
    await page.fill("#avatar-id", "browser-bad")
    await page.click("#upload button[type=submit]")
    await page.wait_for_function(
        "document.querySelector('#avatar-job-text').textContent.startsWith('failed')", timeout=WAIT_MS
    )
    failed = await page.text_content("#avatar-job-text") or ""
    assert "no face found in any frame" in failed, failed

    await page.click("tr[data-avatar=browser-made] button")
    await page.wait_for_selector("tr[data-avatar=browser-made]", state="detached")
    assert server.get("/v1/avatars/browser-made").status_code == 404


async def test_recorded_microphone_is_converted_and_plays(server: RunningServer, page: Any) -> None:
    # Chromium's MediaRecorder makes WebM/Opus, which the server does not take: the SDK sends WAV.
    await open_index(page, server)
    await page.check("input[name=source][value=record]")
    await page.click("#record")
    await page.wait_for_function("document.querySelector('#record').getAttribute('aria-pressed') === 'true'")
    await asyncio.sleep(1.5)
    await page.click("#record")
    await page.wait_for_function("window.mts.recorded !== null")
    assert "webm" in await page.evaluate("window.mts.recorded.type")
    await page.click("#start")
    await state_is(page, "done")
    assert "Done" in (await page.text_content("#status") or "")
    assert await page.evaluate("document.querySelector('#video').error") is None


async def test_live_microphone_streams_until_cancelled(server: RunningServer, page: Any) -> None:
    await page.goto(server.url + "/")
    await page.evaluate("localStorage.setItem('mts.lang', 'zh')")
    await page.reload()
    await page.wait_for_function("document.querySelector('#avatar').value === 'astronaut'")
    assert await page.evaluate("document.documentElement.lang") == "zh-CN"
    assert await page.text_content("#start") == "开始"
    await page.click("#lang")
    assert await page.text_content("#start") == "Start"

    await page.check("input[name=source][value=live]")
    await page.click("#start")
    await state_is(page, "live")
    await page.wait_for_function("document.querySelector('#video').currentTime > 0.5", timeout=WAIT_MS)
    before, after = await current_time_grows(page, "document.querySelector('#video')")
    assert after - before > 0.5, (before, after)
    assert server.get("/v1/queue").json()["slots"]["busy"] == 1
    await page.keyboard.press("Escape")
    await state_is(page, "idle")
    assert await page.is_enabled("#start")
    deadline = time.monotonic() + 10
    while server.get("/v1/queue").json()["slots"]["busy"] != 0:
        assert time.monotonic() < deadline, "the slot was not released after cancel"
        await asyncio.sleep(0.1)
