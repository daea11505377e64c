"""Admission from measured capacity, and degradation under overload (issue 13)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
from websockets.asyncio.client import connect

from avatarchat.config import SessionConfig, load_settings
from avatarchat.engines.avatar.library import AvatarLibrary
from avatarchat.engines.video.fmp4 import Fmp4Stream
from avatarchat.pipeline.capacity import Capacity
from avatarchat.pipeline.media import render_batch
from avatarchat.pipeline.scheduler import CpuScheduler
from tests.support.live_app import LiveApp


@pytest.fixture
def cpu() -> Iterator[CpuScheduler]:
    scheduler = CpuScheduler(2)
    yield scheduler
    scheduler.close()


def test_capacity_is_the_cores_over_the_cost_of_a_speaking_session(cpu: CpuScheduler) -> None:
    capacity = Capacity(SessionConfig(max_sessions=8, target_utilization=0.8), cpu)
    assert capacity.sessions == 8  # nothing measured yet: the configured limit
    capacity.calibrated(busy_core_s=0.8, speech_s=2.0)  # 0.4 slot-seconds per second of speech
    assert capacity.sessions == 4  # floor(2 slots × 0.8 / 0.4)
    capacity.calibrated(busy_core_s=10.0, speech_s=1.0)
    assert capacity.sessions == 1  # never below one
    capacity.calibrated(busy_core_s=0.01, speech_s=1.0)
    assert capacity.sessions == 8  # never above the hard limit
    fixed = Capacity(SessionConfig(max_sessions=8, admission="fixed"), cpu)
    fixed.calibrated(busy_core_s=10.0, speech_s=1.0)
    assert fixed.sessions == 8  # a provisioned deployment: the configured limit whatever the cost


def test_live_cost_follows_the_work_the_scheduler_ran(cpu: CpuScheduler) -> None:
    capacity = Capacity(SessionConfig(max_sessions=16, target_utilization=1.0, capacity_window_s=2.0), cpu)
    capacity.calibrated(0.2, 1.0)
    cpu.submit(time.sleep, 0.3).result()  # 0.3 slot-seconds of live work...
    capacity.observe_speech(1.0)
    assert capacity.cost == pytest.approx(0.2)  # (not a full window yet)
    capacity.observe_speech(1.0)  # ...for 2 s of speech: 0.15 per second
    assert capacity.cost == pytest.approx(0.7 * 0.2 + 0.3 * 0.15, rel=0.15)


def test_rendering_is_costed_per_second_of_video_and_the_rest_per_second_of_speech(cpu: CpuScheduler) -> None:
    """Speech is synthesized pieces ahead of the video, which renders at playback pace: each cost is divided by
    what it produced, so a window that synthesized much and rendered little does not read as cheap."""
    capacity = Capacity(SessionConfig(max_sessions=16, target_utilization=1.0, capacity_window_s=4.0), cpu)
    cpu.submit(time.sleep, 0.2, kind="tts").result()  # 0.2 slot-s of TTS for 4 s of speech: 0.05
    cpu.submit(time.sleep, 0.1, kind="render").result()  # 0.1 slot-s of rendering for 1 s of video: 0.1
    cpu.submit(time.sleep, 0.2, kind="calibrate").result()  # start-up calibration: not live work
    capacity.observe_video(1.0)
    capacity.observe_speech(4.0)
    assert capacity.cost == pytest.approx(0.05 + 0.1, rel=0.2)
    # A window with speech but (almost) no video: rendering keeps its last cost per second of video.
    cpu.submit(time.sleep, 0.2, kind="tts").result()
    capacity.observe_video(0.2)
    capacity.observe_speech(4.0)
    assert capacity.cost == pytest.approx(0.15, rel=0.2)


def test_overload_renders_fewer_faces_and_recovers(cpu: CpuScheduler) -> None:
    now = [0.0]
    capacity = Capacity(SessionConfig(degrade_late_share=0.1, recover_after_s=5.0), cpu, clock=lambda: now[0])
    for _ in range(5):
        cpu.submit(time.sleep, 0.002, deadline=time.perf_counter()).result()  # each misses its deadline
    now[0] = 1.5
    assert capacity.check() == 1
    for _ in range(20):
        cpu.submit(time.sleep, 0.0, deadline=time.perf_counter() + 10).result()  # on time
    now[0] = 3.0
    assert capacity.check() == 1  # not calm for long enough yet
    now[0] = 7.0
    assert capacity.check() == 0
    cpu.submit(time.sleep, 0.002, deadline=time.perf_counter(), kind="tts").result()  # one piece's speech came late
    for _ in range(50):
        cpu.submit(time.sleep, 0.0, deadline=time.perf_counter() + 10).result()
    now[0] = 8.0
    assert capacity.check() == 1  # a sentence boundary was at risk: fewer faces at once


def test_a_degraded_batch_renders_every_other_face_at_the_same_frame_rate() -> None:
    renderer = AvatarLibrary(None, 25).renderer("default")
    calls: list[int] = []

    class Counting:
        size = renderer.size

        def render(self, index: int, row: np.ndarray) -> np.ndarray:
            calls.append(index)
            return renderer.render(index, row)

    width, height = renderer.size
    stream = Fmp4Stream(width, height, 25, 22050)
    stream.start()
    mouth = np.zeros((10, 3), np.float32)
    render_batch(stream, Counting(), mouth, 100, None, hold=2)  # type: ignore[arg-type]
    assert calls == [100, 102, 104, 106, 108]
    assert stream.frames == 10  # the stream keeps its timing
    stream.abort()


async def test_a_stream_nearly_dry_on_busy_cores_renders_half_the_faces() -> None:
    """When many turns start at once every core is busy and the new streams' frames are already due: those
    batches show each face for two frames (a stall averted), and once the cores are free, all faces again."""
    from avatarchat import metrics
    from avatarchat.pipeline.avatar_media import LocalAvatarMedia

    cpu = CpuScheduler(1)
    try:
        media = LocalAvatarMedia(AvatarLibrary(None, 25), cpu, load_settings())
        stream = await media.open("default", 22050)
        mouth = np.zeros((10, 3), np.float32)
        due = metrics.HALF_RATE_BATCHES.labels("due")
        before = due._value.get()
        busy = cpu.submit(time.sleep, 0.5)  # the only slot is taken...
        queued = cpu.submit(time.sleep, 0.0)  # ...and more work waits
        await stream.batch(mouth, 0, None, deadline=time.perf_counter() - 0.1)
        assert due._value.get() == before + 1
        await stream.batch(mouth, 10, None, deadline=time.perf_counter() + 5)  # not due yet: full rate
        assert due._value.get() == before + 1
        busy.result(), queued.result()
        await stream.batch(mouth, 20, None, deadline=time.perf_counter() - 0.1)  # due, but the cores are free
        assert due._value.get() == before + 1
        assert stream.frames == 30
        await stream.close()
    finally:
        cpu.close()


@pytest.fixture(scope="module")
def one_session_app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveApp]:
    """A server whose measured capacity is one live conversation (a tiny utilization target)."""
    settings = load_settings(session={"max_sessions": 6, "target_utilization": 0.01, "retry_after_s": 3},
                             llm={"max_tokens": 20}, avatar={"dir": str(tmp_path_factory.mktemp("avatars"))})
    app = LiveApp(settings).start()
    yield app
    app.stop()


@pytest.mark.models
async def test_beyond_capacity_a_session_gets_server_busy_at_once_and_the_others_go_on(one_session_app: LiveApp) -> None:
    app = one_session_app
    async with connect(app.ws, max_size=None) as first:
        assert json.loads(await first.recv())["type"] == "session"
        t0 = time.perf_counter()
        async with connect(app.ws, max_size=None) as second:
            event = json.loads(await asyncio.wait_for(second.recv(), 5))
            refused_in = time.perf_counter() - t0
        assert event["code"] == "server_busy" and event["fatal"] is True
        assert event["retry_after_ms"] == 3000 and "live conversations" in event["message"]
        assert refused_in < 0.5  # at once (BENCHMARKS.md has the figure under load)
        await first.send(json.dumps({"type": "user_text", "text": "Say hi."}))
        media = 0
        while True:
            msg = await asyncio.wait_for(first.recv(), 60)
            if isinstance(msg, bytes):
                media += 1
                continue
            e = json.loads(msg)
            if e["type"] == "turn_done":
                break
        assert e["reason"] == "complete" and media > 0
    monitor = (await asyncio.to_thread(httpx.get, app.http + "/api/monitor")).json()
    assert monitor["capacity_sessions"] == 1 and monitor["cost_per_speech_s"] > 0
    metrics = (await asyncio.to_thread(httpx.get, app.http + "/metrics")).text
    assert 'avatarchat_sessions_refused_total{reason="capacity"}' in metrics
    assert "avatarchat_capacity_sessions 1.0" in metrics
