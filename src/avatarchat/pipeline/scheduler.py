"""The CPU scheduler: every unit of live CPU work, across all sessions, runs earliest deadline first.

A unit is one LLM decoding step (all sessions' tokens in one batch), the TTS of one piece, or the
rendering and encoding of one batch of frames. Its deadline is when it must be done for nobody to
wait: for a new turn, its first-fragment target; after that, the moment its session's player would
run out of media (``Deadline``). ``slots`` worker threads (one per core) take the most urgent unit
each time one frees, so a reply far ahead of playback yields to a session about to stall or to a
turn that has not started. The event loop only submits and awaits.

Background work (idle clips of new avatars, uploads, previews) runs on its own small pool at the
a low OS priority (nice 10: about a tenth of a busy core's share), so live work comes first, yet an
upload still finishes when other processes load the CPU (at nice 19 it starved behind a compiler).
"""

from __future__ import annotations

import asyncio
import contextvars
import heapq
import itertools
import math
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, TypeVar

from avatarchat import metrics

T = TypeVar("T")
LATER = math.inf  # no deadline: runs when nothing more urgent waits
BACKGROUND_NICE = 10
RESCUED = frozenset({"render"})  # kinds of short units the late lane may run


class Deadline:
    """When a turn's next unit of work must be done (``time.perf_counter()`` seconds).

    Before the turn's first fragment: ``t0 + first_target``. After it: when the player, which started
    at ``first_media_at``, reaches the end of the media ``ready_ms`` sent or prepared so far, minus
    ``margin``. The stages move ``ready_ms`` forward as they produce.
    """

    def __init__(self, t0: float, first_target_s: float, margin_s: float) -> None:
        self.t0 = t0
        self.first_target_s = first_target_s
        self.margin_s = margin_s
        self.first_media_at: float | None = None

    def at(self, media_ms: float = 0.0) -> float:
        """The deadline of work that produces the media starting at ``media_ms`` of the turn's playback."""
        if self.first_media_at is None:
            return self.t0 + self.first_target_s + media_ms / 1000
        return self.first_media_at + media_ms / 1000 - self.margin_s


# The deadline of the turn whose code is running: engines read it without a parameter (an LLM
# engine's stream() is called inside the turn's task, so it sees the turn's value).
current: contextvars.ContextVar[Callable[[], float] | None] = contextvars.ContextVar("deadline", default=None)


_unit = threading.local()  # .scheduler: the scheduler whose unit this thread is running


def crowded() -> bool:
    """Inside a unit of live work: is other live work waiting for a core? (An engine then computes with one
    thread and leaves the other cores to it; with nothing waiting, a turn's first piece gets every core.)
    False outside the scheduler's units."""
    cpu = getattr(_unit, "scheduler", None)
    return cpu is not None and cpu.waiting() > 0


class _Job:
    __slots__ = ("fn", "args", "future", "deadline", "kind", "submitted")

    def __init__(self, fn: Callable[..., Any], args: tuple[Any, ...], deadline: float, kind: str) -> None:
        self.fn, self.args, self.deadline, self.kind = fn, args, deadline, kind
        self.future: Future[Any] = Future()
        self.submitted = time.perf_counter()


class CpuScheduler:
    def __init__(self, slots: int, background_slots: int = 1, late_grace_s: float = 0.0) -> None:
        self.slots = slots
        # Deadlines come early by the turns' safety margin (they order the work); a unit counts as late
        # only when it ends after the margin too, i.e. after its media was due to play.
        self.late_grace_s = late_grace_s
        self._heap: list[tuple[float, int, _Job]] = []
        self._seq = itertools.count()
        self._cond = threading.Condition()
        self._running = 0
        self._closed = False
        self._busy_kind: dict[str, float] = {}  # slot-seconds of live work run so far, by kind
        self._done = 0  # units run
        self._late = 0  # units that finished after their deadline (and the grace)
        self._late_kind: dict[str, int] = {}
        self._threads = [threading.Thread(target=self._work, name=f"cpu-{i}", daemon=True) for i in range(slots)]
        # One more lane, for short units that are already late (a few frames whose player is running dry):
        # they need not wait behind a long unit (a TTS piece, a prompt) that holds every slot.
        self._threads.append(threading.Thread(target=self._rescue, name="cpu-late", daemon=True))
        for t in self._threads:
            t.start()
        self.background = ThreadPoolExecutor(background_slots, thread_name_prefix="background",
                                             initializer=_lowest_priority)

    # -- submitting ------------------------------------------------------------------------------

    def submit(self, fn: Callable[..., T], *args: Any, deadline: float = LATER, kind: str = "other") -> Future[T]:
        job = _Job(fn, args, deadline, kind)
        with self._cond:
            if self._closed:
                raise RuntimeError("the CPU scheduler is closed")
            heapq.heappush(self._heap, (deadline, next(self._seq), job))
            metrics.CPU_QUEUE.set(len(self._heap))
            self._cond.notify_all()  # a worker, and the late lane if the unit is one for it
        return job.future

    async def run(self, fn: Callable[..., T], *args: Any, deadline: float = LATER, kind: str = "other") -> T:
        """From the event loop: run ``fn`` in a CPU slot by ``deadline``'s turn. Cancelling the await drops a
        unit that has not started (a started one finishes; its result is dropped)."""
        future = self.submit(fn, *args, deadline=deadline, kind=kind)
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            future.cancel()
            raise

    @contextmanager
    def slot(self, deadline: float = LATER, kind: str = "other") -> Iterator[None]:
        """From another thread: wait for a CPU slot by ``deadline``'s turn, then run the block in the calling
        thread while the slot's worker waits. For the LLM: llama.cpp's OpenMP team belongs to the thread
        that decodes, and a team per worker thread would spin against each other."""
        granted, done = threading.Event(), threading.Event()

        def hold() -> None:
            granted.set()
            done.wait()

        future = self.submit(hold, deadline=deadline, kind=kind)
        try:
            while not granted.wait(0.5):
                if future.done():  # cancelled: the scheduler closed
                    raise RuntimeError("the CPU scheduler is closed")
            yield
        finally:
            done.set()
            future.cancel()

    # -- state -----------------------------------------------------------------------------------

    def contended(self) -> bool:
        """Is other work running or waiting besides the caller's own unit? (The LLM then decodes with one
        thread instead of all, leaving a core to the other unit.)"""
        with self._cond:
            return self._running > 1 or bool(self._heap)

    def waiting(self) -> int:
        """Units waiting for a core."""
        return len(self._heap)

    def busy_seconds(self) -> float:
        return sum(self.busy_by_kind().values())

    def busy_by_kind(self) -> dict[str, float]:
        """Slot-seconds of live work run so far, by kind of unit."""
        with self._cond:
            return dict(self._busy_kind)

    def units(self) -> int:
        return self._done

    def late_units(self, kind: str | None = None) -> int:
        return self._late if kind is None else self._late_kind.get(kind, 0)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            pending = [job for _, _, job in self._heap]
            self._heap.clear()
            self._cond.notify_all()
        for job in pending:
            job.future.cancel()
        self.background.shutdown(wait=False, cancel_futures=True)

    # -- the workers -----------------------------------------------------------------------------

    def _rescue(self) -> None:
        while True:
            with self._cond:
                job = None
                while not self._closed:
                    job, wait = self._late_short_unit()
                    if job is not None:
                        break
                    self._cond.wait(wait)
                if self._closed or job is None:
                    return
                self._heap.remove(next(e for e in self._heap if e[2] is job))
                heapq.heapify(self._heap)
                metrics.CPU_QUEUE.set(len(self._heap))
                if not job.future.set_running_or_notify_cancel():
                    continue
                self._running += 1
                metrics.CPU_RESCUED.inc()
            self._execute(job)

    def _late_short_unit(self) -> tuple[_Job | None, float | None]:
        """Under the lock: the most urgent waiting render unit whose deadline has passed, while every slot is
        busy; else None and how long until the next render deadline (None: wait for a change)."""
        if self._running < self.slots:
            return None, None  # a slot is free: the regular workers take it
        now = time.perf_counter()
        renders = [(d, job) for d, _, job in self._heap if job.kind in RESCUED and d != LATER]
        if not renders:
            return None, None
        deadline, job = min(renders, key=lambda r: r[0])
        if deadline <= now:
            return job, None
        return None, deadline - now

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._heap and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                _, _, job = heapq.heappop(self._heap)
                metrics.CPU_QUEUE.set(len(self._heap))
                if not job.future.set_running_or_notify_cancel():
                    continue
                self._running += 1
                if self._running >= self.slots and self._heap:
                    self._cond.notify_all()  # every slot is busy now: the late lane looks at what waits
            self._execute(job)

    def _execute(self, job: _Job) -> None:
        started, started_cpu = time.perf_counter(), time.thread_time()
        _unit.scheduler = self
        try:
            result = job.fn(*job.args)
        except BaseException as e:  # handed to the caller
            job.future.set_exception(e)
        else:
            job.future.set_result(result)
        finally:
            _unit.scheduler = None
            done = time.perf_counter()
            late = job.deadline != LATER and done > job.deadline + self.late_grace_s
            with self._cond:
                self._running -= 1
                self._busy_kind[job.kind] = self._busy_kind.get(job.kind, 0.0) + done - started
                self._done += 1
                self._late += late
                if late:
                    self._late_kind[job.kind] = self._late_kind.get(job.kind, 0) + 1
            metrics.CPU_WAIT_SECONDS.labels(job.kind).observe(started - job.submitted)
            metrics.CPU_BUSY_SECONDS.labels(job.kind).inc(done - started)
            metrics.CPU_THREAD_SECONDS.labels(job.kind).inc(time.thread_time() - started_cpu)
            if late:
                metrics.CPU_LATE.labels(job.kind).inc()


def _lowest_priority() -> None:
    """Background threads: nice BACKGROUND_NICE for this thread only (Linux sets priorities per thread)."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), BACKGROUND_NICE)
    except (OSError, AttributeError):  # not Linux, or not allowed: still runs, just not demoted
        pass
