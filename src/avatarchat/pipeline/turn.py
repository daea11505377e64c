"""One turn: user text → streamed LLM text → spoken pieces → TTS → avatar frames → fMP4 → client.

Three asyncio stages joined by bounded queues run concurrently, so piece 2 is synthesized while
piece 1 renders. CPU work (LLM steps, TTS, rendering, encoding) runs in the CPU scheduler's slots,
never on the loop, each unit at the turn's deadline (pipeline/scheduler.py): before the first
fragment, the first-video target; then when the person's player would run out of media.
Cancelling the task that runs ``Turn.run`` stops every stage at its next await.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Protocol

from avatarchat import metrics
from avatarchat.config import Settings
from avatarchat.engines.llm.base import LLMEngine, LLMError
from avatarchat.engines.tts.base import RemoteTTSEngine, TTSEngine, TTSError
from avatarchat.engines.types import Speech
from avatarchat.pipeline.avatar_media import AvatarMedia, MediaError, MediaStream
from avatarchat.pipeline.capacity import Capacity
from avatarchat.pipeline.history import History, cjk_count, script_language, with_language_cue
from avatarchat.pipeline import scheduler as sched
from avatarchat.pipeline.echo import EchoReference
from avatarchat.pipeline.media import Piece, Timeline, speakable
from avatarchat.pipeline.segmenter import Segmenter

log = logging.getLogger(__name__)

_FIRST_BATCH = 2  # frames: the first fragment leaves as soon as possible
_SYNTH_LEAD_S = 0.3  # the LLM's text for a piece is due this long before its speech, for the TTS to run
# Audio is encoded batch by batch, this many samples ahead of the video: the first fragment does not
# pay for a whole piece's AAC, and even after the encoder's one-frame delay every fragment carries
# more audio than video, so MediaSource's buffered range is set by the video.
_AUDIO_LEAD = 3072


class Sender(Protocol):
    async def event(self, type: str, **fields: object) -> None: ...

    async def media(self, turn_id: int, payload: bytes) -> None: ...


class TurnError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class TurnResult:
    reason: str
    text: str
    spoken: str
    media_ms: int
    timings: dict[str, int] = field(default_factory=dict)


class Turn:
    def __init__(
        self,
        *,
        turn_id: int,
        user_text: str,
        settings: Settings,
        llm: LLMEngine,
        tts: TTSEngine,
        media: AvatarMedia,
        avatar: str,
        history: History,
        cpu: sched.CpuScheduler,
        send: Sender,
        capacity: Capacity | None = None,
        first_frame: int = 0,
        t0: float | None = None,
    ) -> None:
        self.turn_id = turn_id
        self.user_text = user_text
        self._s = settings
        self._llm = llm
        self._tts = tts
        self._media = media
        self._avatar = avatar
        self._history = history
        self._cpu = cpu
        self._capacity = capacity
        self._send = send
        self._t0 = t0 if t0 is not None else time.perf_counter()
        p = settings.pipeline
        self.deadline = sched.Deadline(self._t0, p.first_video_target_ms / 1000, p.deadline_margin_ms / 1000)
        self._frame = first_frame
        self._first_frame = first_frame
        self._tail_frames = 0
        self.reply = ""
        self._spoken: list[str] = []
        self.timings: dict[str, int] = {}
        self._stream: MediaStream | None = None
        self._opening: asyncio.Future[MediaStream] | None = None  # the stream, prepared while the LLM and TTS work
        self._timeline: Timeline | None = None
        self.sentences: list[tuple[int, int, str]] = []  # (start ms, duration ms, text) of each spoken piece
        self.echo = EchoReference()  # what was said, for telling the avatar's voice from the person's
        self.discarded = False  # a speculative turn that was dropped: it leaves no trace in the history
        self.silent_at: float | None = None  # perf_counter() when the client's speakers went quiet: its end, a stop
        self.stopped_ms: float | None = None  # where playback was when it was stopped (the client flushes its player)
        self._cut_ms = 0.0  # estimated speech of the pieces the LLM's text has been cut into so far

    @property
    def first_media_at(self) -> float | None:
        """perf_counter() when the first fragment went out."""
        return self.deadline.first_media_at

    def _next_text_due(self) -> float:
        """When the LLM's next words are needed: in time to synthesize them before the speech of the pieces
        already cut has played. That speech is not synthesized yet: its length is estimated from the text,
        on the short side."""
        return self.deadline.at(0.8 * self._cut_ms) - _SYNTH_LEAD_S

    def _next_speech_due(self) -> float:
        """When the next piece's speech (and the LLM text it needs) must be ready: when the player
        reaches the end of what is synthesized so far."""
        return self.deadline.at(self._timeline.ms if self._timeline is not None else 0)

    def _next_frames_due(self) -> float:
        return self.deadline.at((self._frame - self._first_frame) * 1000 / self._s.avatar.fps)

    @property
    def next_frame(self) -> int:
        return self._frame

    @property
    def media_ms(self) -> int:
        if self._timeline is None:
            return 0
        return self._timeline.ms + round(self._tail_frames * 1000 / self._s.avatar.fps)

    def played_text(self, position_ms: float) -> str:
        """The part of the reply heard by ``position_ms`` of playback: whole pieces, then a share of words."""
        out: list[str] = []
        for start, duration, text in self.sentences:
            if position_ms >= start + duration:
                out.append(text)
            elif position_ms > start:
                words = text.split()
                n = int(len(words) * (position_ms - start) / max(duration, 1))
                if n:
                    out.append(" ".join(words[:n]))
                break
            else:
                break
        return " ".join(out)

    def result(self, reason: str) -> TurnResult:
        spoken = self.reply if reason == "complete" else " ".join(self._spoken)
        return TurnResult(reason, self.reply, spoken, self.media_ms, dict(self.timings))

    async def run(self) -> TurnResult:
        """Run to the end (the session has sent its turn_start). Raises TurnError on an engine failure, CancelledError
        when stopped."""
        asked = with_language_cue(self.user_text) if self._s.llm.language_cue else self.user_text
        messages = self._history.messages(asked)
        texts: asyncio.Queue[str | None] = asyncio.Queue(self._s.pipeline.queue_size)
        pieces: asyncio.Queue[Piece | None] = asyncio.Queue(self._s.pipeline.queue_size)
        completed = False
        sched.current.set(self._next_text_due)  # the LLM engine reads it (this task's context)
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._llm_stage(messages, texts))
                tg.create_task(self._tts_stage(texts, pieces))
                tg.create_task(self._media_stage(pieces))
            completed = True
        except* Exception as group:
            raise _turn_error(group) from None
        finally:
            self._release_stream()
            if not self.discarded:
                self._history.add("user", self.user_text)
                self._history.add("assistant", self.reply if completed else " ".join(self._spoken))
        self._mark("turn")
        return self.result("complete")

    # -- stages ---------------------------------------------------------------------------------

    async def _llm_stage(self, messages: list[dict[str, str]], out: asyncio.Queue[str | None]) -> None:
        p = self._s.pipeline
        seg = Segmenter(p.first_piece_max_words, p.piece_max_chars, p.first_piece_min_words, p.eager_pieces)
        try:
            async for delta in self._llm.stream(
                messages, max_tokens=self._s.llm.max_tokens, temperature=self._s.llm.temperature
            ):
                if not self.reply:
                    self._mark("first_text")
                self.reply += delta
                await self._send.event("text_delta", turn_id=self.turn_id, delta=delta)
                for piece in seg.push(delta):
                    self._mark("first_piece")
                    self._cut_ms += speech_ms_estimate(piece) / self._s.tts.rate
                    await out.put(piece)
        except LLMError as e:
            raise TurnError("llm_failed", str(e)) from e
        for piece in seg.flush():
            self._mark("first_piece")
            await out.put(piece)
        await out.put(None)

    async def _tts_stage(self, inp: asyncio.Queue[str | None], out: asyncio.Queue[Piece | None]) -> None:
        timeline = self._timeline = Timeline(self._s.avatar.fps, self._audio_rate())
        rate = self._s.tts.rate

        def spoke(speech: Speech, took: float) -> None:
            metrics.STAGE_SECONDS.labels("tts").observe(took)
            if self._capacity is not None:
                self._capacity.observe_speech(speech.duration)

        def synth(text: str) -> Piece:
            start = time.perf_counter()
            speech = self._tts.synthesize(text, rate=rate)
            took = time.perf_counter() - start
            spoke(speech, took)
            _SYNTH_RTF.observe(took / max(speech.duration, 0.05))
            return timeline.prepare(speech)

        said = False
        while True:
            text = await inp.get()
            last = text is None
            if last:
                # Nothing speakable in the whole reply (emoji, markup): a short spoken stand-in, so it still answers.
                fallbacks = self._s.pipeline.unspeakable_reply
                text = "" if said else fallbacks.get(script_language(self.user_text), fallbacks.get("en", ""))
            spoken = speakable(text)
            if not spoken:
                if last:
                    break
                continue
            said = True
            # Due when the speech before it has played, less the time it takes to synthesize.
            due = self._next_speech_due() - _SYNTH_RTF.value * speech_ms_estimate(spoken) / 1000 / rate
            try:
                if isinstance(self._tts, RemoteTTSEngine):  # the work is elsewhere: await it, hold no slot
                    start = time.perf_counter()
                    speech = await self._tts.speak(spoken, rate=rate)
                    spoke(speech, time.perf_counter() - start)
                    piece = await self._cpu.run(timeline.prepare, speech, deadline=due, kind="tts")
                else:
                    piece = await self._cpu.run(synth, spoken, deadline=due, kind="tts")
            except TTSError as e:
                raise TurnError("tts_failed", str(e)) from e
            self._mark("first_audio")
            await out.put(piece)
            if last:
                break
        await out.put(None)

    async def _media_stage(self, inp: asyncio.Queue[Piece | None]) -> None:
        batch = self._s.pipeline.render_batch_frames
        index = 0
        start_ms = 0
        self._opening = asyncio.ensure_future(self._media.open(self._avatar, self._audio_rate(),
                                                               deadline=self.deadline.at(0)))
        while (piece := await inp.get()) is not None:
            stream = self._stream or await self._take_opened_stream()
            await self._send.event(
                "sentence",
                turn_id=self.turn_id,
                index=index,
                text=piece.text,
                start_ms=start_ms,
                duration_ms=round(piece.frames * 1000 / self._s.avatar.fps),
            )
            self.sentences.append((start_ms, round(piece.frames * 1000 / self._s.avatar.fps), piece.text))
            if piece.bands is not None:
                self.echo.add(piece.bands, start_ms)
            pos = 0
            fed = 0  # samples of this piece's audio given to the encoder
            while pos < piece.frames:
                await self._pace()
                n = _FIRST_BATCH if "first_video" not in self.timings else batch
                rows = piece.mouth[pos : pos + n]
                until = piece.audio_until(pos + len(rows), _AUDIO_LEAD)
                audio, fed = piece.audio[fed:until], max(fed, until)
                # Frames are counted where they are rendered (pipeline/avatar_media.py), maybe another process.
                try:
                    data = await stream.batch(rows, self._frame, audio if len(audio) else None,
                                              deadline=self._next_frames_due())
                except MediaError as e:
                    raise TurnError(e.code, str(e)) from e
                pos += len(rows)
                self._frame += len(rows)
                await self._emit(data)
            self._spoken.append(piece.text)
            start_ms += round(piece.frames * 1000 / self._s.avatar.fps)
            index += 1
        if self._stream is not None:
            stream = self._stream
            try:
                tail = await stream.close()
            except MediaError as e:
                raise TurnError(e.code, str(e)) from e
            # close() may repeat the last frame to cover the AAC tail: count it in the media duration.
            self._tail_frames = stream.frames - (self._frame - self._first_frame)
            await self._emit(tail)

    # -- helpers --------------------------------------------------------------------------------

    def _audio_rate(self) -> int:
        configured = self._s.video.audio_sample_rate
        if configured:
            return configured
        rate = getattr(self._tts, "sample_rate", 22050)
        return rate if rate in (16000, 22050, 24000, 32000, 44100, 48000) else 48000

    async def _take_opened_stream(self) -> MediaStream:
        assert self._opening is not None
        try:
            # Shielded: a stop here must not cancel the opening; _release_stream drops what it opens.
            self._stream = await asyncio.shield(self._opening)
        except MediaError as e:
            raise TurnError(e.code, str(e)) from e
        self._opening = None
        return self._stream

    async def _emit(self, data: bytes) -> None:
        if not data:
            return
        if "first_video" not in self.timings:
            assert self._stream is not None
            await self._send.event("media_start", turn_id=self.turn_id, mime=self._stream.mime)
            self._mark("first_video")
            self.deadline.first_media_at = time.perf_counter()
        metrics.MEDIA_BYTES.inc(len(data))
        await self._send.media(self.turn_id, data)

    async def _pace(self) -> None:
        """Stay at most ``pipeline.max_lead_ms`` ahead of playback: rendering far ahead of the listener
        takes the cores from the next piece's LLM and TTS (a stall the person sees), and is wasted
        when they interrupt."""
        if self.first_media_at is None:
            return
        sent_ms = (self._frame - self._first_frame) * 1000 / self._s.avatar.fps
        ahead_ms = sent_ms - (time.perf_counter() - self.first_media_at) * 1000
        if ahead_ms > self._s.pipeline.max_lead_ms:
            await asyncio.sleep((ahead_ms - self._s.pipeline.max_lead_ms) / 1000)

    def _release_stream(self) -> None:
        opening, self._opening = self._opening, None
        if opening is not None:  # prepared but never used: the turn ended before its first piece
            opening.add_done_callback(_abort_opened)
        stream, self._stream = self._stream, None
        if stream is not None:
            stream.abort()  # a no-op once closed; else dropped when its batch in flight returns

    def _mark(self, name: str) -> None:
        if name not in self.timings:
            elapsed = time.perf_counter() - self._t0
            self.timings[name] = round(elapsed * 1000)
            metrics.STAGE_SECONDS.labels(name).observe(elapsed)


class _Ratio:
    """A moving average (synthesis time over speech time), shared by all turns."""

    def __init__(self, value: float) -> None:
        self.value = value

    def observe(self, sample: float) -> None:
        self.value = 0.9 * self.value + 0.1 * min(sample, 2.0)


_SYNTH_RTF = _Ratio(0.1)


def speech_ms_estimate(text: str) -> float:
    """About how long ``text`` takes to say: ~65 ms a letter in alphabetic scripts, ~220 ms a CJK character."""
    cjk = cjk_count(text)
    return 65.0 * (len(text) - cjk) + 220.0 * cjk


def _abort_opened(future: asyncio.Future[MediaStream]) -> None:
    if not future.cancelled() and future.exception() is None:  # exception() also marks a failure as seen
        future.result().abort()


def _turn_error(group: BaseExceptionGroup[Exception]) -> TurnError:
    """The error a failed turn reports: an engine's own, or, for a bug, a generic one (logged in full)."""
    errors: list[BaseException] = []
    stack: list[BaseException] = [group]
    while stack:
        e = stack.pop(0)
        if isinstance(e, BaseExceptionGroup):
            stack = list(e.exceptions) + stack
        else:
            errors.append(e)
    for e in errors:
        if isinstance(e, TurnError):
            return e
    log.error("turn failed", exc_info=errors[0])
    return TurnError("internal_error", f"the reply failed ({type(errors[0]).__name__})")
