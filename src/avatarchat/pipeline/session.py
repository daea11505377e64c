"""Sessions: per-connection state (small) and the manager that enforces the limits (seed 002).

Models are shared; a session holds its history, its avatar choice, a frame counter and at most one
running turn. Idle expiry uses one timer per session (``loop.call_later``), not a polling loop.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING

import psutil

from avatarchat import metrics
from avatarchat.config import SessionConfig
from avatarchat.pipeline.history import History
from avatarchat.pipeline.turn import Sender, Turn, TurnError, TurnResult

if TYPE_CHECKING:
    from avatarchat.engines.registry import Engines

log = logging.getLogger(__name__)


class SessionLimitError(Exception):
    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class Session:
    def __init__(self, engines: Engines, send: Sender, avatar: str, on_idle: Callable[[Session], None]) -> None:
        s = engines.settings
        self.id = uuid.uuid4().hex
        self.engines = engines
        self.send = send
        self.avatar = avatar
        self.history = History(s.llm.system_prompt, s.llm.history_token_budget, engines.count_tokens)
        self._turn_ids = 0
        self._frame = 0
        self._turn: Turn | None = None
        self._task: asyncio.Task[None] | None = None
        self._on_idle = on_idle
        self._idle_timer: asyncio.TimerHandle | None = None
        self.closed = False
        self.touch()

    @property
    def busy(self) -> bool:
        return self._task is not None and not self._task.done()

    def touch(self) -> None:
        """Activity: restart the idle timer."""
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        if not self.closed:
            loop = asyncio.get_running_loop()
            self._idle_timer = loop.call_later(
                self.engines.settings.session.idle_timeout_s, self._on_idle, self
            )

    async def user_text(self, text: str, t0: float | None = None) -> None:
        """Start a turn; a running turn is interrupted first."""
        await self.cancel_turn("interrupted")
        self._turn_ids += 1
        turn = Turn(
            turn_id=self._turn_ids,
            user_text=text,
            settings=self.engines.settings,
            llm=self.engines.llm,
            tts=self.engines.tts,
            renderer=self.engines.avatars.renderer(self.avatar),
            history=self.history,
            workers=self.engines.workers,
            send=self.send,
            first_frame=self._frame,
            t0=t0,
        )
        self._turn = turn
        self._task = asyncio.create_task(self._run(turn), name=f"turn-{self.id[:8]}-{turn.turn_id}")

    async def _run(self, turn: Turn) -> None:
        try:
            result = await turn.run()
        except TurnError as e:
            metrics.ERRORS.labels(e.code).inc()
            log.warning("turn failed", extra={"session": self.id, "turn": turn.turn_id, "code": e.code, "error": str(e)})
            await self.send.event("error", code=e.code, message=str(e), fatal=False, turn_id=turn.turn_id)
            result = turn.result("error")
        self._frame = turn.next_frame
        await self._done(turn, result)
        self.touch()

    async def cancel_turn(self, reason: str = "stopped") -> bool:
        """Cancel the running turn and tell the client. Returns whether there was one."""
        task, turn = self._task, self._turn
        if task is None or turn is None or task.done():
            return False
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            if asyncio.current_task() is not None and asyncio.current_task().cancelling():  # type: ignore[union-attr]
                raise  # we are being cancelled ourselves, not just the turn
        self._frame = turn.next_frame
        await self._done(turn, turn.result(reason))
        return True

    async def _done(self, turn: Turn, result: TurnResult) -> None:
        metrics.TURNS.labels(result.reason).inc()
        log.info(
            "turn done",
            extra={"session": self.id, "turn": turn.turn_id, "reason": result.reason, "timings_ms": result.timings,
                   "media_ms": result.media_ms, "chars": len(result.text)},
        )
        if not self.closed:
            await self.send.event(
                "turn_done",
                turn_id=turn.turn_id,
                reason=result.reason,
                text=result.text,
                media_ms=result.media_ms,
                timings=result.timings,
            )

    async def close(self) -> None:
        """Free everything: the running turn, the timer, the history."""
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        task = self._task
        self.closed = True
        if task is not None and not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        self._task = self._turn = None
        self.history.clear()


class SessionManager:
    def __init__(self, config: SessionConfig) -> None:
        self._config = config
        self._sessions: dict[str, Session] = {}
        self._process = psutil.Process()

    def __len__(self) -> int:
        return len(self._sessions)

    def get(self, session_id: str) -> Session | None:
        return self._sessions.get(session_id)

    def check_capacity(self) -> None:
        if len(self._sessions) >= self._config.max_sessions:
            metrics.SESSIONS_REFUSED.labels("max_sessions").inc()
            raise SessionLimitError(
                "max_sessions", f"the server is at its limit of {self._config.max_sessions} sessions; try again later"
            )
        rss_mb = self._process.memory_info().rss / 2**20
        if rss_mb > self._config.memory_ceiling_mb:
            metrics.SESSIONS_REFUSED.labels("memory").inc()
            raise SessionLimitError(
                "memory", f"the server is above its memory ceiling ({rss_mb:.0f} MB > {self._config.memory_ceiling_mb} MB)"
            )

    def open(self, engines: Engines, send: Sender, avatar: str, on_idle: Callable[[Session], None]) -> Session:
        self.check_capacity()
        session = Session(engines, send, avatar, on_idle)
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
