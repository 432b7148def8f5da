"""Background pre-generation in process mode: the same behaviour as in thread mode
(``tests/test_pregen_background.py``), with its background stream rendered and encoded in a
worker process."""

from __future__ import annotations

import pytest

from tests.server_harness import run_server, tone_wav
from tests.test_pregen_background import test_pregen_yields_to_a_user_and_finishes_when_idle

__all__ = ["test_pregen_yields_to_a_user_and_finishes_when_idle"]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("pregen-procs")
    (folder / "long.wav").write_bytes(tone_wav(12.0))
    (folder / "templates.toml").write_text('[long]\naudio = "long.wav"\ntext = "A long phrase."\n')
    with run_server(
        folder,
        MTS_TEMPLATES__FILE=str(folder / "templates.toml"),
        MTS_TEMPLATES__PREGEN_TOP_K="1",
        MTS_AVATARS__HOT_AFTER_USES="0",
        MTS_ENGINE__SLOTS="1",
        MTS_LIMITS__START_BURST="50",
        MTS_ENGINE__PROCESS_MODE="process",
        MTS_ENGINE__WORKERS="2",
    ) as running:
        yield running
