"""The turn pipeline with a scripted OpenAI-compatible upstream (deterministic text), real Piper and the real renderer."""

from __future__ import annotations

import asyncio
import io
from typing import Any

import av
import pytest

from avatarchat.config import Settings, load_settings
from avatarchat.engines.avatar.library import AvatarLibrary
from avatarchat.engines.llm.openai_compat import OpenAIEngine
from avatarchat.engines.tts.base import TTSError
from avatarchat.engines.tts.piper import PiperEngine
from avatarchat.pipeline.avatar_media import LocalAvatarMedia
from avatarchat.pipeline.history import History
from avatarchat.pipeline.scheduler import CpuScheduler
from avatarchat.pipeline.segmenter import split_text
from avatarchat.pipeline.turn import Turn, TurnError
from tests.support.openai_server import OpenAITestServer


class Recorder:
    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.chunks: list[tuple[int, bytes]] = []
        self.log: list[str] = []

    async def event(self, type: str, **fields: object) -> None:
        self.events.append({"type": type, **fields})
        self.log.append(type)

    async def media(self, turn_id: int, payload: bytes) -> None:
        self.chunks.append((turn_id, payload))
        self.log.append("media")

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["type"] == kind]


@pytest.fixture(scope="module")
def parts() -> tuple[PiperEngine, Any, CpuScheduler]:
    tts = PiperEngine(load_settings().tts.piper)
    tts.load()
    library = AvatarLibrary(None, 25)
    library.renderer("default")  # loaded once for the module
    cpu = CpuScheduler(2)
    yield tts, library, cpu
    cpu.close()


def make_turn(settings: Settings, upstream: OpenAITestServer, parts: Any, rec: Recorder, history: History,
              tts: Any = None) -> tuple[Turn, OpenAIEngine]:
    piper, library, cpu = parts
    llm = OpenAIEngine(settings.llm.openai.model_copy(update={"base_url": upstream.base_url}))
    turn = Turn(turn_id=1, user_text="Hi", settings=settings, llm=llm, tts=tts or piper,
                media=LocalAvatarMedia(library, cpu, settings), avatar="default",
                history=history, cpu=cpu, send=rec)
    return turn, llm


async def test_pieces_are_spoken_in_order_with_continuous_media(upstream: OpenAITestServer, parts: Any) -> None:
    upstream.behaviour.reply = "Sure thing, here we go. This is the second sentence! And a third one?"
    upstream.behaviour.token_delay_s = 0.01
    settings = load_settings()
    rec, history = Recorder(), History("sys", 500)
    turn, llm = make_turn(settings, upstream, parts, rec, history)
    result = await turn.run()
    await llm.close()
    assert result.reason == "complete" and result.text == upstream.behaviour.reply
    sentences = rec.of("sentence")
    p = settings.pipeline
    assert [s["text"] for s in sentences] == split_text(
        upstream.behaviour.reply, p.first_piece_max_words, p.first_piece_min_words, p.eager_pieces
    )
    assert [s["index"] for s in sentences] == list(range(len(sentences)))
    # The first text delta goes out before any media, and media_start precedes the first binary frame.
    assert rec.log.index("text_delta") < rec.log.index("media_start") < rec.log.index("media")
    data = b"".join(p for _, p in rec.chunks)
    with av.open(io.BytesIO(data)) as c:
        n = sum(1 for _ in c.decode(video=0))
    assert n * 40 == result.media_ms
    # The sentences tile the media; at most the AAC tail (one repeated frame or two) comes after them.
    assert 0 <= result.media_ms - sum(s["duration_ms"] for s in sentences) <= 80
    assert history.messages()[-1] == {"role": "assistant", "content": upstream.behaviour.reply}
    assert set(result.timings) >= {"first_text", "first_audio", "first_video", "turn"}


async def test_llm_failure_mid_stream_is_a_turn_error(upstream: OpenAITestServer, parts: Any) -> None:
    upstream.behaviour.reply = "One two three four five six seven. Eight nine ten."
    upstream.behaviour.drop_after_tokens = 3
    rec, history = Recorder(), History("sys", 500)
    turn, llm = make_turn(load_settings(), upstream, parts, rec, history)
    with pytest.raises(TurnError) as err:
        await turn.run()
    await llm.close()
    assert err.value.code == "llm_failed"
    assert history.turns[0].content == "Hi"


class BrokenTTS:
    name = "broken"
    sample_rate = 22050

    def load(self) -> None: ...

    def voices(self) -> list[str]:
        return []

    def synthesize(self, text: str, *, rate: float = 1.0) -> Any:
        raise TTSError("voice exploded")


async def test_tts_failure_is_a_turn_error(upstream: OpenAITestServer, parts: Any) -> None:
    rec = Recorder()
    turn, llm = make_turn(load_settings(), upstream, parts, rec, History("sys", 500), tts=BrokenTTS())
    with pytest.raises(TurnError, match="voice exploded") as err:
        await turn.run()
    await llm.close()
    assert err.value.code == "tts_failed"


class BuggyTTS(BrokenTTS):
    def synthesize(self, text: str, *, rate: float = 1.0) -> Any:
        raise TypeError("a bug, not an engine failure")


async def test_a_bug_in_a_stage_still_ends_the_turn_with_an_error(upstream: OpenAITestServer, parts: Any) -> None:
    """Not an engine's own error: the turn still ends with a TurnError (the session sends error + turn_done)."""
    turn, llm = make_turn(load_settings(), upstream, parts, Recorder(), History("sys", 500), tts=BuggyTTS())
    with pytest.raises(TurnError, match="TypeError") as err:
        await turn.run()
    await llm.close()
    assert err.value.code == "internal_error"


async def test_cancel_keeps_only_spoken_pieces_in_history(upstream: OpenAITestServer, parts: Any) -> None:
    upstream.behaviour.reply = "First piece here, then more. " + "Slow words keep coming here. " * 10
    upstream.behaviour.token_delay_s = 0.03
    rec, history = Recorder(), History("sys", 2000)
    turn, llm = make_turn(load_settings(), upstream, parts, rec, history)
    task = asyncio.create_task(turn.run())
    for _ in range(1000):
        if len(rec.of("sentence")) >= 2:  # the first piece is fully rendered and sent
            break
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await llm.close()
    spoken = history.turns[-1].content
    assert spoken.startswith("First piece here,")
    assert len(spoken) < len(turn.reply) < len(upstream.behaviour.reply)


async def test_each_unit_of_work_is_due_when_the_player_needs_it(upstream: OpenAITestServer, parts: Any) -> None:
    """Before the first fragment, the turn's units are due at its first-video target; afterwards, when the
    player would run out of what was made so far (pipeline/scheduler.py)."""
    upstream.behaviour.reply = "Sure thing, here we go now. This is the second sentence! And a third one? And more."
    upstream.behaviour.token_delay_s = 0.005
    settings = load_settings()
    piper, _, cpu = parts
    seen: list[tuple[str, float]] = []
    submit = cpu.submit

    def spy(fn: Any, *args: Any, deadline: float = float("inf"), kind: str = "other") -> Any:
        seen.append((kind, deadline))
        return submit(fn, *args, deadline=deadline, kind=kind)

    cpu.submit = spy  # type: ignore[method-assign]
    try:
        rec = Recorder()
        turn, llm = make_turn(settings, upstream, parts, rec, History("sys", 500))
        result = await turn.run()
        await llm.close()
    finally:
        del cpu.submit
    assert result.reason == "complete"
    target = turn.deadline.t0 + settings.pipeline.first_video_target_ms / 1000
    tts = [d for k, d in seen if k == "tts"]
    renders = [d for k, d in seen if k == "render"]
    assert renders[0] == pytest.approx(target)  # the stream's opening
    # The first piece's speech: due at the target, less the time it takes to synthesize.
    assert target - 1.0 < tts[0] < target
    first_media = turn.first_media_at
    assert first_media is not None
    margin = settings.pipeline.deadline_margin_ms / 1000
    # Later pieces: due when the speech before them has played (never before the first fragment went out).
    assert all(d >= first_media - margin - 1.0 for d in tts[2:])
    # Render batches after the first are due as the media before them plays out, in order (the last
    # unit is the stream's close, due as it comes).
    later = renders[2:-1]
    assert later == sorted(later) and later[-1] - later[0] > 1.0
