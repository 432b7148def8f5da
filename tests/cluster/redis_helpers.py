"""Redis for the cluster tests: the shared one on 127.0.0.1:6379 under a unique prefix per test,
or a private redis-server on a free port (a test that kills and restarts it)."""

from __future__ import annotations

import contextlib
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import redis

from tests.server_harness import free_port

SHARED_URL = "redis://127.0.0.1:6379/0"


def unique_prefix() -> str:
    return f"mts-test-{secrets.token_hex(6)}:"


def delete_prefix(url: str, prefix: str) -> None:
    client = redis.Redis.from_url(url)
    try:
        keys = list(client.scan_iter(match=prefix + "*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


def shared_redis_available() -> bool:
    try:
        return bool(redis.Redis.from_url(SHARED_URL, socket_timeout=1).ping())
    except redis.RedisError:
        return False


@dataclass
class PrivateRedis:
    port: int
    workdir: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        assert binary is not None, "redis-server is not installed"
        self.process = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.workdir)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(redis.RedisError):
                if redis.Redis(port=self.port, socket_timeout=0.5).ping():
                    return
            if time.monotonic() > deadline:
                raise RuntimeError("the private redis-server did not start")
            time.sleep(0.05)

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait(5)
            self.process = None


@contextlib.contextmanager
def private_redis(tmp: Path) -> Iterator[PrivateRedis]:
    server = PrivateRedis(free_port(), tmp)
    server.start()
    try:
        yield server
    finally:
        server.kill()
