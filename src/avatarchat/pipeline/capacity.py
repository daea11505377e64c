"""How many real-time conversations this process can hold, and how to degrade when it is overloaded.

Admission (issue 13): a speaking session keeps a CPU slot of the scheduler busy ``cost`` seconds (LLM
steps, TTS, rendering and encoding) per second of its speech. It is measured at start-up by a
calibration that runs one spoken sentence through the engines (``calibrate_capacity``), then follows
the live figures as a moving average: the scheduler's busy slot-seconds of rendering over the seconds
of video rendered (``observe_video``), plus those of all other work over the seconds of speech
synthesized (``observe_speech``). Each is divided by what it produced: speech is synthesized in
bursts, pieces ahead of the video rendered at playback pace, and one ratio of both swung 0.13-0.22
over a burst of turns. Slot-seconds, not process CPU time: they leave out what
does not grow with sessions (the event loop, idle threads), and they grow when units slow each other
down, which is what limits the scheduler. The
process holds ``floor(slots × target_utilization / cost)`` sessions (within ``session.max_sessions``);
the next one is refused at once with ``server_busy`` and a retry hint, so live conversations keep
their quality.

Degradation: when live units miss their deadlines (the scheduler counts them), or any piece's speech
is synthesized late (a sentence boundary where a player may run dry), rendering halves its frame
work first (each rendered face is shown for two frames; the stream's timing and the speech are
unchanged), which a person notices far less than a stall. It recovers when the misses stop.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from avatarchat import metrics
from avatarchat.config import SessionConfig
from avatarchat.pipeline.scheduler import CpuScheduler

if TYPE_CHECKING:
    from avatarchat.engines.registry import Engines

log = logging.getLogger(__name__)


class Capacity:
    def __init__(self, config: SessionConfig, cpu: CpuScheduler, clock: Callable[[], float] = time.monotonic) -> None:
        self._config = config
        self._cpu = cpu
        self._clock = clock
        self._lock = threading.Lock()
        self.cost: float | None = None  # core-seconds per second of speech
        self._busy_mark = cpu.busy_by_kind()
        self._speech = 0.0  # seconds of speech synthesized since the mark
        self._video = 0.0  # seconds of video rendered since the mark
        self._render_cost: float | None = None  # of the cost, rendering's: slot-seconds per second of video
        self._late_mark = cpu.late_units()
        self._late_tts_mark = cpu.late_units("tts")
        self._units_mark = cpu.units()
        self._checked = clock()
        self.degrade = 0  # 0: full quality; 1: every rendered face shown for two frames
        self._calm_since = clock()

    # -- cost ------------------------------------------------------------------------------------

    def calibrated(self, busy_core_s: float, speech_s: float) -> None:
        if speech_s > 0:
            self.cost = busy_core_s / speech_s
            self._publish()

    def observe_video(self, seconds: float) -> None:
        """Frames for ``seconds`` of a stream were rendered and encoded."""
        with self._lock:
            self._video += seconds

    def observe_speech(self, seconds: float) -> None:
        """A piece of speech was synthesized: fold the live cost in once enough has been spoken."""
        with self._lock:
            self._speech += seconds
            if self._speech < self._config.capacity_window_s:
                return
            busy = self._cpu.busy_by_kind()
            spent = {kind: t - self._busy_mark.get(kind, 0.0) for kind, t in busy.items()}
            render = spent.pop("render", 0.0)
            spent.pop("calibrate", None)
            # Rendering per second of video when enough was rendered (a remote avatar service renders none).
            per_video = render / self._video if self._video >= 1.0 else None
            other = sum(spent.values()) / self._speech
            self._busy_mark, self._speech, self._video = busy, 0.0, 0.0
            if per_video is not None:
                self._render_cost = per_video
            sample = other + (self._render_cost or 0.0)
            # The live figure moves the estimate a little at a time: one odd window does not swing admission.
            self.cost = sample if self.cost is None else 0.7 * self.cost + 0.3 * sample
        self._publish()

    @property
    def sessions(self) -> int:
        """Real-time conversations this process holds."""
        c = self._config
        if c.admission == "fixed" or self.cost is None or self.cost <= 0:
            return c.max_sessions
        fit = math.floor(self._cpu.slots * c.target_utilization / self.cost)
        return max(1, min(c.max_sessions, fit))

    def _publish(self) -> None:
        metrics.CAPACITY_SESSIONS.set(self.sessions)
        if self.cost is not None:
            metrics.COST_PER_SPEECH_SECOND.set(self.cost)

    # -- degradation -----------------------------------------------------------------------------

    def check(self) -> int:
        """Update the degradation level from the deadline misses since the last check; returns it."""
        now = self._clock()
        if now - self._checked < 0.5:
            return self.degrade
        late, units, late_tts = self._cpu.late_units(), self._cpu.units(), self._cpu.late_units("tts")
        missed = (late - self._late_mark) / max(1, units - self._units_mark)
        speech_late = late_tts > self._late_tts_mark
        self._late_mark, self._units_mark, self._late_tts_mark, self._checked = late, units, late_tts, now
        if missed > self._config.degrade_late_share or speech_late:
            self._calm_since = now
            if self.degrade == 0:
                log.warning("overloaded: rendering each face for two frames", extra={"late_share": round(missed, 3)})
            self.degrade = 1
        elif self.degrade and now - self._calm_since > self._config.recover_after_s:
            self.degrade = 0
            log.info("load is back to normal: full frame rate")
        metrics.DEGRADE_LEVEL.set(self.degrade)
        return self.degrade


CALIBRATION_TEXT = "Thanks for asking. Here is a short answer, spoken at an ordinary pace, to measure the cost."
# The same in the zh profile's language (its voice says nothing of Latin text), and the question asked.
_CALIBRATION = {
    "en": (CALIBRATION_TEXT, "Tell me a story about the sea."),
    "zh": ("谢谢你的提问。这是一个简短的回答，用平常的语速说出来，用来测量开销。", "给我讲一个关于大海的故事。"),
}
_CALIBRATION["auto"] = _CALIBRATION["zh"]  # the costlier voice
_TOKENS_PER_SPEECH_S = 3.5  # ~2.7 spoken words a second, ~1.3 tokens a word


async def calibrate_capacity(engines: Engines, *, render: bool = True) -> None:
    """At start-up: one sentence through TTS, rendering and encoding, and the LLM tokens it takes to write
    it, each timed as the slot-seconds it holds. Sets the first cost per speech second."""
    from avatarchat.engines.llm.base import Prefills
    from avatarchat.engines.tts.base import RemoteTTSEngine
    from avatarchat.engines.video.fmp4 import Fmp4Stream
    from avatarchat.pipeline.media import Timeline, render_batch, speech_track

    s = engines.settings
    text, question = _CALIBRATION[s.profile]

    def speak_and_render() -> tuple[float, float]:
        if render and (warm := getattr(engines.avatars.renderer(s.avatar.default), "warm", None)):
            warm()  # a live frame reuses the cached idle frames, so calibrate on them too
        start = time.perf_counter()
        speech = engines.tts.synthesize(text)
        if isinstance(engines.tts, RemoteTTSEngine):
            start = time.perf_counter()  # the service's time is not this machine's CPU
        if render:
            renderer = engines.avatars.renderer(s.avatar.default)
            width, height = renderer.size
            rate = s.video.audio_sample_rate or 22050
            stream = Fmp4Stream(width, height, s.avatar.fps, rate, crf=s.video.crf, preset=s.video.preset,
                                threads=s.video.threads, audio_bitrate=s.video.audio_bitrate)
            stream.start()
            piece = Timeline(s.avatar.fps, rate).prepare(speech)
            step = s.pipeline.render_batch_frames
            track = speech_track(renderer, rate, s.avatar.fps)
            if track is not None:  # a renderer driven by audio (Wav2Lip) costs what it costs on speech
                track.push(piece.audio)
            for k in range(0, piece.frames, step):
                render_batch(stream, renderer, piece.mouth[k : k + step], k, None, speech=track)
            stream.add_audio(piece.audio)
            stream.close()
        return time.perf_counter() - start, speech.duration

    busy, seconds = await engines.cpu.run(speak_and_render, kind="calibrate")
    if isinstance(engines.llm, Prefills):  # a local LLM: its tokens cost this process's CPU too
        start = engines.cpu.busy_seconds()
        want = max(4, round(seconds * _TOKENS_PER_SPEECH_S))
        messages = [{"role": "system", "content": s.llm.system_prompt},
                    {"role": "user", "content": question}]
        async for _ in engines.llm.stream(messages, max_tokens=want, temperature=0.6):
            pass
        busy += engines.cpu.busy_seconds() - start
    engines.capacity.calibrated(busy, seconds)
    log.info("capacity calibrated", extra={"cost_core_s_per_speech_s": round(busy / seconds, 3),
                                           "sessions": engines.capacity.sessions})
