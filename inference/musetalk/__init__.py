"""MuseTalk v1.5 engine: real-time lip-sync with frames of many sessions batched through one model.

Construct it from a models folder in MuseTalk's layout::

    from inference.musetalk import MuseTalkRenderer, check_models
    problems = check_models("models")          # [] when usable, else one line per missing file
    renderer = MuseTalkRenderer.from_folder("models", "var/avatars", device="cuda", dtype="fp16")

The layout names (``check_models``, ``model_report``, ...) import nothing heavy; the models and the
renderer import torch when first used, so checking a models folder works without torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from inference.musetalk.layout import (
    MissingModelsError,
    ModelFile,
    ModelLayout,
    check_models,
    download_models,
    model_report,
)

if TYPE_CHECKING:
    from inference.musetalk.models import MuseTalkModels, load_models
    from inference.musetalk.renderer import MuseTalkRenderer

_HEAVY = {
    "MuseTalkModels": "inference.musetalk.models",
    "load_models": "inference.musetalk.models",
    "MuseTalkRenderer": "inference.musetalk.renderer",
}

__all__ = [
    "MissingModelsError",
    "ModelFile",
    "ModelLayout",
    "MuseTalkModels",
    "MuseTalkRenderer",
    "check_models",
    "download_models",
    "load_models",
    "model_report",
]


def __getattr__(name: str) -> Any:
    if name in _HEAVY:
        return getattr(importlib.import_module(_HEAVY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
