"""The asyncio client of the session socket: connect, wait in line, get decoded frames.

    conn = await connect("http://127.0.0.1:8000", token=token)
    clip = await conn.speak(wav_bytes, avatar="astronaut")
    async for event in clip:            # Queued, Granted, StreamStart, Progress, VideoFrame, AudioChunk, Done
        ...
    live = await conn.live(avatar="astronaut")
    await live.send_audio(pcm16k)       # speak; end_utterance(), interrupt(), cancel()

One ``Connection`` owns one socket and at most one request (the server's rule). A ``redirect``
is followed by the connection itself: it opens the named node's socket, says ``hello`` with the
grant as ``resume`` and carries on, so a request's events continue across nodes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from typing import Any, Literal

import numpy as np
import websockets
from websockets.asyncio.client import ClientConnection

from stream_server.sdk.media import AudioChunk, Fmp4Decoder, MediaItem, VideoFrame
from stream_server.sdk.messages import (
    Done,
    ErrorMessage,
    Granted,
    Pong,
    Progress,
    Queued,
    Redirect,
    ServerMessage,
    StreamStart,
    UnexpectedMessage,
    WebrtcAnswer,
    Welcome,
    parse_server_message,
)
from stream_server.sdk.webrtc import WebRtcReceiver

log = logging.getLogger(__name__)

Transport = Literal["mse", "webrtc"]
AudioFormat = Literal["wav", "mp3", "ogg", "flac", "pcm_s16le"]
Event = Queued | Granted | Redirect | StreamStart | Progress | Done | ErrorMessage | MediaItem
UPLOAD_CHUNK = 256 * 1024


class MuseTalkError(Exception):
    """Base of the SDK's errors."""


class ServerError(MuseTalkError):
    """The server answered ``error``: ``code`` is the contract's error code."""

    def __init__(self, message: ErrorMessage) -> None:
        super().__init__(f"{message.code}: {message.message}")
        self.code = message.code
        self.message = message.message
        self.retry_after_s = message.retry_after_s


class ConnectionLost(MuseTalkError):
    """The socket closed before the request ended."""


def socket_url(server: str) -> str:
    """``http(s)://host[:port]`` or a ``ws(s)://`` URL to the session socket's URL."""
    base = server.rstrip("/")
    for http, ws in (("https://", "wss://"), ("http://", "ws://")):
        if base.startswith(http):
            base = ws + base[len(http) :]
    return base if base.endswith("/v1/stream") else base + "/v1/stream"


async def connect(
    url: str, token: str | None = None, *, resume: str | None = None, open_timeout_s: float = 10.0
) -> Connection:
    """Open the session socket and say ``hello``; raises ``ServerError`` for a refused token."""
    connection = Connection(token, open_timeout_s)
    await connection._open(socket_url(url), resume)
    return connection


class Connection:
    def __init__(self, token: str | None, open_timeout_s: float) -> None:
        self.token = token
        self.welcome: Welcome | None = None
        self.request: Request | None = None
        self._open_timeout_s = open_timeout_s
        self._ws: ClientConnection | None = None
        self._reader: asyncio.Task[None] | None = None
        self._closing = False

    async def __aenter__(self) -> Connection:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ----- the socket -----

    async def _open(self, url: str, resume: str | None) -> None:
        self._ws, self.welcome = await self._handshake(url, resume)
        self._reader = asyncio.create_task(self._read(), name="musetalk-reader")

    async def _handshake(self, url: str, resume: str | None) -> tuple[ClientConnection, Welcome]:
        """Open a socket and say ``hello``; the first reply must be ``welcome``."""
        try:
            ws = await websockets.connect(url, max_size=None, open_timeout=self._open_timeout_s)
        except (OSError, websockets.WebSocketException, TimeoutError) as exc:
            raise ConnectionLost(f"cannot open {url}: {exc or type(exc).__name__}") from None
        hello: dict[str, Any] = {"type": "hello"}
        if self.token:
            hello["token"] = self.token
        if resume:
            hello["resume"] = resume
        try:
            await ws.send(json.dumps(hello))
            async with asyncio.timeout(self._open_timeout_s):
                while isinstance(raw := await ws.recv(), bytes):
                    pass
            reply = parse_server_message(raw)
        except (websockets.ConnectionClosed, TimeoutError, UnexpectedMessage) as exc:
            await ws.close()
            raise ConnectionLost(f"no welcome from {url}: {exc or type(exc).__name__}") from None
        if isinstance(reply, ErrorMessage):
            await ws.close()
            raise ServerError(reply)
        if not isinstance(reply, Welcome):
            await ws.close()
            raise ConnectionLost(f"{url} answered hello with {reply.type!r}, not welcome")
        return ws, reply

    async def _send(self, message: dict[str, Any] | bytes) -> None:
        if self._ws is None:
            raise ConnectionLost("the connection is closed")
        try:
            await self._ws.send(message if isinstance(message, bytes) else json.dumps(message))
        except websockets.ConnectionClosed as exc:
            raise ConnectionLost(f"the server closed the connection ({exc})") from None

    async def _read(self) -> None:
        reason = "the server closed the connection"
        try:
            while self._ws is not None:
                ws = self._ws
                try:
                    raw = await ws.recv()
                except websockets.ConnectionClosed as exc:
                    if ws is not self._ws:  # replaced by a redirect
                        continue
                    reason = f"the server closed the connection ({exc.rcvd.code if exc.rcvd else 'no close frame'})"
                    break
                if isinstance(raw, bytes):
                    if self.request is not None:
                        self.request._media_bytes(raw)
                    continue
                await self._dispatch(parse_server_message(raw))
        except UnexpectedMessage as exc:
            reason = str(exc)
        except Exception as exc:  # a fault here must end the request loudly, not leave it hanging
            log.exception("the session socket reader failed")
            reason = f"the client failed: {exc!r}"
        finally:
            self._lost(reason)

    async def _dispatch(self, message: ServerMessage) -> None:
        if isinstance(message, Pong):
            return
        if isinstance(message, Redirect):
            await self._follow(message)
        elif self.request is not None:
            await self.request._message(message)
        elif isinstance(message, ErrorMessage):
            log.warning("server error outside a request: %s: %s", message.code, message.message)

    async def _follow(self, redirect: Redirect) -> None:
        """The slot is on another node: move this connection there with the grant."""
        if self.request is not None:
            self.request._event(redirect)
        try:
            ws, welcome = await self._handshake(socket_url(redirect.url), redirect.grant)
        except MuseTalkError as exc:
            if self.request is not None:
                self.request._fail(f"could not follow the redirect to {redirect.url}: {exc}")
            return
        old, self._ws, self.welcome = self._ws, ws, welcome
        if old is not None:
            await old.close()
        request = self.request
        if request is not None and redirect.grant.startswith(CLUSTER_GRANT):
            # A cluster's grant opens a new session on the slot's node: the request (and a clip's
            # audio) goes there again, and streams at once (docs/protocol.md, Redirect). Any other
            # grant resumes the request where it waits.
            for message in request._opening:
                await self._send(message)

    def _lost(self, reason: str) -> None:
        if self.request is not None and not self._closing:
            self.request._fail(reason)

    # ----- requests -----

    async def speak(
        self,
        audio: bytes,
        *,
        avatar: str,
        audio_format: AudioFormat = "wav",
        transport: Transport = "mse",
        decode: bool = True,
        keep_fmp4: bool = False,
    ) -> ClipRequest:
        """Send a whole clip's audio; iterate the returned request for its events and frames.

        ``decode=False`` skips decoding (``keep_fmp4=True`` keeps the raw fMP4 in ``fmp4``).
        """
        request = ClipRequest(self, transport, decode=decode, keep_fmp4=keep_fmp4)
        self._claim(request)
        start = {"type": "start", "avatar": avatar, "mode": "clip", "transport": transport,
                 "audio": {"format": audio_format}}
        request._opening = [start, *(audio[o : o + UPLOAD_CHUNK] for o in range(0, len(audio), UPLOAD_CHUNK)),
                            {"type": "audio_end"}]
        for message in request._opening:
            await self._send(message)
        return request

    async def say(
        self,
        template: str,
        *,
        avatar: str,
        transport: Transport = "mse",
        decode: bool = True,
        keep_fmp4: bool = False,
    ) -> ClipRequest:
        """Say a template phrase of the server's library (a clip with no audio of its own): from
        the clip store at once when rendered before, else queued and rendered like any clip."""
        request = ClipRequest(self, transport, decode=decode, keep_fmp4=keep_fmp4)
        self._claim(request)
        await self._send({"type": "start", "avatar": avatar, "mode": "clip", "transport": transport,
                          "template": template})
        return request

    async def live(
        self, *, avatar: str, transport: Transport = "mse", sample_rate: int = 16_000, decode: bool = True
    ) -> LiveSession:
        """Start a live session: idle frames while silent, speech sent with ``send_audio``."""
        request = LiveSession(self, transport, sample_rate, decode=decode)
        self._claim(request)
        request._opening = [{"type": "start", "avatar": avatar, "mode": "live", "transport": transport,
                             "audio": {"format": "pcm_s16le", "sample_rate": sample_rate, "channels": 1}}]
        await self._send(request._opening[0])
        return request

    def _claim(self, request: Request) -> None:
        if self.request is not None and not self.request.finished:
            raise MuseTalkError("this connection already has a request; cancel it or wait for it to end")
        if self._ws is None:
            raise ConnectionLost("the connection is closed")
        self.request = request

    async def close(self) -> None:
        self._closing = True
        if self.request is not None:
            await self.request._close_media()
            self.request._finish(None)
        ws, self._ws = self._ws, None
        if ws is not None:
            await ws.close()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader


_END = object()
CLUSTER_GRANT = "grant."
"""How the grants of nodes sharing a line begin (stream_server/cluster/grants.py)."""


class Request:
    """One ``start``: its events in order, ending with ``Done`` or ``ErrorMessage``."""

    mode: Literal["clip", "live"]

    def __init__(self, connection: Connection, transport: Transport, *, decode: bool, keep_fmp4: bool = False) -> None:
        self.connection = connection
        self.transport = transport
        self.decode = decode
        self.fmp4 = bytearray() if keep_fmp4 else None
        self.position: int | None = None
        self.eta_s: float | None = None
        self.granted: Granted | None = None
        self.stream: StreamStart | None = None
        self.done: Done | None = None
        self.error: MuseTalkError | None = None
        self.finished = False
        self._events: asyncio.Queue[Event | object] = asyncio.Queue()
        self._decoder: Fmp4Decoder | None = None
        self._rtc: WebRtcReceiver | None = None
        self._granted = asyncio.Event()
        self._opening: list[dict[str, Any] | bytes] = []
        """What started this request (``start``, a clip's audio): sent again to the node a
        redirect moves it to."""

    def __aiter__(self) -> AsyncIterator[Event]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Event]:
        while True:
            item = await self._events.get()
            if item is _END:
                return
            yield item  # type: ignore[misc]

    async def wait_granted(self) -> Granted:
        """Until the slot is this request's (raises if the request ends first)."""
        ending = asyncio.ensure_future(self._ended())
        granted = asyncio.ensure_future(self._granted.wait())
        try:
            await asyncio.wait({ending, granted}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            ending.cancel()
            granted.cancel()
        if self.granted is None:
            raise self.error or MuseTalkError("the request ended before it was granted")
        return self.granted

    async def _ended(self) -> None:
        while not self.finished:
            await asyncio.sleep(0.05)

    async def cancel(self) -> None:
        """Leave the line or stop the stream; the connection stays usable."""
        if self.finished:
            return
        with contextlib.suppress(ConnectionLost):
            await self.connection._send({"type": "cancel"})
        await self._close_media()
        self._finish(None)

    # ----- from the connection -----

    def _event(self, event: Event) -> None:
        if not self.finished:
            self._events.put_nowait(event)

    def _media_bytes(self, data: bytes) -> None:
        if self.stream is None or self.finished:
            return  # media follows this request's own ``stream``; anything else is a late stray
        if self.fmp4 is not None:
            self.fmp4 += data
        if self._decoder is not None:
            self._decoder.feed(data)

    async def _message(self, message: ServerMessage) -> None:
        if self.finished:
            return
        if isinstance(message, Queued):
            self.position, self.eta_s = message.position, message.eta_s
        elif isinstance(message, Granted):
            self.granted = message
            self.position = None
            self._granted.set()
            if self.transport == "webrtc":
                await self._negotiate()
        elif isinstance(message, WebrtcAnswer):
            if self._rtc is not None:
                await self._rtc.answer(message.sdp)
            return
        elif isinstance(message, StreamStart):
            self.stream = message
            if message.transport == "mse" and self.decode:
                if self._decoder is not None:
                    self._decoder.abort()
                self._decoder = Fmp4Decoder(self._event)
        elif isinstance(message, Done):
            self.done = message
            if self._decoder is not None:
                await self._decoder.finish()
                self._decoder = None
            self._event(message)
            await self._close_media()
            self._finish(None)
            return
        elif isinstance(message, ErrorMessage):
            self._event(message)
            await self._close_media()
            self._finish(ServerError(message))
            return
        elif isinstance(message, (Welcome, Pong)):
            return
        self._event(message)

    async def _negotiate(self) -> None:
        self._rtc = WebRtcReceiver(self._event)
        sdp = await self._rtc.offer()
        await self.connection._send({"type": "webrtc_offer", "id": "sdk-offer", "sdp": sdp})

    def _fail(self, reason: str) -> None:
        if self.finished:
            return
        if self._decoder is not None:
            self._decoder.abort()
            self._decoder = None
        if self._rtc is not None:
            asyncio.ensure_future(self._rtc.close())
            self._rtc = None
        self._finish(ConnectionLost(reason))

    async def _close_media(self) -> None:
        if self._decoder is not None:
            self._decoder.abort()
            self._decoder = None
        if self._rtc is not None:
            rtc, self._rtc = self._rtc, None
            await rtc.close()

    def _finish(self, error: MuseTalkError | None) -> None:
        if self.finished:
            return
        self.error = error
        self.finished = True
        self._granted.set()
        self._events.put_nowait(_END)


class ClipRequest(Request):
    mode = "clip"

    async def result(self) -> tuple[Done, list[MediaItem]]:
        """Every frame of the clip and its ``done``; raises ``ServerError`` / ``ConnectionLost``."""
        media: list[MediaItem] = []
        async for event in self:
            if isinstance(event, (VideoFrame, AudioChunk)):
                media.append(event)
        if self.error is not None:
            raise self.error
        if self.done is None:
            raise MuseTalkError("the clip was cancelled")
        return self.done, media


class LiveSession(Request):
    mode = "live"

    def __init__(self, connection: Connection, transport: Transport, sample_rate: int, *, decode: bool) -> None:
        super().__init__(connection, transport, decode=decode)
        self.sample_rate = sample_rate

    async def send_audio(self, pcm: bytes | np.ndarray) -> None:
        """Speech as mono signed 16-bit PCM at ``sample_rate`` (bytes or an int16 array)."""
        data = pcm if isinstance(pcm, bytes) else np.ascontiguousarray(pcm, dtype=np.int16).tobytes()
        if data:
            await self.connection._send(data)

    async def end_utterance(self) -> None:
        await self.connection._send({"type": "audio_end"})

    async def interrupt(self) -> None:
        """Drop speech not yet shown; the avatar returns to idle frames."""
        await self.connection._send({"type": "interrupt"})
