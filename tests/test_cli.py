"""The command-line client and token command against a real server: no tracebacks, no wasted work."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import av
import pytest

from tests.server_harness import ROOT, Client, RunningServer, mint, run_server, tone_wav

LIVE = {"avatar": "astronaut", "mode": "live", "transport": "mse", "audio": {"format": "pcm_s16le"}}


def cli_env(**extra: str) -> dict[str, str]:
    """The caller's environment without any MTS_ setting, the worktree's code first."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MTS_")}
    env["PYTHONPATH"] = str(ROOT)
    return {**env, **extra}


def cli(*args: str, cwd: Path = ROOT, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "stream_server", *args], cwd=cwd, env=cli_env(**env),
        capture_output=True, text=True, timeout=120,
    )


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    with run_server(tmp_path_factory.mktemp("cli"), MTS_ENGINE__SLOTS="1") as running:
        yield running


def frames_streamed(server: RunningServer) -> float:
    for line in server.get("/metrics").text.splitlines():
        if line.startswith("mts_frames_total "):
            return float(line.split()[1])
    raise AssertionError("mts_frames_total missing from /metrics")


def test_client_writes_a_playable_mp4(server: RunningServer, tmp_path: Path) -> None:
    audio = tmp_path / "speech.wav"
    audio.write_bytes(tone_wav(1.2))
    out = tmp_path / "out.mp4"
    done = cli("client", "--avatar", "astronaut", "--audio", str(audio), "-o", str(out), "--server", server.url)
    assert done.returncode == 0, done.stderr
    assert "position 1" in done.stderr and "done: 30 frames" in done.stderr
    with av.open(str(out)) as container:
        assert sum(1 for _ in container.decode(video=0)) == 30
        assert container.streams.audio, "the MP4 has sound"


def test_output_into_a_missing_folder_fails_before_generating(server: RunningServer, tmp_path: Path) -> None:
    audio = tmp_path / "speech.wav"
    audio.write_bytes(tone_wav(1.0))
    before = frames_streamed(server)
    out = tmp_path / "no" / "such" / "folder" / "out.mp4"
    done = cli("client", "--avatar", "astronaut", "--audio", str(audio), "-o", str(out), "--server", server.url)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [f"error: cannot write {out}: the folder {out.parent} does not exist"]
    assert frames_streamed(server) == before, "nothing was generated for a clip that could not be saved"


def test_missing_audio_file_is_one_line(server: RunningServer, tmp_path: Path) -> None:
    done = cli("client", "--avatar", "astronaut", "--audio", str(tmp_path / "nope.wav"),
               "-o", str(tmp_path / "out.mp4"), "--server", server.url)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "cannot read" in done.stderr


async def test_ctrl_c_while_queued_prints_one_line_and_gives_the_place_back(
    server: RunningServer, tmp_path: Path
) -> None:
    holder = await Client.connect(server)
    await holder.hello(mint("cli-holder", "vip"))
    await holder.send("start", **LIVE)
    await holder.expect("granted")
    audio = tmp_path / "speech.wav"
    audio.write_bytes(tone_wav(1.0))
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "stream_server", "client", "--avatar", "astronaut", "--audio", str(audio),
        "-o", str(tmp_path / "out.mp4"), "--server", server.url, "--token", mint("cli-user", "normal"),
        cwd=ROOT, env=cli_env(), stderr=asyncio.subprocess.PIPE,
    )
    assert process.stderr is not None
    lines: list[str] = []
    try:
        while not any("in line: position 1" in line for line in lines):
            line = await asyncio.wait_for(process.stderr.readline(), 30)
            assert line, f"the client ended before it was queued: {lines}"
            lines.append(line.decode())
        assert server.get("/v1/queue").json()["tiers"]["normal"]["size"] == 1
        process.send_signal(signal.SIGINT)
        rest = (await asyncio.wait_for(process.stderr.read(), 30)).decode()
        code = await asyncio.wait_for(process.wait(), 30)
    finally:
        if process.returncode is None:
            process.kill()
        await holder.close()
    assert "Traceback" not in rest
    assert rest.strip().splitlines() == ["interrupted while in line at position 1: the request was cancelled"]
    assert code == 130
    # The place was given back at once, not parked for the resume grace.
    assert server.get("/v1/queue").json()["tiers"]["normal"]["size"] == 0


def test_token_from_another_folder_finds_the_servers_secret_or_says_why(tmp_path: Path) -> None:
    (tmp_path / "node").mkdir()
    with run_server(tmp_path / "node", MTS_AUTH__HS256_SECRET="") as server:
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        lost = cli("token", "--sub", "ann", "--tier", "vip", cwd=elsewhere)
        assert lost.returncode == 2 and lost.stdout == ""
        assert "Traceback" not in lost.stderr and "hs256.secret" in lost.stderr
        assert str(elsewhere / "var" / "hs256.secret") in lost.stderr
        assert not (elsewhere / "var").exists(), "no new secret was made that the server would reject"

        found = cli("token", "--sub", "ann", "--tier", "vip", cwd=elsewhere, MTS_SERVER__DATA_DIR=str(server.data_dir))
        assert found.returncode == 0, found.stderr

        async def hello() -> dict[str, object]:
            client = await Client.connect(server)
            try:
                return await client.hello(found.stdout.strip())
            finally:
                await client.close()

        welcome = asyncio.run(hello())
        assert welcome["tier"] == "vip"
