"""Python asyncio SDK for musetalk-stream: the session socket with decoded frames.

See docs/agents.md. ``connect`` opens a session; ``Connection.speak`` sends a clip,
``Connection.live`` starts a live session. The Pipecat service lives in
``stream_server.sdk.pipecat_service`` (``pip install "musetalk-stream[pipecat]"``).
"""

from __future__ import annotations

from stream_server.sdk.client import (
    ClipRequest,
    Connection,
    ConnectionLost,
    Event,
    LiveSession,
    MuseTalkError,
    Request,
    ServerError,
    connect,
    socket_url,
)
from stream_server.sdk.media import AUDIO_RATE, AudioChunk, VideoFrame
from stream_server.sdk.messages import (
    Done,
    ErrorMessage,
    Granted,
    Progress,
    Queued,
    Redirect,
    StreamStart,
    Welcome,
)

__all__ = [
    "AUDIO_RATE",
    "AudioChunk",
    "ClipRequest",
    "Connection",
    "ConnectionLost",
    "Done",
    "ErrorMessage",
    "Event",
    "Granted",
    "LiveSession",
    "MuseTalkError",
    "Progress",
    "Queued",
    "Redirect",
    "Request",
    "ServerError",
    "StreamStart",
    "VideoFrame",
    "Welcome",
    "connect",
    "socket_url",
]
