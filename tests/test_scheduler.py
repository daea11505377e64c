"""The CPU scheduler: earliest deadline first across sessions, background work demoted (issue 13)."""

from __future__ import annotations

import asyncio
import os
import threading
import time

import pytest

from avatarchat import metrics
from avatarchat.pipeline.scheduler import BACKGROUND_NICE, LATER, CpuScheduler, Deadline


def _blocker(scheduler: CpuScheduler) -> threading.Event:
    """Occupy every slot until the returned event is set."""
    gate = threading.Event()
    started = threading.Barrier(scheduler.slots + 1)

    def block() -> None:
        started.wait()
        gate.wait(5)

    for _ in range(scheduler.slots):
        scheduler.submit(block, deadline=0.0)
    started.wait()
    return gate


def test_the_most_urgent_unit_runs_first_whatever_the_order_it_came_in() -> None:
    cpu = CpuScheduler(1)
    try:
        gate = _blocker(cpu)
        order: list[str] = []
        now = time.perf_counter()
        futures = [cpu.submit(order.append, name, deadline=now + due)
                   for name, due in [("late", 3.0), ("background", LATER), ("urgent", 0.1), ("soon", 1.0)]]
        gate.set()
        for f in futures:
            f.result(5)
        assert order == ["urgent", "soon", "late", "background"]
    finally:
        cpu.close()


def test_equal_deadlines_keep_their_order() -> None:
    cpu = CpuScheduler(1)
    try:
        gate = _blocker(cpu)
        order: list[int] = []
        futures = [cpu.submit(order.append, i, deadline=1.0) for i in range(20)]
        gate.set()
        for f in futures:
            f.result(5)
        assert order == list(range(20))
    finally:
        cpu.close()


def test_a_failing_unit_reports_its_error_and_the_worker_goes_on() -> None:
    cpu = CpuScheduler(1)
    try:
        with pytest.raises(ZeroDivisionError):
            cpu.submit(lambda: 1 / 0).result()
        assert cpu.submit(lambda: 42).result() == 42
    finally:
        cpu.close()


async def test_a_unit_whose_caller_gave_up_never_runs() -> None:
    cpu = CpuScheduler(1)
    try:
        gate = _blocker(cpu)
        ran: list[str] = []
        task = asyncio.create_task(cpu.run(ran.append, "dropped", deadline=1.0))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        gate.set()
        assert await cpu.run(ran.append, "kept") is None
        assert ran == ["kept"]
    finally:
        cpu.close()


def test_contended_tells_whether_other_work_runs_or_waits() -> None:
    cpu = CpuScheduler(2)
    try:
        assert cpu.submit(cpu.contended).result() is False  # alone: the LLM may use every core
        gate = threading.Event()
        started = threading.Event()

        def other() -> None:
            started.set()
            gate.wait(5)

        f = cpu.submit(other, deadline=0.0)
        started.wait(5)
        assert cpu.submit(cpu.contended).result() is True
        gate.set()
        f.result(5)
    finally:
        cpu.close()


def test_late_units_are_counted() -> None:
    cpu = CpuScheduler(1)
    try:
        before = metrics.CPU_LATE.labels("test")._value.get()
        cpu.submit(time.sleep, 0.02, deadline=time.perf_counter(), kind="test").result()
        cpu.submit(time.sleep, 0.0, deadline=time.perf_counter() + 10, kind="test").result()
        assert metrics.CPU_LATE.labels("test")._value.get() == before + 1
    finally:
        cpu.close()


def test_a_unit_within_the_margin_is_not_late() -> None:
    """Deadlines come early by the turns' margin: a unit that ends inside it did not make a player wait."""
    cpu = CpuScheduler(1, late_grace_s=0.2)
    try:
        cpu.submit(time.sleep, 0.05, deadline=time.perf_counter(), kind="test").result()  # in the margin
        assert cpu.late_units() == 0
        cpu.submit(time.sleep, 0.25, deadline=time.perf_counter(), kind="test").result()  # past it
        assert cpu.late_units() == cpu.late_units("test") == 1
    finally:
        cpu.close()


@pytest.mark.skipif(not hasattr(os, "getpriority"), reason="POSIX priorities")
def test_background_work_runs_at_a_lower_priority() -> None:
    cpu = CpuScheduler(1)
    try:
        nice = cpu.background.submit(lambda: os.getpriority(os.PRIO_PROCESS, threading.get_native_id())).result(5)
        live = cpu.submit(lambda: os.getpriority(os.PRIO_PROCESS, threading.get_native_id())).result()
        assert nice == BACKGROUND_NICE > live == os.getpriority(os.PRIO_PROCESS, 0)
    finally:
        cpu.close()


def test_closing_cancels_what_waits() -> None:
    cpu = CpuScheduler(1)
    gate = _blocker(cpu)
    waiting = cpu.submit(time.sleep, 0, deadline=1.0)
    cpu.close()
    gate.set()
    assert waiting.cancelled()
    with pytest.raises(RuntimeError, match="closed"):
        cpu.submit(time.sleep, 0)


def test_deadline_before_and_after_the_first_fragment() -> None:
    d = Deadline(t0=100.0, first_target_s=0.5, margin_s=0.4)
    assert d.at(0) == 100.5
    assert d.at(2000) == 102.5  # the second piece is not needed before the first has played
    d.first_media_at = 100.3
    assert d.at(0) == pytest.approx(99.9)  # the player started: work is due before it runs dry
    assert d.at(3000) == pytest.approx(102.9)


def test_a_late_render_unit_does_not_wait_behind_long_units_on_every_slot() -> None:
    """The player of a session is running dry: its few frames run in the extra lane while both slots are
    taken by long units (a TTS piece, a prompt); a late unit of another kind still waits its turn."""
    cpu = CpuScheduler(2)
    try:
        gate = _blocker(cpu)
        late_render = cpu.submit(lambda: "frames", deadline=time.perf_counter() - 0.1, kind="render")
        late_tts = cpu.submit(lambda: "speech", deadline=time.perf_counter() - 0.2, kind="tts")
        assert late_render.result(2) == "frames"  # while the slots are still blocked
        time.sleep(0.1)
        assert not late_tts.done()
        soon_render = cpu.submit(lambda: "later frames", deadline=time.perf_counter() + 0.3, kind="render")
        assert soon_render.result(2) == "later frames"  # once its deadline passes, it is rescued too
        gate.set()
        assert late_tts.result(5) == "speech"
    finally:
        cpu.close()


def test_a_render_unit_without_a_deadline_waits_and_the_late_lane_lives_on() -> None:
    """A render unit due LATER (no deadline) is never late: the late lane leaves it to the slots, and still
    rescues a late unit afterwards (it used to die computing how long to wait for an infinite deadline)."""
    cpu = CpuScheduler(2)
    try:
        gate = _blocker(cpu)
        whenever = cpu.submit(lambda: "whenever", kind="render")
        time.sleep(0.1)
        lane = next(t for t in cpu._threads if t.name == "cpu-late")
        assert lane.is_alive() and not whenever.done()
        late = cpu.submit(lambda: "frames", deadline=time.perf_counter() - 0.1, kind="render")
        assert late.result(2) == "frames" and not whenever.done()
        gate.set()
        assert whenever.result(5) == "whenever"
    finally:
        cpu.close()


def test_crowded_tells_a_unit_whether_other_work_waits_for_a_core() -> None:
    from avatarchat.pipeline.scheduler import crowded

    assert not crowded()  # outside the scheduler
    cpu = CpuScheduler(1)
    try:
        assert cpu.submit(crowded).result(2) is False  # alone
        gate = threading.Event()
        started = threading.Event()

        def first() -> bool:
            started.set()
            gate.wait(5)
            return crowded()

        one = cpu.submit(first)
        started.wait(2)
        other = cpu.submit(lambda: None)  # waits for the one core
        gate.set()
        assert one.result(2) is True and other.result(2) is None
    finally:
        cpu.close()
