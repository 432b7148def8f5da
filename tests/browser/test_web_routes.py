"""The web client's files and the admin stats endpoint over plain HTTP (no browser needed)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from stream_server.app import STATIC_FILES, WEB_CLIENT
from tests.server_harness import Client, RunningServer, mint, run_server


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    with run_server(tmp_path_factory.mktemp("web"), MTS_ENGINE__SLOTS="3") as running:
        yield running


@pytest.mark.parametrize(
    ("path", "media_type"),
    [("/", "text/html"), ("/embed.js", "text/javascript")]
    + [(path, media) for path, (_, media) in STATIC_FILES.items()],
)
def test_web_client_files_are_served(server: RunningServer, path: str, media_type: str) -> None:
    response = server.get(path)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith(media_type)  # modules need a JavaScript type
    assert response.content


def test_every_web_client_file_has_a_route() -> None:
    served = {"index.html", "embed.js"} | {name for name, _ in STATIC_FILES.values()}
    present = {p.name for p in Path(WEB_CLIENT).iterdir() if p.suffix in {".html", ".js", ".css"}}
    assert present == served


def test_embed_js_may_be_loaded_by_other_origins(server: RunningServer) -> None:
    assert server.get("/embed.js").headers["access-control-allow-origin"] == "*"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_admin_stats_need_an_admin_token(server: RunningServer) -> None:
    assert server.get("/v1/admin/stats").status_code == 403
    assert server.get("/v1/admin/stats", headers=bearer(mint("u", "vip"))).status_code == 403
    refused = server.get("/v1/admin/stats", headers=bearer("not-a-token"))
    assert refused.status_code == 401
    assert refused.json()["code"] == "invalid_token"


async def test_admin_stats(server: RunningServer) -> None:
    client = await Client.connect(server)
    await client.hello()
    await client.send("start", avatar="nobody", mode="live", transport="mse")
    assert (await client.expect("error"))["code"] == "unknown_avatar"
    await client.send("start", avatar="astronaut", mode="live", transport="mse")
    await client.expect("granted")

    response = server.get("/v1/admin/stats", headers=bearer(mint("root", "vip", roles=["admin"])))
    assert response.status_code == 200
    assert response.headers["cache-control"] == "no-store"
    stats = response.json()
    assert set(stats["waiting"]) == {"vip", "normal", "low"}
    assert all(w["size"] == 0 for w in stats["waiting"].values())
    assert stats["slots"] == {"total": 3, "busy": 1, "free": 2}
    assert stats["errors"] == {"unknown_avatar": 1}
    assert stats["clips_served"] == 0
    assert stats["frames_per_second"] >= 0
    assert stats["connections"] == 1
    assert stats["sessions_active"] == 1
    assert stats["tickets"] == {"owned": 0, "parked": 0, "serving": 1}
    assert stats["queued_audio_bytes"] == 0
    assert stats["engine"] == "lite"
    await client.close()
