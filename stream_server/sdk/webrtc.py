"""The client end of a WebRTC media connection: aiortc peer, receive-only audio and video.

Signalling is the session socket's (non-trickle: the offer carries every candidate). Frames come
out as ``VideoFrame`` / ``AudioChunk`` with the server's track timestamps, which share one clock.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import av
from aiortc import RTCConfiguration, RTCIceServer, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from stream_server.sdk.media import AudioNormaliser, MediaItem, VideoFrame


class WebRtcReceiver:
    def __init__(self, emit: Callable[[MediaItem], None], ice_servers: Sequence[RTCIceServer] = ()) -> None:
        self._emit = emit
        self._pc = RTCPeerConnection(RTCConfiguration(iceServers=list(ice_servers)))
        self._pc.addTransceiver("audio", direction="recvonly")
        self._pc.addTransceiver("video", direction="recvonly")
        self._tasks: list[asyncio.Task[None]] = []
        self.failed = asyncio.Event()
        self._pc.on("track", self._on_track)
        self._pc.on("connectionstatechange", self._on_state)

    async def offer(self) -> str:
        """The complete offer SDP (aiortc gathers all candidates before it returns)."""
        await self._pc.setLocalDescription(await self._pc.createOffer())
        return str(self._pc.localDescription.sdp)

    async def answer(self, sdp: str) -> None:
        await self._pc.setRemoteDescription(RTCSessionDescription(sdp, "answer"))

    def _on_state(self) -> None:
        if self._pc.connectionState in ("failed", "closed"):
            self.failed.set()

    def _on_track(self, track: MediaStreamTrack) -> None:
        self._tasks.append(asyncio.ensure_future(self._pull(track)))

    async def _pull(self, track: MediaStreamTrack) -> None:
        audio = AudioNormaliser()
        with contextlib.suppress(MediaStreamError):
            while True:
                frame: Any = await track.recv()
                if isinstance(frame, av.VideoFrame):
                    image = await asyncio.to_thread(frame.to_ndarray, format="rgb24")
                    self._emit(VideoFrame(image, float(frame.time or 0.0)))
                elif isinstance(frame, av.AudioFrame):
                    for chunk in audio.convert(frame):
                        self._emit(chunk)

    async def close(self) -> None:
        await self._pc.close()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
