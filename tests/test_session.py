"""The session in-process: its state machine alone, then real sessions on a real node (lite engine)
whose outboxes write to lists instead of sockets. No server subprocess."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from stream_server.node import Node
from stream_server.outbox import Outbox
from stream_server.protocol import (
    AnyServerMessage,
    Cancel,
    Done,
    ErrorCode,
    ErrorMessage,
    Granted,
    Hello,
    ProtocolError,
    Queued,
    Welcome,
    parse_client_message,
    parse_server_message,
)
from stream_server.session.session import Session
from stream_server.session.state import REFUSALS, TRANSITIONS, Event, SessionStateMachine, SocketState
from stream_server.settings import AuthSettings, EngineSettings, QueueSettings, ServerSettings, Settings
from tests.server_harness import TEST_SECRET, mint, tone_wav

S, E = SocketState, Event

# --------------------------------------------------------------------------------------------
# The state machine alone
# --------------------------------------------------------------------------------------------


def test_a_request_goes_through_the_documented_states() -> None:
    machine = SessionStateMachine()
    for event in (E.HELLO, E.START, E.AUDIO, E.AUDIO_END, E.GRANT, E.OFFER, E.END, E.START, E.CANCEL, E.CLOSE):
        machine.apply(event)
    assert machine.history == [S.NEW, S.IDLE, S.QUEUED, S.STREAMING, S.IDLE, S.QUEUED, S.IDLE, S.CLOSED]


def test_a_resume_goes_straight_back_to_the_line() -> None:
    machine = SessionStateMachine()
    machine.apply(E.RESUME)
    machine.apply(E.GRANT)
    assert machine.history == [S.NEW, S.QUEUED, S.STREAMING]


@pytest.mark.parametrize("state", list(SocketState))
@pytest.mark.parametrize("event", list(Event))
def test_every_step_the_table_does_not_allow_is_refused_and_changes_nothing(state: SocketState, event: Event) -> None:
    if (state, event) in TRANSITIONS:
        return
    machine = SessionStateMachine()
    machine.state = state
    with pytest.raises(ProtocolError) as refused:
        machine.apply(event)
    assert machine.state is state and machine.history == [S.NEW]
    if state is S.NEW:
        assert refused.value.message == "the first message must be hello"
    elif event in REFUSALS:
        assert (refused.value.code, refused.value.message) == REFUSALS[event]


def test_the_client_hears_the_documented_codes() -> None:
    machine = SessionStateMachine()
    machine.apply(E.HELLO)
    machine.apply(E.START)
    with pytest.raises(ProtocolError) as busy:
        machine.check(E.START)
    assert busy.value.code is ErrorCode.BUSY
    with pytest.raises(ProtocolError) as early:
        machine.check(E.OFFER)
    assert early.value.code is ErrorCode.NOT_GRANTED


# --------------------------------------------------------------------------------------------
# Sessions on a node
# --------------------------------------------------------------------------------------------


class Wire:
    """What a session's outbox wrote, parsed as the client would parse it."""

    def __init__(self) -> None:
        self.messages: list[AnyServerMessage] = []
        self.media = 0
        self._arrived = asyncio.Condition()
        self.outbox = Outbox(self._send, coalesce_s=0.0)

    async def _send(self, item: str | bytes) -> None:
        async with self._arrived:
            if isinstance(item, bytes):
                self.media += len(item)
            else:
                self.messages.append(parse_server_message(item))
            self._arrived.notify_all()

    async def expect(self, kind: type[AnyServerMessage]) -> AnyServerMessage:
        """The first message of ``kind`` not asked for yet (waiting for it if need be)."""
        async with self._arrived:
            await asyncio.wait_for(
                self._arrived.wait_for(lambda: any(isinstance(m, kind) for m in self.messages)), 30
            )
            message = next(m for m in self.messages if isinstance(m, kind))
            self.messages.remove(message)
            return message


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[Node]:
    settings = Settings(
        server=ServerSettings(data_dir=tmp_path),
        auth=AuthSettings(hs256_secret=TEST_SECRET),
        engine=EngineSettings(kind="lite", slots=1),
        queue=QueueSettings(heartbeat_s=1.0, coalesce_s=0.0),
    )
    node = Node(settings)
    await node.start()
    try:
        yield node
    finally:
        await node.stop()


async def send(session: Session, wire: Wire, text: str) -> None:
    """As the socket handler does: a refused message becomes an ``error``."""
    try:
        await session.handle(parse_client_message(text))
    except ProtocolError as err:
        session.send_error(err)


def connect(node: Node) -> tuple[Session, Wire]:
    wire = Wire()
    return node.session(wire.outbox, "127.0.0.1"), wire


LIVE = '{"type":"start","avatar":"astronaut","mode":"live","transport":"mse"}'
CLIP = '{"type":"start","avatar":"astronaut","mode":"clip","transport":"mse","audio":{"format":"wav"}}'


def hello(sub: str, resume: str | None = None) -> str:
    return Hello(type="hello", token=mint(sub, "normal"), resume=resume).model_dump_json()


async def test_a_waiting_session_hears_its_place_and_is_granted_when_the_slot_frees(node: Node) -> None:
    holder, holder_wire = connect(node)
    await send(holder, holder_wire, hello("ann"))
    await holder_wire.expect(Welcome)
    await send(holder, holder_wire, LIVE)
    await holder_wire.expect(Queued)
    await holder_wire.expect(Granted)

    waiter, wire = connect(node)
    await send(waiter, wire, hello("bob"))
    await wire.expect(Welcome)
    await send(waiter, wire, CLIP)
    queued = await wire.expect(Queued)
    assert isinstance(queued, Queued) and (queued.position, queued.queue_size) == (1, 1)
    assert waiter.state is S.QUEUED

    await holder.handle(Cancel(type="cancel"))
    await wire.expect(Granted)
    await waiter.handle_audio(tone_wav(0.5))
    await send(waiter, wire, '{"type":"audio_end"}')
    done = await wire.expect(Done)
    assert isinstance(done, Done) and done.frames == 12 and done.clip is not None and wire.media > 0
    assert waiter.machine.history == [S.NEW, S.IDLE, S.QUEUED, S.STREAMING, S.IDLE]
    assert holder.machine.history == [S.NEW, S.IDLE, S.QUEUED, S.STREAMING, S.IDLE]


async def test_a_failed_resume_by_another_identity_keeps_the_owners_place(node: Node) -> None:
    holder, holder_wire = connect(node)
    await send(holder, holder_wire, hello("ann"))
    await send(holder, holder_wire, LIVE)  # holds the only slot
    await holder_wire.expect(Queued)

    owner, wire = connect(node)
    await send(owner, wire, hello("bob"))
    welcome = await wire.expect(Welcome)
    assert isinstance(welcome, Welcome)
    await send(owner, wire, CLIP)
    await wire.expect(Queued)
    await owner.disconnected()  # detached for the resume grace

    thief, thief_wire = connect(node)
    await send(thief, thief_wire, hello("mallory", resume=welcome.resume))
    refused = await thief_wire.expect(ErrorMessage)
    assert isinstance(refused, ErrorMessage) and refused.code is ErrorCode.SESSION_EXPIRED
    assert thief.state is S.IDLE

    back, back_wire = connect(node)
    await send(back, back_wire, hello("bob", resume=welcome.resume))
    resumed = await back_wire.expect(Welcome)
    assert isinstance(resumed, Welcome) and resumed.session == welcome.session
    queued = await back_wire.expect(Queued)
    assert isinstance(queued, Queued) and queued.position == 1
    assert back.machine.history == [S.NEW, S.QUEUED]
