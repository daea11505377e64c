"""Property-based fuzzing of the session WebSocket (Hypothesis), over a real socket to the real app.

Each example sends a few messages: JSON events of the known types with fields of any type and value, unknown
types, deep nesting, huge and non-finite numbers, odd Unicode (lone surrogates as JSON escapes), frames that
are not JSON, and binary frames with random headers. Then a ``ping``. The properties: the session stays open
and the ``ping`` gets its ``pong``; everything the server sent in between is strict JSON of a type the protocol
defines (an ``error`` is never fatal and never ``internal_error``) or a media frame; and nothing is logged at
ERROR or with an exception. Bounded and repeatable: derandomized, 2000 examples (~20 s on 2 cores).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import struct
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, note, settings, strategies as st
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from avatarchat.pipeline.session import Session
from avatarchat.server.ws import ProtocolError, parse_event
from tests.support.live_app import LiveApp
from tests.test_turn import Recorder

pytestmark = pytest.mark.timeout(240)
HEADER = struct.Struct(">2sBBI")
REPLY_TIMEOUT_S = 30.0  # a hang, not slowness: a ping is answered in milliseconds, a stopped turn within 100 ms
SERVER_TYPES = {"session", "session.updated", "turn_start", "text_delta", "sentence", "media_start", "turn_done",
                "error", "pong", "mic_ready", "speech_start", "transcript", "interrupt"}
FIELDS = {
    "hello": ("protocol",),
    "user_text": ("text",),
    "stop": (),
    "ping": ("id",),
    "mic_start": ("sample_rate", "format"),
    "mic_stop": (),
    "playback": ("turn_id", "position_ms", "playing"),
    "session.update": ("rate", "silence_ms", "voice", "language", "llm", "avatar"),
}
OPTIONS: dict[str, list[Any]] = {}  # what this server offers (the session event's settings.options)


class ErrorLog(logging.Handler):
    """Records at ERROR or with an exception, from the app and from uvicorn (whose loggers do not propagate)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.ERROR or record.exc_info:
            self.records.append(record)


@pytest.fixture(scope="module")
def errors() -> Iterator[ErrorLog]:
    handler = ErrorLog()
    loggers = [logging.getLogger(), logging.getLogger("uvicorn")]
    for lg in loggers:
        lg.addHandler(handler)
    yield handler
    for lg in loggers:
        lg.removeHandler(handler)


class LiveSession:
    """One WebSocket session kept across examples; opened again only after an example broke it."""

    def __init__(self, app: LiveApp) -> None:
        self.app = app
        self.ws: ClientConnection | None = None
        self._open = contextlib.ExitStack()
        self.pings = 0
        self.turns: set[int] = set()  # the turn ids this session announced with turn_start

    def socket(self) -> ClientConnection:
        if self.ws is None:
            self.ws = self._open.enter_context(connect(self.app.ws, max_size=None, open_timeout=REPLY_TIMEOUT_S))
            hello = json.loads(self.ws.recv(REPLY_TIMEOUT_S))
            assert hello["type"] == "session", hello
            OPTIONS.update(hello["settings"]["options"])
        return self.ws

    def drop(self) -> None:
        self._open.close()
        self.ws = None
        self.turns.clear()


@pytest.fixture(scope="module")
def session(live_app: LiveApp) -> Iterator[LiveSession]:
    s = LiveSession(live_app)
    s.socket()  # OPTIONS, before the first example is drawn
    yield s
    s.drop()


# -- what is sent ----------------------------------------------------------------------------------------

# Lone surrogates are one odd string in a dozen: in every string they would make nearly every event bad_unicode.
odd_text = st.text(max_size=40) | st.sampled_from(
    ["", " ", "\x00", "\u202e", "\ufeff", "e\u0301" * 50, "\U0001f600" * 30, "x" * 2001, "\ud800", "a\udfffb",
     "\u0000\u0085\u2028", "\U0010ffff"])
numbers = st.one_of(
    st.integers(), st.integers(-(2**70), 2**70), st.floats(),  # floats: NaN and ±inf, sent as NaN and Infinity
    st.integers(300, 4200).map(lambda n: 10**n),  # past float range, under Python's 4,300-digit int limit
)
leaves = st.one_of(st.none(), st.booleans(), numbers, odd_text)
values = st.recursive(leaves, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(odd_text, inner, max_size=4),
                      max_leaves=12)


def offered(key: str) -> st.SearchStrategy[Any]:
    return st.deferred(lambda: st.sampled_from(OPTIONS[key]))


# Values of the right type, often in range, so that valid events (and their replies) are generated too.
plausible = {
    "protocol": st.integers(0, 2), "text": odd_text, "id": values, "sample_rate": st.sampled_from([16000, 8000]),
    "format": st.sampled_from(["pcm_s16le", "f32"]), "turn_id": st.integers(-1, 3),
    "position_ms": st.floats(-10, 1e6) | st.integers(0, 10**6), "playing": st.booleans(),
    "rate": st.floats(0.4, 2.1) | st.integers(0, 3), "silence_ms": st.integers(100, 3100),
    "voice": odd_text | offered("voices"), "language": st.just("xx") | offered("languages"),
    "avatar": st.just("ghost") | offered("avatars"),
    "llm": st.fixed_dictionaries({}, optional={"provider": odd_text | values, "model": odd_text | values}) | offered("llm"),
}


@st.composite
def events(draw: st.DrawFn) -> str:
    kind = draw(st.sampled_from(sorted(FIELDS)) | odd_text)
    event: dict[str, Any] = {"type": kind}
    for name in FIELDS.get(kind, ()):
        if draw(st.booleans()):
            event[name] = draw(values if draw(st.integers(0, 3)) == 0 else plausible[name])
    if draw(st.integers(0, 4)) == 0:
        event.update(draw(st.dictionaries(odd_text, values, max_size=3)))
    if kind == "user_text" and isinstance(event.get("text"), str) and event["text"].strip():
        event["text"] = event["text"][:200]  # a real turn: stopped at once (below), but it starts
    return json.dumps(event)  # ASCII: lone surrogates go as "\ud800" escapes, as a browser could send them


def nested(depth: int, inner: str = "0") -> str:
    return "[" * depth + inner + "]" * depth


raw_texts = st.one_of(
    st.integers(1, 30_000).map(nested),  # past Python's recursion limit, under max_message_bytes
    st.integers(1, 800).map(lambda d: '{"type":"ping","id":' + nested(d) + "}"),  # echoed: the client parses it
    st.integers(1, 30).map(lambda d: '{"type":"ping","id":' + "{\"a\":" * d + "1" + "}" * d + "}"),
    st.sampled_from(['{"type":"ping","id":NaN}', '{"type":"ping","id":-Infinity}', '{"type":"ping","id":1e400}',
                     '{"type":"playback","turn_id":1,"position_ms":1e999}', '{"type":"ping","id":"\\udfff"}',
                     '{"type":"user_text","text":"\\ud83d"}', '{"type":"ping"', "", "null", "[]", '"ping"',
                     '{"type":"ping","type":"stop"}', '{"type":"ping","id":' + "9" * 5000 + "}",
                     '{"type":"playback","turn_id":' + "9" * 400 + ',"position_ms":' + "9" * 400 + "}"]),
    st.text(max_size=200),
    st.integers(60_000, 70_000).map(lambda n: '{"type":"user_text","text":"' + "a" * n + '"}'),  # around the limit
)
mic_frames = st.builds(lambda seq, pcm: HEADER.pack(b"AC", 1, 2, seq) + pcm,
                       st.integers(0, 2**32 - 1), st.binary(max_size=2048))
binary = st.one_of(
    st.binary(max_size=64),
    st.builds(lambda magic, version, kind, seq, rest: HEADER.pack(magic, version, kind, seq) + rest,
              st.binary(min_size=2, max_size=2) | st.just(b"AC"), st.integers(0, 255), st.integers(0, 255),
              st.integers(0, 2**32 - 1), st.binary(max_size=64)),
    mic_frames,
    st.integers(32_000, 40_000).map(lambda n: HEADER.pack(b"AC", 1, 2, 0) + bytes(n)),  # around the frame limit
)
# Valid events with odd but valid values: replies (a turn, session.updated) must come back right too.
valid_events = st.one_of(
    st.builds(lambda text: {"type": "user_text", "text": text[:200]},  # a real turn, stopped at once (below)
              st.text(st.characters(codec="utf-8"), min_size=1).filter(str.strip) | odd_text.filter(str.strip)),
    st.fixed_dictionaries({"type": st.just("session.update")}, optional={
        "rate": st.floats(0.5, 2.0), "silence_ms": st.integers(200, 3000), "voice": offered("voices"),
        "language": offered("languages"), "llm": offered("llm"), "avatar": offered("avatars")}),
    st.fixed_dictionaries({"type": st.just("playback"), "turn_id": st.integers(0, 2**53),
                           "position_ms": st.floats(-1e15, 1e15) | st.integers(-(2**53), 2**53)},
                          optional={"playing": st.booleans()}),
).map(json.dumps)
messages = st.lists(st.one_of(events(), valid_events, raw_texts, binary, st.just('{"type":"mic_start"}')),
                    min_size=1, max_size=4)


# -- what must come back ---------------------------------------------------------------------------------

def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def check_reply(message: str | bytes, turns: set[int]) -> None:
    if isinstance(message, bytes):
        magic, version, kind, turn_id = HEADER.unpack_from(message)
        assert (magic, version, kind) == (b"AC", 1, 1) and turn_id in turns, message[:16]
        return
    event = json.loads(message, parse_constant=_no_constant)  # strict JSON: a browser's JSON.parse would throw
    assert isinstance(event, dict) and event.get("type") in SERVER_TYPES, message[:300]
    if event["type"] == "turn_start":
        turns.add(event["turn_id"])
    elif "turn_id" in event:  # what concerns a turn comes after its turn_start
        assert event["turn_id"] in turns, event
    if event["type"] == "error":
        assert event.get("fatal") is False and event.get("code") != "internal_error", event
        assert isinstance(event.get("code"), str) and isinstance(event.get("message"), str), event
    for number in _numbers(event):
        assert math.isfinite(number), message[:300]


def _numbers(value: object) -> Iterator[float]:
    if isinstance(value, float):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _numbers(v)
    elif isinstance(value, list):
        for v in value:
            yield from _numbers(v)


@settings(max_examples=2000, derandomize=True, database=None, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example])
@given(batch=messages)
def test_any_message_leaves_the_session_usable(batch: list[str | bytes], session: LiveSession,
                                                errors: ErrorLog) -> None:
    note(f"sent: {[m[:200] for m in batch]!r}")  # shortened: a frame may be 70 KB
    seen = len(errors.records)
    session.pings += 1
    probe = f"probe-{session.pings}"
    ws = session.socket()
    try:
        for message in batch:
            ws.send(message)
        # End any turn or utterance the batch started, so the next example starts from a quiet session.
        ws.send('{"type":"stop"}')
        ws.send('{"type":"mic_stop"}')
        ws.send(json.dumps({"type": "ping", "id": probe}))
        while True:
            reply = ws.recv(REPLY_TIMEOUT_S)
            check_reply(reply, session.turns)
            if isinstance(reply, str) and json.loads(reply) == {"type": "pong", "id": probe}:
                break
    except TimeoutError:
        session.drop()
        pytest.fail(f"no pong within {REPLY_TIMEOUT_S:g} s")
    except ConnectionClosed as e:
        session.drop()
        pytest.fail(f"the server closed the session: {e}")
    except AssertionError:
        session.drop()
        raise
    logged = [f"{r.name}: {r.getMessage()}" for r in errors.records[seen:]]
    assert not logged, logged


# -- what it found, kept as plain regression tests -------------------------------------------------------------

@pytest.mark.parametrize("text, code", [
    ("[" * 30_000 + "]" * 30_000, "bad_json"),  # was a RecursionError: internal_error, and a logged traceback
    ('{"type":"ping","id":NaN}', "bad_json"),  # was echoed as NaN in the pong: not JSON for a browser
    ('{"type":"ping","id":-Infinity}', "bad_json"),
    ('{"type":"ping","id":1e400}', "bad_json"),  # inf, echoed as Infinity
    ('{"type":"playback","turn_id":1,"position_ms":' + "9" * 400 + "}", "invalid_field"),  # was an OverflowError
])
def test_found_by_fuzzing_is_refused(text: str, code: str) -> None:
    with pytest.raises(ProtocolError) as e:
        parse_event(text, 2000)
    assert e.value.code == code


def test_a_turn_stopped_at_once_was_still_announced(live_app: LiveApp) -> None:
    """A stop read right behind the user_text (both already buffered: no await in between) cancelled the turn's
    task before its first step, and the client got a turn_done for a turn it had never seen start."""
    async def user_text_then_stop() -> list[dict[str, Any]]:
        rec = Recorder()
        state = live_app.app.state  # not through the manager: its admission could refuse a busy machine
        session = Session(state.engines, rec, live_app.settings.avatar.default, lambda _: None, state.media)
        try:
            await session.user_text("hello")
            await session.cancel_turn("stopped")
        finally:
            await session.close()
        return rec.events

    events = live_app.call(user_text_then_stop())
    assert [e["type"] for e in events] == ["turn_start", "turn_done"], events
    assert events[1]["reason"] == "stopped" and events[0]["turn_id"] == events[1]["turn_id"]
