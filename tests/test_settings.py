"""configs/default.toml documents every key with the defaults the code uses; env overrides both."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from stream_server.settings import DEFAULT_CONFIG, Settings, _default_tiers


def code_defaults() -> dict[str, object]:
    fields = Settings.model_fields
    values = {name: field.default_factory() for name, field in fields.items()}  # type: ignore[misc]
    values["queue"].tiers = _default_tiers()  # type: ignore[attr-defined]
    return {name: value.model_dump(mode="json") for name, value in values.items()}  # type: ignore[attr-defined]


def test_default_toml_lists_every_key_with_the_code_default() -> None:
    documented = tomllib.loads(DEFAULT_CONFIG.read_text())
    assert documented == code_defaults()


def test_environment_overrides_the_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MTS_QUEUE__GLOBAL_CAP", "2000")
    monkeypatch.setenv("MTS_QUEUE__TIERS__LOW__MAX_WAIT_S", "1800")
    settings = Settings()
    assert settings.queue.global_cap == 2000
    assert settings.queue.tiers["low"].max_wait_s == 1800
    assert settings.queue.tiers["vip"].max_wait_s == 120


def test_another_file_replaces_the_default(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    config = tmp_path / "node.toml"
    config.write_text("[engine]\nslots = 16\n")
    monkeypatch.setenv("MTS_CONFIG", str(config))
    settings = Settings()
    assert settings.engine.slots == 16 and settings.queue.global_cap == 1000


def test_inconsistent_tiers_are_refused_with_the_key_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MTS_QUEUE__TIERS__VIP__MAX_WAIT_S", "5000")
    with pytest.raises(ValueError, match="max_wait_s"):
        Settings().check()


def test_a_crf_the_encoder_refuses_is_refused_at_start(monkeypatch: pytest.MonkeyPatch) -> None:
    """``video_crf = 0`` (lossless) was accepted, then every stream failed in the encoder."""
    monkeypatch.setenv("MTS_STREAM__VIDEO_CRF", "0")
    with pytest.raises(ValueError, match="video_crf"):
        Settings()
