"""The one owner of the suite's markers and their skips.

* ``gpu``: needs a CUDA device; skipped without one (and without torch).
* ``assets``: needs the real inputs in ``../shared/assets``; skipped when they are absent.
* ``slow``: takes more than a few seconds; runs by default, ``--skip-slow`` leaves it out.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ASSETS = Path(__file__).resolve().parent.parent.parent / "shared" / "assets"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--skip-slow", action="store_true", help="leave out tests marked slow")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")
    config.addinivalue_line("markers", "slow: takes more than a few seconds (--skip-slow leaves it out)")
    config.addinivalue_line("markers", "assets: needs ../shared/assets (skipped when absent)")


def _cuda_available() -> bool:
    if importlib.util.find_spec("torch") is None:
        return False
    import torch

    return bool(torch.cuda.is_available())


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skips: dict[str, pytest.MarkDecorator] = {}
    if any("gpu" in item.keywords for item in items) and not _cuda_available():
        skips["gpu"] = pytest.mark.skip(reason="no CUDA device")
    if not ASSETS.is_dir():
        skips["assets"] = pytest.mark.skip(reason=f"{ASSETS} is absent")
    if config.getoption("--skip-slow"):
        skips["slow"] = pytest.mark.skip(reason="--skip-slow")
    for item in items:
        for marker, skip in skips.items():
            if marker in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def assets() -> Path:
    """``../shared/assets``; use with ``@pytest.mark.assets``."""
    return ASSETS
