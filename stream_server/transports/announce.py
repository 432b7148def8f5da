"""The ``stream`` message that precedes media, for every transport."""

from __future__ import annotations

from typing import Literal

from inference.engine import FPS
from stream_server.protocol import StreamStart


def stream_start(transport: Literal["mse", "webrtc"], width: int, height: int, mime: str | None = None) -> str:
    return StreamStart(transport=transport, mime=mime, width=width, height=height, fps=FPS).encode()
