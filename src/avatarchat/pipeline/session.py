"""Sessions: per-connection state (small) and the manager that enforces the limits (seed 002).

Models are shared; a session holds its history, its avatar choice, a frame counter and at most one
running turn. Idle expiry uses one timer per session (``loop.call_later``), not a polling loop.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import psutil

from avatarchat import metrics
from avatarchat.config import SessionConfig
from avatarchat.engines.llm.base import LLMEngine, Prefills, conversation
from avatarchat.pipeline.avatar_media import AvatarMedia
from avatarchat.pipeline.echo import EchoReference, PlaybackClock
from avatarchat.pipeline.capacity import Capacity
from avatarchat.pipeline.history import History
from avatarchat.pipeline.turn import Sender, Turn, TurnError, TurnResult
from avatarchat.pipeline.voice import VoiceInput

if TYPE_CHECKING:
    from avatarchat.engines.registry import Engines

log = logging.getLogger(__name__)

_ECHO_TAIL_MS = 1000
_ECHO_GONE_S = 0.7  # after a known end: the echo check's longest delay (0.4 s) and its newest 0.3 s
_END_SLACK_MS = 200  # a player's last position can fall short of the media's length (its last frames)


class SessionLimitError(Exception):
    def __init__(self, reason: str, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.retry_after_s = retry_after_s


class GatedSender:
    """Holds a speculative turn's output until the person has really finished speaking."""

    def __init__(self, inner: Sender) -> None:
        self._inner = inner
        self._held: list[tuple[str, object, dict[str, object]]] = []
        self._open = False
        self._lock = asyncio.Lock()

    async def event(self, type: str, **fields: object) -> None:
        async with self._lock:
            if self._open:
                await self._inner.event(type, **fields)
            else:
                self._held.append(("event", type, fields))

    async def media(self, turn_id: int, payload: bytes) -> None:
        async with self._lock:
            if self._open:
                await self._inner.media(turn_id, payload)
            else:
                self._held.append(("media", turn_id, {"payload": payload}))

    async def release(self) -> None:
        async with self._lock:
            for kind, first, fields in self._held:
                if kind == "event":
                    await self._inner.event(str(first), **fields)
                else:
                    await self._inner.media(int(first), fields["payload"])  # type: ignore[arg-type]
            self._held.clear()
            self._open = True


@dataclass
class Playback:
    """Where the client's player is in a turn's media, from its ``playback`` reports."""

    turn_id: int
    position_ms: float
    playing: bool
    at: float  # perf_counter() of the report
    mic_samples: int | None = None  # microphone samples the client had sent when it read the position


class Session:
    def __init__(self, engines: Engines, send: Sender, avatar: str, on_idle: Callable[[Session], None],
                 media: AvatarMedia) -> None:
        s = engines.settings
        self.id = uuid.uuid4().hex
        self.engines = engines
        self.media = media  # rendered here, or by the avatar service (role gateway)
        # Per-session copy: `session.update` changes the speaking rate or the silence window for this session only.
        self.settings = s.model_copy(deep=True)
        self.send = send
        self.avatar = avatar
        self.llm: LLMEngine = engines.llm  # a session may pick another model through the router (session.update)
        self.history = History(s.llm.system_prompt, s.llm.history_token_budget, engines.count_tokens)
        self._turn_ids = 0
        self._frame = 0
        self._turn: Turn | None = None
        self._task: asyncio.Task[None] | None = None
        self._gate: GatedSender | None = None  # set while the running turn is speculative
        self._playback: Playback | None = None
        self._clock = PlaybackClock()  # the current turn's playback against the client's microphone samples
        self._prefill: asyncio.Task[None] | None = None
        self._on_idle = on_idle
        self._idle_timer: asyncio.TimerHandle | None = None
        self.closed = False
        self.voice: VoiceInput | None = None
        self._asr_ms: dict[int, int | None] = {}  # turn id → ASR time of the utterance that started it
        self.touch()

    @property
    def busy(self) -> bool:
        return self._task is not None and not self._task.done()

    @property
    def speaking(self) -> bool:
        """Is the avatar talking: a turn is producing media, or the client is still playing it?"""
        turn = self._turn
        if turn is None or self._gate is not None:
            return False
        if self.busy:
            return turn.first_media_at is not None
        if turn.silent_at is not None:
            return False
        return self.played_ms(turn) < turn.media_ms

    def echo_source(self, samples: np.ndarray, now: int) -> tuple[EchoReference, np.ndarray] | None:
        """What the avatar said in the turn the person hears now, and where its playback was (ms) at the
        microphone's ``samples`` (``now``: the newest), as far as that is known (the first ones). From the
        client's own clock when its reports say which mic sample they were read at; arrival times would shift
        with every burst of the network or of a busy client."""
        turn = self._turn
        if turn is None or self._gate is not None or not self.may_echo:
            return None
        if self._clock and self._playback is not None and self._playback.turn_id == turn.turn_id:
            if turn.silent_at is None:  # a player that will not move on: no report to wait for
                samples = samples[samples <= self._clock.known_until(now)]
            positions = self._clock.positions(samples)
        else:
            positions = self.played_ms(turn) - (now - samples) / 16
        if turn.stopped_ms is not None:
            positions = np.minimum(positions, turn.stopped_ms)  # nothing after the stop was played
        return turn.echo, positions

    @property
    def may_echo(self) -> bool:
        """Could the microphone still be hearing the avatar: it is talking, or stopped less than a second ago
        (the room's delay and reverb, a player that stalled longer than its reports say)?"""
        turn = self._turn
        if turn is None or self._gate is not None:
            return False
        if self.speaking:
            return True
        if turn.silent_at is not None:
            return time.perf_counter() - turn.silent_at < _ECHO_GONE_S
        return self.played_ms(turn) < turn.media_ms + _ECHO_TAIL_MS

    def avatar_words(self, before_ms: float = 4000, after_ms: float = 500) -> str:
        """What the avatar said around where the person's playback is now: the pieces the microphone may be hearing."""
        turn = self._turn
        if turn is None:
            return ""
        at = turn.stopped_ms if turn.stopped_ms is not None else self.played_ms(turn)
        return " ".join(text for start, duration, text in turn.sentences
                        if start < at + after_ms and start + duration > at - before_ms)

    def played_ms(self, turn: Turn) -> float:
        """How much of ``turn``'s media the person has heard: the client's report, else wall-clock time."""
        now = time.perf_counter()
        pb = self._playback
        if pb is not None and pb.turn_id == turn.turn_id:
            return pb.position_ms + ((now - pb.at) * 1000 if pb.playing else 0.0)
        if turn.first_media_at is None:
            return 0.0
        return (now - turn.first_media_at) * 1000

    def touch(self) -> None:
        """Activity: restart the idle timer."""
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        if not self.closed:
            loop = asyncio.get_running_loop()
            self._idle_timer = loop.call_later(
                self.engines.settings.session.idle_timeout_s, self._on_idle, self
            )

    def start_voice(self) -> VoiceInput:
        if self.voice is None:
            self.voice = VoiceInput(self)
        self.voice.restart_clock()
        return self.voice

    async def user_text(self, text: str, t0: float | None = None, *, held: bool = False) -> Turn:
        """Start a turn; a running turn is interrupted first. A ``held`` turn runs but sends nothing until
        ``release_held``, and ``discard_held`` drops it without a trace."""
        await self.discard_held()
        await self.cancel_turn("interrupted")
        self._turn_ids += 1
        self._gate = GatedSender(self.send) if held else None
        turn = Turn(
            turn_id=self._turn_ids,
            user_text=text,
            settings=self.settings,
            llm=self.llm,
            tts=self.engines.tts,
            media=self.media,
            avatar=self.avatar,
            history=self.history,
            cpu=self.engines.cpu,
            capacity=self.engines.capacity,
            send=self._gate or self.send,
            first_frame=self._frame,
            t0=t0,
        )
        self._turn = turn
        self._playback = None
        self._asr_ms[turn.turn_id] = self.voice.last_asr_ms if (t0 is None and self.voice is not None) else None
        # Here, not in the turn's task: a stop right behind the user_text cancels the task before its first step,
        # and its turn_done must not be about a turn the client never saw start (found by tests/test_fuzz_ws.py).
        await (self._gate or self.send).event("turn_start", turn_id=turn.turn_id, user_text=text)
        self._task = asyncio.create_task(self._run(turn), name=f"turn-{self.id[:8]}-{turn.turn_id}")
        return turn

    async def release_held(self) -> None:
        gate, self._gate = self._gate, None
        if gate is not None:
            await gate.release()

    async def discard_held(self) -> None:
        """Drop a speculative turn: cancel it silently; it never reached the client or the history."""
        gate, turn, task = self._gate, self._turn, self._task
        if gate is None or turn is None or task is None:
            return
        self._gate = None
        turn.discarded = True
        self._turn_ids -= 1  # its id was never seen by the client
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        self._turn = None

    async def interrupt(self) -> None:
        """Barge-in: stop the avatar now, and keep in the history only what the person heard."""
        turn = self._turn
        if turn is None or self._gate is not None:
            return
        heard = turn.played_text(self.played_ms(turn))
        await self.send.event("interrupt", turn_id=turn.turn_id, heard=heard)
        await self.cancel_turn("interrupted")
        self.history.replace_last_reply(heard, interrupted=True)
        self._turn = None

    def playback(self, turn_id: int, position_ms: float, playing: bool, mic_samples: int | None = None) -> None:
        if self._playback is None or self._playback.turn_id != turn_id:
            self._clock = PlaybackClock()
        self._playback = Playback(turn_id, position_ms, playing, time.perf_counter(), mic_samples)
        if mic_samples is not None:
            self._clock.report(mic_samples, position_ms, playing)
        turn = self._turn
        # Standing still at the end of a finished turn's media is its end (before it, a stall); kept once seen, so a
        # later report (a player reset to 0) does not undo it.
        if (turn is not None and turn.turn_id == turn_id and turn.silent_at is None and not playing and not self.busy
                and position_ms >= turn.media_ms - _END_SLACK_MS):
            turn.silent_at = self._playback.at

    async def _run(self, turn: Turn) -> None:
        conversation.set(self.id)  # this task's context: the local LLM keeps this session's KV state apart
        try:
            try:
                result = await turn.run()
            except TurnError:
                raise
            except Exception as e:  # outside the stages (the history, the first event): still end the turn
                log.exception("turn failed", extra={"session": self.id, "turn": turn.turn_id})
                raise TurnError("internal_error", f"the reply failed ({type(e).__name__})") from e
        except TurnError as e:
            metrics.ERRORS.labels(e.code).inc()
            log.warning("turn failed", extra={"session": self.id, "turn": turn.turn_id, "code": e.code, "error": str(e)})
            await (self._gate or self.send).event(
                "error", code=e.code, message=str(e), fatal=False, turn_id=turn.turn_id
            )
            result = turn.result("error")
        self._frame = turn.next_frame
        await self._done(turn, result)
        self.touch()
        if isinstance(self.engines.llm, Prefills) and not self.closed:
            # Outside the turn's task: a stop or barge-in now must not see the turn as still running.
            self._prefill = asyncio.create_task(self._prefill_history(), name=f"prefill-{self.id[:8]}")

    async def _prefill_history(self) -> None:
        conversation.set(self.id)
        try:
            await self.engines.llm.prefill(self.history.messages())  # type: ignore[attr-defined]
        except Exception:  # an optimisation only: the next turn evaluates whatever is missing
            log.exception("prefill failed", extra={"session": self.id})

    async def cancel_turn(self, reason: str = "stopped") -> bool:
        """Cancel the running turn and tell the client. Returns whether there was one."""
        task, turn = self._task, self._turn
        if task is None or turn is None or task.done():
            if turn is not None and turn.silent_at is None and self.speaking:
                self._mark_stopped(turn)  # a reply made in full, still playing: the client flushes its player too
            return False
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            if asyncio.current_task() is not None and asyncio.current_task().cancelling():  # type: ignore[union-attr]
                raise  # we are being cancelled ourselves, not just the turn
        self._frame = turn.next_frame
        self._mark_stopped(turn)
        await self._done(turn, turn.result(reason))
        return True

    def _mark_stopped(self, turn: Turn) -> None:
        """The client flushes its player when a turn is stopped: the avatar goes silent now, where it was."""
        turn.stopped_ms = min(self.played_ms(turn), float(turn.media_ms))
        turn.silent_at = time.perf_counter()

    async def _done(self, turn: Turn, result: TurnResult) -> None:
        metrics.TURNS.labels(result.reason).inc()
        if not turn.discarded:
            metrics.record_turn(self.id, turn.turn_id, result.reason, result.timings, self._asr_ms.pop(turn.turn_id, None))
        log.info(
            "turn done",
            extra={"session": self.id, "turn": turn.turn_id, "reason": result.reason, "timings_ms": result.timings,
                   "media_ms": result.media_ms, "chars": len(result.text)},
        )
        if not self.closed and not turn.discarded:
            await (self._gate or self.send).event(
                "turn_done",
                turn_id=turn.turn_id,
                reason=result.reason,
                text=result.text,
                media_ms=result.media_ms,
                timings=result.timings,
            )

    async def close(self) -> None:
        """Free everything: the running turn, the voice input, the timer, the history."""
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        task = self._task
        self.closed = True
        if self.voice is not None:
            await self.voice.close()
            self.voice = None
        for t in (task, self._prefill):
            if t is not None and not t.done():
                t.cancel()
                await asyncio.gather(t, return_exceptions=True)
        self._task = self._turn = self._gate = self._prefill = None
        self.history.clear()


class SessionManager:
    def __init__(self, config: SessionConfig, media: AvatarMedia, capacity: Capacity | None = None) -> None:
        self._config = config
        self.media = media
        self.capacity = capacity
        self._sessions: dict[str, Session] = {}
        self._process = psutil.Process()

    def __len__(self) -> int:
        return len(self._sessions)

    def sessions(self) -> list[Session]:
        return list(self._sessions.values())

    def get(self, session_id: str) -> Session | None:
        return self._sessions.get(session_id)

    def check_capacity(self) -> None:
        if len(self._sessions) >= self._config.max_sessions:
            metrics.SESSIONS_REFUSED.labels("max_sessions").inc()
            raise SessionLimitError(
                "max_sessions", f"the server is at its limit of {self._config.max_sessions} sessions; try again later",
                self._config.retry_after_s,
            )
        held = self.capacity.sessions if self.capacity is not None else self._config.max_sessions
        if len(self._sessions) >= held:
            metrics.SESSIONS_REFUSED.labels("capacity").inc()
            raise SessionLimitError(
                "capacity", f"the server is holding all the live conversations its CPU can serve ({held}); "
                f"try again in {self._config.retry_after_s:g} s", self._config.retry_after_s,
            )
        rss_mb = self._process.memory_info().rss / 2**20
        if rss_mb > self._config.memory_ceiling_mb:
            metrics.SESSIONS_REFUSED.labels("memory").inc()
            raise SessionLimitError(
                "memory", f"the server is above its memory ceiling ({rss_mb:.0f} MB > {self._config.memory_ceiling_mb} MB)",
                self._config.retry_after_s,
            )

    def open(self, engines: Engines, send: Sender, avatar: str, on_idle: Callable[[Session], None]) -> Session:
        self.check_capacity()
        session = Session(engines, send, avatar, on_idle, self.media)
        self._sessions[session.id] = session
        metrics.ACTIVE_SESSIONS.set(len(self._sessions))
        log.info("session open", extra={"session": session.id, "avatar": avatar, "sessions": len(self._sessions)})
        return session

    async def close(self, session: Session) -> None:
        if self._sessions.pop(session.id, None) is None:
            return
        await session.close()
        metrics.ACTIVE_SESSIONS.set(len(self._sessions))
        log.info("session closed", extra={"session": session.id, "sessions": len(self._sessions)})

    async def close_all(self) -> None:
        for session in list(self._sessions.values()):
            await self.close(session)
