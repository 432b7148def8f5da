"""MuseTalk v1.5 engine: real-time lip-sync with frames of many sessions batched through one model.

Construct it from a models folder in MuseTalk's layout::

    from inference.musetalk import MuseTalkRenderer, check_models
    problems = check_models("models")          # [] when usable, else one line per missing file
    renderer = MuseTalkRenderer.from_folder("models", "var/avatars", device="cuda", dtype="fp16")
"""

from __future__ import annotations

from inference.musetalk.layout import (
    MissingModelsError,
    ModelLayout,
    check_models,
    download_models,
)
from inference.musetalk.models import MuseTalkModels, load_models
from inference.musetalk.renderer import MuseTalkRenderer

__all__ = [
    "MissingModelsError",
    "ModelLayout",
    "MuseTalkModels",
    "MuseTalkRenderer",
    "check_models",
    "download_models",
    "load_models",
]
