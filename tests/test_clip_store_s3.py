"""The clip store on an S3-compatible server (moto's server mode on loopback, a real HTTP S3 API):
whole clips only, the avatar index, eviction by size, and a real server process that keeps its
clips there and points ``done.clip`` at a CDN."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import boto3
import httpx
import pytest

from stream_server.clips import ClipStore, clip_key
from stream_server.clips.s3 import S3ClipBackend
from tests.server_harness import Client, mint, run_server, tone_wav


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    log = (tmp_path_factory.mktemp("moto") / "moto.log").open("wb")
    process = subprocess.Popen(
        [str(Path(sys.executable).with_name("moto_server")), "-p", str(port), "-H", "127.0.0.1"],
        stdout=log, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(url, timeout=1)
                break
            except httpx.HTTPError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise RuntimeError("moto_server did not start") from None
                time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        process.wait(10)
        log.close()


@pytest.fixture
def credentials(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    values = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    return values


def bucket(endpoint: str, name: str) -> str:
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=name)
    return name


def store_on(endpoint: str, name: str, tmp_path: Path, max_bytes: int = 10 << 20) -> ClipStore:
    backend = S3ClipBackend(bucket(endpoint, name), prefix="clips/", endpoint_url=endpoint, region="us-east-1")
    return ClipStore(tmp_path / "staging", max_bytes, backend=backend)


def put(store: ClipStore, key: str, avatar: str, size: int) -> None:
    writer = store.writer(key, avatar)
    writer.write(bytes([len(avatar)]) * size)
    writer.commit({"frames": 1, "mime": "video/mp4", "width": 2, "height": 2})


def test_clips_round_trip_and_an_avatar_takes_only_its_own(
    s3_endpoint: str, credentials: object, tmp_path: Path
) -> None:
    store = store_on(s3_endpoint, "round-trip", tmp_path)
    a, b = clip_key(n="a"), clip_key(n="b")
    writer = store.writer(a, "anna")
    writer.write(b"partial")
    assert not store.exists(a)  # nothing is visible before the commit
    writer.write(b" and the rest")
    writer.commit({"frames": 3})
    put(store, b, "bert", 100)
    found = store.read(a)
    assert found is not None and found[0] == b"partial and the rest"
    assert found[1] == {"frames": 3, "avatar": "anna"}
    assert store.path(a) is None  # not a local file: served as bytes or through the CDN
    assert store.remove_avatar("anna") == 1
    assert not store.exists(a) and store.exists(b) and store.read(a) is None
    assert list((tmp_path / "staging").iterdir()) == []  # the staged file went to the bucket


def test_eviction_keeps_the_bucket_within_its_budget(s3_endpoint: str, credentials: object, tmp_path: Path) -> None:
    store = store_on(s3_endpoint, "evict", tmp_path, max_bytes=2500)
    keys = [clip_key(n=i) for i in range(4)]
    for key in keys:
        put(store, key, "anna", 1000)
        time.sleep(1.1)  # S3 modification times have one-second resolution
    assert [store.exists(k) for k in keys] == [False, False, True, True]
    names = {o.name for o in store.backend.list("by-avatar/anna/")}
    assert names == {f"by-avatar/anna/{k}" for k in keys[2:]}


async def test_a_server_keeps_clips_in_the_bucket_and_links_the_cdn(
    s3_endpoint: str, credentials: dict[str, str], tmp_path: Path
) -> None:
    name = bucket(s3_endpoint, "served")
    env = {
        **credentials,
        "MTS_STREAM__CLIP_STORE": "s3",
        "MTS_STREAM__S3_BUCKET": name,
        "MTS_STREAM__S3_ENDPOINT_URL": s3_endpoint,
        "MTS_STREAM__CDN_BASE_URL": "https://cdn.example.com/clips/",
    }
    with run_server(tmp_path, **env) as server:
        audio = tone_wav(1.0)
        clips = []
        for sub in ("s3-a", "s3-a"):
            client = await Client.connect(server)
            await client.hello(mint(sub, "normal"))
            await client.send("start", avatar="astronaut", mode="clip", transport="mse", audio={"format": "wav"})
            await client.ws.send(audio)
            await client.send("audio_end")
            done = await client.expect("done", "error", timeout=120)
            assert done["type"] == "done", done
            clips.append((done["clip"], client.media_bytes))
            await client.close()
        (first_url, first_media), (second_url, second_media) = clips
        assert first_url == second_url and first_url.startswith("https://cdn.example.com/clips/")
        assert second_media == first_media  # the second came from the bucket
        key = first_url.rsplit("/", 1)[1]
        stored = boto3.client("s3", endpoint_url=s3_endpoint).get_object(Bucket=name, Key=f"clips/{key}")
        assert stored["Body"].read() == first_media and stored["ContentType"] == "video/mp4"
        assert server.get(f"/v1/clips/{key}").content == first_media  # the CDN's origin: this node
