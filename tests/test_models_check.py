"""``musetalk-stream models check`` on a machine without torch: it names every missing file, says
which are required and which optional, and what a missing optional one costs."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# Runs the CLI with torch and the other heavy libraries made unimportable.
NO_TORCH = textwrap.dedent(
    """
    import sys
    from importlib.abc import MetaPathFinder

    HEAVY = ("torch", "torchvision", "torchaudio", "diffusers", "transformers", "huggingface_hub", "accelerate")

    class Blocker(MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in HEAVY:
                raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)")
            return None

    sys.meta_path.insert(0, Blocker())
    from stream_server.cli import main

    try:
        main(sys.argv[1:])
    finally:
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in HEAVY)
        print("heavy modules loaded:", loaded, file=sys.stderr)
    """
)


def check(root: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-c", NO_TORCH, "models", "check", "--dir", str(root)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def touch(root: Path, *names: str) -> None:
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"")


REQUIRED = (
    "musetalkV15/musetalk.json",
    "musetalkV15/unet.pth",
    "sd-vae/config.json",
    "sd-vae/diffusion_pytorch_model.bin",
    "whisper/config.json",
    "whisper/preprocessor_config.json",
    "whisper/pytorch_model.bin",
)


def test_an_empty_folder_names_every_file_without_torch(tmp_path: Path) -> None:
    done = check(tmp_path / "models")
    assert done.returncode == 1, done.stderr
    assert "heavy modules loaded: []" in done.stderr
    for name in REQUIRED:
        assert f"missing required {tmp_path / 'models' / name}" in done.stderr
    lines = done.stdout.splitlines()

    def line_of(name: str) -> str:
        return next(line for line in lines if str(tmp_path / "models" / name) in line)

    for name in REQUIRED:
        assert "MISSING required" in line_of(name)
    assert "MISSING optional" in line_of("face-parse-bisent/79999_iter.pth")
    assert "ellipse" in line_of("face-parse-bisent/79999_iter.pth")
    assert "MISSING optional" in line_of("dwpose/dw-ll_ucoco_384.pth")
    assert "fallback" in line_of("dwpose/dw-ll_ucoco_384.pth")


@pytest.mark.parametrize("optional", [(), ("dwpose/dw-ll_ucoco_384.pth",)])
def test_required_files_are_enough(tmp_path: Path, optional: tuple[str, ...]) -> None:
    root = tmp_path / "models"
    touch(root, *REQUIRED, *optional)
    done = check(root)
    assert done.returncode == 0, done.stderr
    assert "heavy modules loaded: []" in done.stderr
    assert f"{root}: complete" in done.stdout
    assert "MISSING required" not in done.stdout
    dwpose = next(line for line in done.stdout.splitlines() if "dw-ll_ucoco_384.pth" in line)
    assert dwpose.lstrip().startswith("ok" if optional else "MISSING optional")
    assert "face-parse-bisent/79999_iter.pth" in done.stdout  # still named, as optional and missing
