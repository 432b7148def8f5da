"""``serve`` picks its allocator itself: jemalloc for every allocation unless told otherwise."""

from __future__ import annotations

from pathlib import Path

from tests.server_harness import run_server


def mapped_libraries(pid: int) -> str:
    return Path(f"/proc/{pid}/maps").read_text()


def environment(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace").split("\0")


def test_serve_runs_under_jemalloc_by_default(tmp_path: Path) -> None:
    with run_server(tmp_path) as server:
        assert "libjemalloc" in mapped_libraries(server.process.pid)
        assert "PYTHONMALLOC=malloc" in environment(server.process.pid)
        assert "allocator: jemalloc" in server.log()


def test_serve_can_stay_on_glibc_with_capped_arenas(tmp_path: Path) -> None:
    with run_server(tmp_path, MTS_SERVER__ALLOCATOR="glibc") as server:
        assert "libjemalloc" not in mapped_libraries(server.process.pid)
        assert "glibc with at most 2 arenas" in server.log()
