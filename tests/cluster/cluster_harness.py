"""Several real server processes sharing one line in Redis, behind a real nginx rendered from
deploy/nginx/nginx.conf (loopback ports instead of node-<n>:8000)."""

from __future__ import annotations

import contextlib
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import websockets

from tests.server_harness import ROOT, Client, RunningServer, free_port, run_server

NGINX = Path("/usr/sbin/nginx")
NGINX_CONF = ROOT / "deploy" / "nginx" / "nginx.conf"


def render_nginx_conf(template: str, listen: int, ports: list[int], tmp: Path) -> str:
    conf = template.replace("listen 8080;", f"listen 127.0.0.1:{listen};")
    conf = conf.replace("worker_processes auto;", (
        f"worker_processes 1;\ndaemon off;\npid {tmp}/nginx.pid;\nerror_log {tmp}/nginx-error.log warn;"
    ))
    temp_paths = "".join(f"    {kind}_temp_path {tmp}/{kind};\n" for kind in ("client_body", "proxy", "fastcgi",
                                                                          "uwsgi", "scgi"))
    conf = conf.replace("http {\n", "http {\n" + temp_paths, 1)
    # the shipped file names three nodes; a smaller cluster drops the others
    for n in range(len(ports), 3):
        conf = re.sub(rf".*node-{n}.*\n", "", conf)
    conf = re.sub(r"node-(\d+):8000", lambda m: f"127.0.0.1:{ports[int(m.group(1))]}", conf)
    return conf


@dataclass
class Cluster:
    nodes: list[RunningServer]
    lb_port: int
    tmp: Path
    nginx: subprocess.Popen[bytes] | None = None
    env: dict[str, str] = field(default_factory=dict)

    @property
    def lb_url(self) -> str:
        return f"http://127.0.0.1:{self.lb_port}"

    def ws(self, node: int | None = None) -> str:
        """The session socket through nginx: round robin, or node ``node``'s own path."""
        path = "" if node is None else f"/node/{node}"
        return f"ws://127.0.0.1:{self.lb_port}{path}/v1/stream"

    async def connect(self, node: int | None = None) -> Client:
        return Client(await websockets.connect(self.ws(node), max_size=None))

    def queue(self, node: int = 0) -> dict[str, Any]:
        return dict(httpx.get(self.nodes[node].url + "/v1/queue", timeout=10).json())


def node_env(lb_port: int, n: int, redis_url: str, prefix: str, **env: str) -> dict[str, str]:
    return {
        "MTS_QUEUE__STORE": "redis",
        "MTS_QUEUE__REDIS_URL": redis_url,
        "MTS_QUEUE__REDIS_PREFIX": prefix,
        "MTS_CLUSTER__NODE_ID": f"node-{n}",
        "MTS_SERVER__PUBLIC_URL": f"http://127.0.0.1:{lb_port}/node/{n}",
        "MTS_ENGINE__SLOTS": "1",
        **env,
    }


@contextlib.contextmanager
def run_cluster(
    tmp: Path,
    redis_url: str,
    prefix: str,
    *,
    nodes: int = 3,
    per_node: dict[int, dict[str, str]] | None = None,
    **env: str,
) -> Iterator[Cluster]:
    """``nodes`` servers (node-0, ...) on one line under ``prefix``, and nginx in front; ``env``
    for every node, ``per_node[n]`` over it for node n."""
    assert NGINX.exists(), "these tests need Debian's nginx (/usr/sbin/nginx)"
    lb_port = free_port()
    with contextlib.ExitStack() as stack:
        servers = []
        for n in range(nodes):
            (tmp / f"node-{n}").mkdir()
            extra = {**env, **(per_node or {}).get(n, {})}
            servers.append(stack.enter_context(
                run_server(tmp / f"node-{n}", **node_env(lb_port, n, redis_url, prefix, **extra))
            ))
        cluster = Cluster(servers, lb_port, tmp)
        conf = tmp / "nginx.conf"
        conf.write_text(render_nginx_conf(NGINX_CONF.read_text(), lb_port, [s_port(s) for s in servers], tmp))
        cluster.nginx = subprocess.Popen(
            [str(NGINX), "-p", str(tmp), "-c", str(conf), "-e", str(tmp / "nginx-error.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + 20
            while True:
                if cluster.nginx.poll() is not None:
                    raise RuntimeError(f"nginx exited: {(tmp / 'nginx-error.log').read_text(errors='replace')}")
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(cluster.lb_url + "/readyz", timeout=1).status_code == 200:
                        break
                if time.monotonic() > deadline:
                    raise RuntimeError("nginx did not come up")
                time.sleep(0.05)
            yield cluster
        finally:
            cluster.nginx.terminate()
            cluster.nginx.wait(10)


def slots(summary: dict[str, Any]) -> tuple[int, int]:
    """(total, busy) slots of a ``/v1/queue`` summary, every pool together."""
    return summary["slots"]["total"], summary["slots"]["busy"]


def s_port(server: RunningServer) -> int:
    return int(server.url.rsplit(":", 1)[1])


def nginx_available() -> bool:
    return NGINX.exists() and shutil.which("redis-server") is not None
