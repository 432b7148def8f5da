"""Protocol fuzzing against one real server process.

Hypothesis plays sequences of client steps on up to two sockets: messages of every type with
field values sane and wild (lone surrogates, huge numbers, nesting, wrong types), unknown types,
text that is not JSON, nesting deeper than the parser's recursion, messages around the size
limit, binary frames at odd moments (real audio, noise, a WAV header over noise), pauses,
reconnects with the last resume token, and clients that leave cleanly, with a FIN or with a
reset. After every example the server must show no fault: no close code 1011, no ``internal``
error, no traceback in its log; and once the clients are gone, no busy slot, nobody waiting, no
session or connection left.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from dataclasses import dataclass, field
from typing import Any

import pytest
import websockets
from aiortc import RTCConfiguration, RTCPeerConnection
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from tests.reliability.clients import vanish, wait_holds_nothing
from tests.server_harness import RunningServer, mint, run_server, tone_wav

MAX_MESSAGE_BYTES = 65_536
EXAMPLES = 150
RESUME = "<the last resume token>"
"""Stands for the resume token of the latest ``welcome`` (filled in when the step runs)."""
OFFER = "<a real WebRTC offer>"
"""Stands for an offer aiortc made (filled in when the step runs)."""
WAV = tone_wav(0.4)
FAULT_MARKS = ("Traceback", "exception was never retrieved", "Exception in ASGI application")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    with run_server(
        tmp_path_factory.mktemp("fuzz"),
        MTS_ENGINE__SLOTS="1",
        MTS_QUEUE__RESUME_GRACE_S="1",
        MTS_LIMITS__START_BURST="100000",
        MTS_LIMITS__START_RATE_PER_MINUTE="100000",
        MTS_LIMITS__MAX_MESSAGE_BYTES=str(MAX_MESSAGE_BYTES),
        MTS_LIMITS__HELLO_TIMEOUT_S="2",
        MTS_STREAM__WEBRTC_OFFER_TIMEOUT_S="2",
    ) as running:
        yield running


# ----- what a client may send -----

weird_text = st.one_of(
    st.text(max_size=30),
    st.text(st.characters(categories=["Cs"]), min_size=1, max_size=3),  # lone surrogates
    st.lists(
        st.sampled_from(["\ud800", "\udfff", "\x00", "\u202e", "é", "😀", "..", "/", "astronaut", "%00", " "]),
        min_size=1,
        max_size=6,
    ).map("".join),
)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(2**200), max_value=2**200),
    st.floats(),  # NaN and infinities included
    weird_text,
)
json_values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(weird_text, inner, max_size=3), max_leaves=8
)
TOKENS = [
    mint("fuzz-a", "vip"),
    mint("fuzz-b", "normal"),
    mint("fuzz-admin", "vip", roles=["admin"]),
    mint("fuzz-old", "vip", exp=int(time.time()) - 3600),
    mint("fuzz-c", "normal", secret="not-the-server-secret-0123456789"),
    "not.a.token",
]
AUDIO_SPECS = [
    {"format": "wav"},
    {"format": "pcm_s16le", "sample_rate": 16000, "channels": 1},
    {"format": "mp3"},
    {"format": "flac", "sample_rate": 8000},
]
SANE = {
    "token": st.sampled_from(TOKENS),
    "resume": st.sampled_from([RESUME, RESUME, "v1.garbage", ""]),
    "avatar": st.sampled_from(["astronaut", "astronaut", "nobody", "../astronaut"]),
    "mode": st.sampled_from(["clip", "live"]),
    "transport": st.sampled_from(["mse", "mse", "webrtc"]),
    "audio": st.sampled_from(AUDIO_SPECS),
    "template": st.sampled_from(["hello", "thanks", "nope"]),
    "sdp": st.sampled_from(
        [OFFER, OFFER, "v=0\r\n", "garbage", "v=0\r\no=- 0 0 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\nm=video 9 x"]
    ),
    "id": st.one_of(st.integers(), st.text(max_size=8), weird_text),
}
FIELDS = {
    "hello": ["token", "resume"],
    "start": ["avatar", "mode", "transport", "audio", "template"],
    "audio_end": [],
    "webrtc_offer": ["sdp"],
    "interrupt": [],
    "cancel": [],
    "ping": [],
}


def value(name: str) -> st.SearchStrategy[Any]:
    """Mostly a sane value for the field, sometimes anything at all."""
    return st.one_of(SANE[name], SANE[name], json_values)


def message_of(kind: str) -> st.SearchStrategy[dict[str, Any]]:
    names = [*FIELDS[kind], "id"]
    return st.fixed_dictionaries(
        {"type": st.just(kind)}, optional={**{n: value(n) for n in names}, "extra": json_values}
    )


sane_hello = st.fixed_dictionaries(
    {"type": st.just("hello"), "token": SANE["token"]}, optional={"resume": SANE["resume"]}
)
sane_start = st.fixed_dictionaries(
    {
        "type": st.just("start"),
        "avatar": st.just("astronaut"),
        "mode": SANE["mode"],
        "transport": SANE["transport"],
        "audio": SANE["audio"],
    }
)
sane_template = st.fixed_dictionaries(
    {"type": st.just("start"), "avatar": st.just("astronaut"), "mode": st.just("clip"),
     "transport": st.just("mse"), "template": SANE["template"]}
)
messages = st.one_of(
    sane_hello,
    sane_start,
    sane_start,
    sane_template,
    *(message_of(kind) for kind in FIELDS),
    st.fixed_dictionaries({"type": json_values}, optional={"id": json_values}),  # unknown or odd types
    json_values,  # not an object at all
)
# Large payloads are drawn as a recipe and built when sent, so examples print small.
raw_texts = st.one_of(
    st.tuples(st.just("text"), st.text(max_size=40)),  # mostly not JSON
    st.tuples(st.just("deep"), st.integers(min_value=1, max_value=6000)),  # deeper than recursion allows
    st.tuples(st.just("long_int_id"), st.integers(min_value=4000, max_value=6000)),  # past int's digit limit
    st.tuples(st.just("long_id"), st.integers(min_value=MAX_MESSAGE_BYTES - 64, max_value=MAX_MESSAGE_BYTES + 64)),
)
binaries = st.one_of(
    st.tuples(st.just("wav"), st.just(b"")),
    st.tuples(st.just("noise"), st.binary(max_size=2048)),
    st.tuples(st.just("wav_header"), st.binary(max_size=512)),  # a WAV header over noise
    st.tuples(st.just("silence"), st.integers(min_value=1, max_value=4000)),  # PCM
    st.tuples(st.just("zeros"), st.integers(min_value=MAX_MESSAGE_BYTES - 8, max_value=MAX_MESSAGE_BYTES + 8)),
)


def build_text(recipe: tuple[str, Any]) -> str:
    kind, arg = recipe
    if kind == "deep":
        return "[" * arg + "]" * arg
    if kind == "long_int_id":
        return '{"type":"ping","id":' + "9" * arg + "}"
    if kind == "long_id":
        return json.dumps({"type": "ping", "id": "x" * arg})
    return str(arg)


def build_binary(recipe: tuple[str, Any]) -> bytes:
    kind, arg = recipe
    if kind == "wav":
        return WAV
    if kind == "wav_header":
        return WAV[:44] + arg
    if kind == "silence":
        return bytes(2 * arg)
    return bytes(arg)  # the noise as drawn, or that many zeros


ENDINGS = ["close", "fin", "reset"]
steps = st.one_of(
    st.tuples(st.just("message"), st.integers(0, 1), messages),
    st.tuples(st.just("message"), st.integers(0, 1), messages),
    st.tuples(st.just("text"), st.integers(0, 1), raw_texts),
    st.tuples(st.just("binary"), st.integers(0, 1), binaries),
    st.tuples(st.just("sleep"), st.just(0), st.sampled_from([0.0, 0.05, 0.3])),
    st.tuples(st.just("reconnect"), st.integers(0, 1), st.sampled_from(ENDINGS)),
)
CLIP = {"type": "start", "avatar": "astronaut", "mode": "clip", "transport": "mse", "audio": {"format": "wav"}}
LIVE = {"type": "start", "avatar": "astronaut", "mode": "live", "transport": "mse", "audio": AUDIO_SPECS[1]}
HELLO = {"type": "hello", "token": TOKENS[0]}
OTHER_HELLO = {"type": "hello", "token": TOKENS[1]}
PREFIXES: dict[str, list[tuple[str, int, Any]]] = {
    "nothing": [],
    "hello": [("message", 0, HELLO)],
    "clip": [
        ("message", 0, HELLO), ("message", 0, CLIP), ("binary", 0, ("wav", b"")), ("message", 0, {"type": "audio_end"}),
    ],
    "live": [("message", 0, HELLO), ("message", 0, LIVE), ("binary", 0, ("silence", 4000))],
    "webrtc": [
        ("message", 0, HELLO), ("message", 0, {**LIVE, "transport": "webrtc"}), ("sleep", 0, 0.3),
        ("message", 0, {"type": "webrtc_offer", "sdp": OFFER}), ("sleep", 0, 0.3),
    ],
    "queued": [
        ("message", 0, HELLO), ("message", 0, LIVE), ("message", 1, OTHER_HELLO), ("message", 1, CLIP),
        ("binary", 1, ("wav", b"")),
    ],
}
"""Where the random steps begin: sane openings that reach the deeper states (queued, granted,
streaming; the module's server has one slot)."""
cases = st.tuples(
    st.sampled_from(list(PREFIXES)),
    st.lists(steps, min_size=1, max_size=12),
    st.lists(st.sampled_from(ENDINGS), min_size=2, max_size=2),
)


# ----- playing a sequence -----


@dataclass
class Conn:
    ws: Any
    messages: list[dict[str, Any]] = field(default_factory=list)
    close_code: int | None = None
    reader: asyncio.Task[None] | None = None

    async def read(self) -> None:
        with contextlib.suppress(websockets.ConnectionClosed):
            async for raw in self.ws:
                if isinstance(raw, str):
                    self.messages.append(json.loads(raw))
        rcvd = self.ws.protocol.close_rcvd
        self.close_code = rcvd.code if rcvd is not None else None


async def make_offer() -> str:
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    pc.addTransceiver("audio", direction="recvonly")
    pc.addTransceiver("video", direction="recvonly")
    await pc.setLocalDescription(await pc.createOffer())
    sdp = str(pc.localDescription.sdp)
    await pc.close()
    return sdp


@pytest.fixture(scope="module")
def offer() -> str:
    return asyncio.run(make_offer())


@dataclass
class Play:
    server: RunningServer
    offer: str
    conns: dict[int, Conn] = field(default_factory=dict)
    gone: list[Conn] = field(default_factory=list)

    async def conn(self, index: int) -> Conn:
        current = self.conns.get(index)
        if current is not None and current.reader is not None and not current.reader.done():
            return current
        if current is not None:
            self.gone.append(current)
        ws = await websockets.connect(self.server.ws_url, max_size=None, ping_interval=None)
        conn = Conn(ws)
        conn.reader = asyncio.create_task(conn.read())
        self.conns[index] = conn
        return conn

    def last_resume(self) -> str:
        for conn in [*self.gone, *self.conns.values()][::-1]:
            for msg in conn.messages[::-1]:
                if msg.get("type") == "welcome" and isinstance(msg.get("resume"), str):
                    return str(msg["resume"])
        return "v1.no-welcome-yet"

    def fill(self, message: Any) -> Any:
        if isinstance(message, dict) and message.get("resume") == RESUME:
            return {**message, "resume": self.last_resume()}
        if isinstance(message, dict) and message.get("sdp") == OFFER:
            return {**message, "sdp": self.offer}
        return message

    async def send(self, index: int, data: str | bytes) -> None:
        conn = await self.conn(index)
        with contextlib.suppress(websockets.ConnectionClosed):
            await conn.ws.send(data)

    async def end(self, index: int, how: str) -> None:
        conn = self.conns.pop(index, None)
        if conn is None:
            return
        self.gone.append(conn)
        if how == "close":
            with contextlib.suppress(websockets.ConnectionClosed, TimeoutError):
                async with asyncio.timeout(5):
                    await conn.ws.close()
        elif conn.reader is not None and not conn.reader.done():  # still open
            vanish(conn.ws, how)
        assert conn.reader is not None
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5):
                await conn.reader

    async def step(self, kind: str, index: int, arg: Any) -> None:
        if kind == "message":
            await self.send(index, json.dumps(self.fill(arg), ensure_ascii=True))
        elif kind == "text":
            await self.send(index, build_text(arg))
        elif kind == "binary":
            await self.send(index, build_binary(arg))
        elif kind == "sleep":
            await asyncio.sleep(arg)
        elif kind == "reconnect":
            await self.end(index, arg)
            await self.send(index, json.dumps({"type": "hello", "token": TOKENS[0], "resume": self.last_resume()}))


async def play(
    server: RunningServer, offer: str, prefix: str, sequence: list[tuple[str, int, Any]], endings: list[str]
) -> None:
    run = Play(server, offer)
    log_from = len(server.log())
    try:
        for kind, index, arg in [*PREFIXES[prefix], *sequence]:
            await run.step(kind, index, arg)
        await asyncio.sleep(0.05)
    finally:
        for index, how in zip((0, 1), endings, strict=True):
            await run.end(index, how)
    conns = run.gone
    for seen in sorted({m.get("code", m.get("type")) for c in conns for m in c.messages}):
        event(f"server sent {seen}")  # what the examples reached: pytest --hypothesis-show-statistics
    codes = [c.close_code for c in conns]
    assert 1011 not in codes, f"close codes {codes}"
    internal = [m for c in conns for m in c.messages if m.get("type") == "error" and m.get("code") == "internal"]
    assert not internal, internal
    await wait_holds_nothing(server)
    log = server.log()[log_from:]  # this example's part: a fault is reported once, by its example
    faults = [mark for mark in FAULT_MARKS if mark in log]
    assert not faults, f"the server log shows {faults}:\n{log[-6000:]}"


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
)
@given(case=cases)
@example(case=("nothing", [("message", 0, {"type": "hello", "token": 5, "id": "\ud800"})], ["close", "close"]))
def test_fuzzed_sessions_leave_no_fault_and_nothing_held(server: RunningServer, offer: str, case: Any) -> None:
    asyncio.run(play(server, offer, *case))


def test_an_id_that_is_not_text_is_not_echoed(server: RunningServer) -> None:
    """Found by the fuzzing: a message that failed to parse, whose ``id`` held a lone surrogate,
    was answered with that ``id``, which cannot be encoded: ``internal``, 1011 and a traceback."""

    async def probe() -> list[dict[str, Any]]:
        async with websockets.connect(server.ws_url) as ws:
            replies = []
            for text in (
                '{"type": "ping", "id": "\\ud800"}',
                '{"type": "hello", "token": 5, "id": ["x\\udfff"]}',
                '{"type": "ping", "id": "\\ud83d\\ude00"}',  # a surrogate pair is text: echoed
            ):
                await ws.send(text)
                replies.append(json.loads(await ws.recv()))
            return replies

    log_from = len(server.log())
    first, second, third = asyncio.run(probe())
    assert first["code"] == "bad_message" and "id" not in first
    assert second["code"] == "bad_message" and "id" not in second
    assert third == {"type": "pong", "id": "😀"}
    assert "Traceback" not in server.log()[log_from:]


def test_the_fuzzed_server_still_serves_a_clip(server: RunningServer) -> None:
    """Run after the fuzzing (same module server): it still renders and streams a clip."""

    async def clip() -> dict[str, Any]:
        async with websockets.connect(server.ws_url, max_size=None) as ws:
            await ws.send(json.dumps({"type": "hello", "token": mint("after-fuzz", "normal")}))
            await ws.send(json.dumps({"type": "start", "avatar": "astronaut", "mode": "clip", "transport": "mse",
                                      "audio": {"format": "wav"}}))
            await ws.send(tone_wav(1.0))
            await ws.send(json.dumps({"type": "audio_end"}))
            async with asyncio.timeout(60):
                while True:
                    raw = await ws.recv()
                    if isinstance(raw, str) and (msg := json.loads(raw))["type"] in ("done", "error"):
                        return dict(msg)

    done = asyncio.run(clip())
    assert done["type"] == "done" and done["frames"] == 25
