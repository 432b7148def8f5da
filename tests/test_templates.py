"""Template phrases on a real server: the first request renders one like any clip, after that it
is answered from the clip store byte for byte without queueing, even with the only slot busy;
``musetalk-stream pregen`` renders them ahead."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from stream_server.templates import TemplateError, TemplateLibrary
from tests.server_harness import ROOT, TEST_SECRET, Client, RunningServer, decode_mp4, mint, run_server

LIVE = {"avatar": "astronaut", "mode": "live", "transport": "mse", "audio": {"format": "pcm_s16le"}}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("templates")
    with run_server(folder, MTS_ENGINE__SLOTS="1", MTS_LIMITS__START_BURST="50") as running:
        yield running


async def say(server: RunningServer, sub: str, template: str) -> Client:
    client = await Client.connect(server)
    await client.hello(mint(sub, "normal"))
    await client.send("start", avatar="astronaut", mode="clip", transport="mse", template=template)
    done = await client.expect("done", "error", timeout=120)
    assert done["type"] == "done", done
    return client


def test_the_shipped_library_names_real_audio() -> None:
    library = TemplateLibrary.load()
    assert library.ids() == ["goodbye", "hello", "thanks"]
    hello = library.get("hello")
    assert hello is not None and hello.text and hello.read_audio()[:4] == b"RIFF"


def test_a_broken_library_names_the_entry(tmp_path: Path) -> None:
    broken = tmp_path / "t.toml"
    broken.write_text('[hi]\naudio = "missing.wav"\n')
    with pytest.raises(TemplateError, match=r"\[hi\].*missing.wav"):
        TemplateLibrary.load(broken)


async def test_a_rendered_template_is_replayed_byte_for_byte_without_queueing(server: RunningServer) -> None:
    first = await say(server, "t-first", "hello")
    assert first.of_type("queued") and first.of_type("granted")  # not rendered yet: queued like any clip
    frames, _, audio_s = decode_mp4(first.media_bytes)
    assert len(frames) == first.of_type("done")[0]["frames"] > 0 and audio_s > 0

    holder = await Client.connect(server)
    await holder.hello(mint("t-holder", "vip"))
    await holder.send("start", **LIVE)
    await holder.expect("granted")  # the only slot is taken now
    again = await say(server, "t-again", "hello")
    assert again.of_type("queued") == [] and again.of_type("granted") == []
    assert again.media_bytes == first.media_bytes
    assert again.of_type("done")[0]["clip"] == first.of_type("done")[0]["clip"]
    await holder.close()
    for client in (first, again):
        await client.close()


async def test_template_misuse_gets_clear_errors(server: RunningServer) -> None:
    client = await Client.connect(server)
    await client.hello(mint("t-bad", "normal"))
    await client.send("start", avatar="astronaut", mode="clip", transport="mse", template="nope")
    error = await client.expect("error")
    assert error["code"] == "bad_message" and "hello" in error["message"]
    await client.send("start", avatar="astronaut", mode="clip", transport="mse", template="hello",
                      audio={"format": "wav"})
    error = await client.expect("error")
    assert error["code"] == "bad_message" and "no audio" in error["message"]
    await client.send("start", avatar="astronaut", mode="live", transport="mse", template="hello")
    assert (await client.expect("error"))["code"] == "bad_message"
    await client.close()


async def test_pregen_renders_ahead_so_the_first_user_is_never_queued(server: RunningServer) -> None:
    env = {**os.environ, "MTS_AUTH__HS256_SECRET": TEST_SECRET, "MTS_SERVER__DATA_DIR": str(server.data_dir)}
    done = subprocess.run(
        [sys.executable, "-m", "stream_server", "pregen", "--avatar", "astronaut", "--template", "thanks",
         "--server", server.url],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=180,
    )
    assert done.returncode == 0, done.stderr
    assert "astronaut/thanks" in done.stderr
    holder = await Client.connect(server)
    await holder.hello(mint("t-holder-2", "vip"))
    await holder.send("start", **LIVE)
    await holder.expect("granted")
    first_user = await say(server, "t-user", "thanks")
    assert first_user.of_type("queued") == [] and len(decode_mp4(first_user.media_bytes)[0]) > 0
    await holder.close()
    await first_user.close()

    unknown = subprocess.run(
        [sys.executable, "-m", "stream_server", "pregen", "--avatar", "astronaut", "--template", "nope",
         "--server", server.url],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )
    assert unknown.returncode == 2 and "nope" in unknown.stderr
