"""Server messages: what they put on the wire is what docs/protocol.md shows, and clients can read
them back."""

from __future__ import annotations

import json

import pytest

from stream_server.protocol import Done, ErrorCode, ProtocolError, Queued, error_message, parse_server_message

# Server lines from the examples in docs/protocol.md, byte for byte.
DOCUMENTED = [
    '{"type":"welcome","session":"yKyd6X7i7QLR3nG2","tier":"normal","resume":"yKyd6X7i7QLR3nG2.9q0B5TkwcD7-rTDQ0mujoQ",'
    '"engine":"lite","limits":{"max_audio_seconds":120.0,"max_audio_bytes":20000000,"max_message_bytes":1048576,'
    '"max_live_session_s":1800.0,"fps":25},"id":1}',
    '{"type":"queued","position":2,"queue_size":2,"tier":"normal","eta_s":4.2}',
    '{"type":"queued","position":1,"queue_size":1,"tier":"low","eta_s":null}',
    '{"type":"granted","waited_s":7.109}',
    '{"type":"stream","transport":"mse","mime":"video/mp4; codecs=\\"avc1.4D401E, mp4a.40.2\\"","width":512,'
    '"height":512,"fps":25}',
    '{"type":"stream","transport":"webrtc","width":512,"height":512,"fps":25}',
    '{"type":"progress","frames":17,"total":30}',
    '{"type":"progress","frames":12}',
    '{"type":"done","frames":30,"duration_s":1.2,"clip":"/v1/clips/600583f12bf13aa95720a1151aee91fd4a410231.mp4"}',
    '{"type":"done","frames":50,"duration_s":2.0,"clip":null}',
    '{"type":"done","frames":0,"duration_s":1800.0}',
    '{"type":"webrtc_answer","sdp":"v=0\\r\\n","id":"o1"}',
    '{"type":"pong","id":"p"}',
    '{"type":"error","code":"queue_full","message":"the queue is full (1000 waiting)","retry_after_s":12.5}',
    '{"type":"redirect","url":"wss://node-2.example/v1/stream","grant":"g"}',
]


@pytest.mark.parametrize("line", DOCUMENTED)
def test_a_documented_message_reads_back_and_encodes_to_the_same_bytes(line: str) -> None:
    assert parse_server_message(line).encode() == line


def test_an_error_echoes_any_id_and_escapes_like_json_dumps() -> None:
    err = ProtocolError(ErrorCode.UNKNOWN_AVATAR, "no ready avatar 'été'", retry_after_s=2.345)
    body = {"type": "error", "code": "unknown_avatar", "message": "no ready avatar 'été'", "retry_after_s": 2.3,
            "id": [1, {"a": None}]}
    assert error_message(err, [1, {"a": None}]).encode() == json.dumps(body, separators=(",", ":"))
    assert error_message(err).encode().endswith('"retry_after_s":2.3}')


def test_a_live_time_limit_done_has_no_clip_and_a_clip_done_always_has_one() -> None:
    assert "clip" not in json.loads(Done(frames=0, duration_s=1800.0).encode())
    assert json.loads(Done(frames=3, duration_s=0.12, clip=None).encode())["clip"] is None


def test_what_is_not_a_server_message_is_refused() -> None:
    for text in ('{"type":"hello"}', '{"type":"queued","position":1}', "not json"):
        with pytest.raises(ValueError):
            parse_server_message(text)
    assert isinstance(parse_server_message('{"type":"queued","position":1,"queue_size":1,"tier":"vip",'
                                           '"eta_s":null,"new_field":1}'), Queued)
