"""Voice input for one session: mic PCM → VAD turn-taking → partial and final transcripts → turns.

The final transcript, and the reply itself, start speculatively once the person has been silent for
``voice.speculate_after_ms``; the reply is held (nothing reaches the client) until the silence reaches
``voice.silence_ms``, and both are dropped if the person speaks again. So ASR, the LLM's first clause
and the first TTS all hide inside the end-of-turn silence window.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from avatarchat import metrics
from avatarchat.engines.asr.base import ASRError
from avatarchat.engines.asr.queue import FINAL, PARTIAL
from avatarchat.pipeline.echo import HOP, EchoCheck, band_energy, own_words_share
from avatarchat.pipeline.turn_taking import EndOfTurn, Partial, Resumed, SpeechStart, Speculate, State, TurnTaker

if TYPE_CHECKING:
    from avatarchat.pipeline.session import Session
    from avatarchat.pipeline.turn import Turn

log = logging.getLogger(__name__)

_MIC_KEEP = 2 * 16000  # the echo check's window (1.8 s) and a little more
_RECHECK = 1024  # a held utterance is checked again every 64 ms of audio
_SURE = 0.85  # this much unexplained is the person at once
OWN_WORDS = 0.5  # a transcript with at least this share of the avatar's own words is its echo


@dataclass
class _Speculation:
    utterance_id: int
    task: asyncio.Task[str] = field(repr=False)
    turn_started: bool = False
    starter: asyncio.Future[Turn] | None = field(default=None, repr=False)


class VoiceInput:
    def __init__(self, session: Session) -> None:
        self._session = session
        engines = session.engines
        s = session.settings
        self._voice = s.voice
        self._asr = engines.asr
        self.taker = TurnTaker(engines.vad.stream(), s.vad, s.voice, s.asr.partial_interval_ms)
        self._partial: asyncio.Task[None] | None = None
        self._spec: _Speculation | None = None
        self._final: asyncio.Task[None] | None = None
        self._asr_ms = 0
        self._echo = EchoCheck()
        self._mic = np.zeros(0, np.float32)  # the last seconds of the microphone, for the echo check
        self._mic_samples = 0
        self._held: int | None = None  # an utterance that may be the avatar's own voice: not the person's yet
        self._checked_at = 0
        self._echo_at: int | None = None  # when the held utterance was last found to be an echo
        self._over = 0  # checks in a row over the threshold
        self._words: asyncio.Task[None] | None = None  # a transcript of an unsure sound, to compare with the avatar's
        self._words_say_person = False

    @property
    def last_asr_ms(self) -> int:
        """How long the last utterance's recognition took (ms)."""
        return self._asr_ms

    async def feed(self, pcm: bytes) -> None:
        """Take one frame of 16 kHz mono signed 16-bit little-endian PCM."""
        samples = np.frombuffer(pcm, dtype="<i2").astype(np.float32) / 32768.0
        session = self._session
        self._mic = np.concatenate([self._mic, samples])[-_MIC_KEEP:]
        self._mic_samples += len(samples)
        speaking = session.speaking
        checking = self._voice.echo_check
        # Without the echo check, a fixed guard: while the avatar talks, only longer speech counts.
        self.taker.confirm_ms = (
            max(self._voice.speech_confirm_ms, self._voice.barge_in_min_ms)
            if speaking and not checking else self._voice.speech_confirm_ms
        )
        for event in self.taker.push(samples):
            if isinstance(event, SpeechStart):
                self._words_say_person = False
                if checking and session.may_echo and not self._person():
                    self._held = event.utterance_id  # the avatar's own voice, or not yet known: wait
                    continue
                await self._speech_started(event.voiced_ms, speaking)
            elif self._held is not None:
                if isinstance(event, EndOfTurn):
                    self._held = None
                    self._over = 0
                    metrics.ECHOES.inc()
            elif isinstance(event, Partial):
                if self._partial is None or self._partial.done():
                    self._partial = asyncio.create_task(self._run_partial(event.audio, self.taker.utterance_id))
            elif isinstance(event, Speculate):
                await self._drop_speculation()
                task = asyncio.create_task(self._timed_asr(event.audio))
                self._spec = _Speculation(event.utterance_id, task)
                task.add_done_callback(lambda t, spec=self._spec: self._on_speculative_text(spec, t))
            elif isinstance(event, Resumed):
                await self._drop_speculation()
            elif isinstance(event, EndOfTurn):
                self._final = asyncio.create_task(self._finish(event))
        # A held utterance is checked again while it sounds like speech (its trailing silence says nothing).
        if self._held is not None and (self._words_say_person or (
                self.taker.state is State.SPEAKING and self._mic_samples - self._checked_at >= _RECHECK)):
            if self._words_say_person or self._person():
                # The person, over the avatar's voice: keep only their part of the utterance.
                self._held = None
                if self._echo_at is not None:
                    self.taker.keep_last(round((self._mic_samples - self._echo_at) * 1000 / 16000) + 300)
                await self._speech_started(self.taker.voiced_ms, session.speaking)

    def restart_clock(self) -> None:
        """The client (re)started its microphone: its sample count starts again at zero."""
        self._mic_samples = self._checked_at = 0
        self._echo_at = None
        self._mic = np.zeros(0, np.float32)

    async def _speech_started(self, voiced_ms: int, speaking: bool) -> None:
        self._echo_at = None
        self._over = 0
        self._words_say_person = False
        await self._session.send.event("speech_start", voiced_ms=voiced_ms)
        if speaking and self._voice.barge_in:
            metrics.BARGE_INS.inc()
            await self._session.interrupt()

    def _person(self) -> bool:
        """Is the newest sound the person, not the avatar's voice coming back through the microphone?"""
        self._checked_at = self._mic_samples
        bands = band_energy(self._mic)
        ends = self._mic_samples - len(self._mic) + HOP * np.arange(1, len(bands) + 1)  # each frame's last sample
        source = self._session.echo_source(ends, self._mic_samples)
        if source is None:
            return True
        ref, positions = source
        left = self._echo.unexplained(bands[: len(positions)], ref, positions)
        log.debug("echo check", extra={"session": self._session.id, "unexplained": None if left is None else round(left, 3),
                                       "position_ms": round(float(positions[-1])) if len(positions) else None,
                                       "lag_ms": self._echo.last_lag_ms})
        if left is None:
            return False  # too early in the reply to tell: wait for more of it
        if left < self._voice.echo_threshold:
            self._echo_at = self._mic_samples
            self._over = 0
            return False
        # Sure at once, or over the threshold twice running: an echo's misfit is mostly a lone spike (seen at the end
        # of replies under load), a person keeps talking. Yet in a reverberant room an echo can stay near the
        # threshold for a while, so the words get a veto: a transcript that is the avatar's own sentences is its echo.
        self._over += 1
        if left >= _SURE:
            return True
        if self._over < 2:
            return False
        if not self._voice.echo_words_check:
            return True
        if self._words is None or self._words.done():
            said = self._session.avatar_words()  # self._mic is replaced, never changed in place: no copy needed
            self._words = asyncio.ensure_future(self._compare_words(self._mic, said, self.taker.utterance_id))
        return False

    async def _compare_words(self, audio: np.ndarray, said: str, utterance_id: int) -> None:
        try:
            text = await self._asr.transcribe(audio, PARTIAL)
        except ASRError:
            return  # no evidence: the band fit goes on deciding alone
        share = own_words_share(text, said)
        if self._held != utterance_id:
            return  # that sound is over, or was already taken as the person's
        echo = share is None or share >= OWN_WORDS  # nothing Whisper calls words (a hum, a smeared echo) is no barge-in
        log.debug("echo words", extra={"session": self._session.id, "heard": text, "said": said, "own_share": share, "echo": echo})
        metrics.ECHO_WORD_CHECKS.labels("echo" if echo else "person").inc()
        if echo:
            self._over = 0
            self._echo_at = self._mic_samples
        else:
            self._words_say_person = True

    async def _timed_asr(self, audio: np.ndarray) -> str:
        start = time.perf_counter()
        text = await self._asr.transcribe(audio, FINAL)
        self._asr_ms = round((time.perf_counter() - start) * 1000)
        return text

    def _on_speculative_text(self, spec: _Speculation, task: asyncio.Task[str]) -> None:
        if task.cancelled() or task.exception() is not None or self._spec is not spec:
            return
        text = task.result().strip()
        if text and self.taker.state is State.TRAILING:
            spec.turn_started = True
            # Start the reply now; it stays held until the end of the turn.
            spec.starter = asyncio.ensure_future(self._session.user_text(text, held=True))

    async def _drop_speculation(self) -> None:
        spec, self._spec = self._spec, None
        if spec is None:
            return
        spec.task.cancel()
        if spec.starter is not None:
            await asyncio.gather(spec.starter, return_exceptions=True)
        if spec.turn_started:
            await self._session.discard_held()
            metrics.SPECULATIONS.labels("discarded").inc()

    async def _finish(self, end: EndOfTurn) -> None:
        session = self._session
        spec = self._spec if self._spec is not None and self._spec.utterance_id == end.utterance_id else None
        started = time.perf_counter()
        try:
            if spec is not None:
                text = (await asyncio.shield(spec.task)).strip()
            else:
                text = (await self._timed_asr(end.audio)).strip()
        except ASRError as e:
            await session.send.event("error", code="asr_failed", message=str(e), fatal=False)
            return
        except asyncio.CancelledError:
            if spec is not None and spec.task.cancelled():
                return
            raise
        # Where the time after the last voiced window went: the end-of-turn silence, then any ASR wait.
        timings = {
            "endpoint_ms": end.trailing_ms,
            "asr_ms": self._asr_ms,
            "asr_wait_ms": round((time.perf_counter() - started) * 1000),
            "speculative": spec is not None and spec.turn_started,
        }
        if not text:
            await session.send.event("transcript", final=True, text="", utterance_id=end.utterance_id, timings=timings)
            if spec is not None:
                self._spec = None
            return
        await session.send.event("transcript", final=True, text=text, utterance_id=end.utterance_id, timings=timings)
        if spec is not None and spec.turn_started:
            self._spec = None
            if spec.starter is not None:
                await spec.starter
            metrics.SPECULATIONS.labels("used").inc()
            await session.release_held()
        else:
            self._spec = None
            await session.user_text(text)

    async def _run_partial(self, audio: np.ndarray, utterance_id: int) -> None:
        try:
            text = (await self._asr.transcribe(audio, PARTIAL)).strip()
        except ASRError:
            return  # a lost partial is harmless; the final one reports errors
        if text and self.taker.utterance_id == utterance_id and self.taker.state in (State.SPEAKING, State.TRAILING):
            await self._session.send.event("transcript", final=False, text=text, utterance_id=utterance_id)

    async def close(self) -> None:
        tasks = [t for t in (self._partial, self._final, self._words) if t is not None and not t.done()]
        if self._spec is not None:
            tasks.append(self._spec.task)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._spec = None
