"""One shared ASR model, one worker thread, and a priority queue in front of it.

A transcription service (``RemoteASREngine``) skips all this: its requests are awaited at once.

Final transcripts (someone finished speaking) go before partial ones (someone is still speaking).
A request whose caller gave up (its future was cancelled) is skipped before it reaches the model.
With a CPU scheduler, each transcription holds one of its slots, at a deadline that says how soon it
is needed (a final one soon: the person waits for the reply; a partial one later).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from avatarchat import metrics
from avatarchat.engines.asr.base import ASREngine, RemoteASREngine
from avatarchat.pipeline.scheduler import CpuScheduler

FINAL, PARTIAL = 0, 1
_DUE_S = {FINAL: 0.3, PARTIAL: 1.5}  # deadlines from the request, per priority
_STAGE = {FINAL: "asr_final", PARTIAL: "asr_partial"}


class ASRQueue:
    def __init__(self, engine: ASREngine, cpu: CpuScheduler | None = None) -> None:
        self.engine = engine
        self._cpu = cpu
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="asr")
        self._queue: asyncio.PriorityQueue[tuple[int, int, np.ndarray, asyncio.Future[str]]] | None = None
        self._seq = itertools.count()
        self._worker: asyncio.Task[None] | None = None

    def load(self) -> None:
        self.engine.load()

    @property
    def executor(self) -> ThreadPoolExecutor:
        return self._executor

    async def transcribe(self, audio: np.ndarray, priority: int = FINAL) -> str:
        if isinstance(self.engine, RemoteASREngine):  # a service: no queue, no CPU slot, several at once
            start = time.perf_counter()
            text = await self.engine.transcribe_async(audio)
            metrics.STAGE_SECONDS.labels(_STAGE[priority]).observe(time.perf_counter() - start)
            return text
        if self._queue is None:
            self._queue = asyncio.PriorityQueue()
            self._worker = asyncio.create_task(self._run(self._queue), name="asr-queue")
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((priority, next(self._seq), audio, future))
        return await future

    async def _run(self, queue: asyncio.PriorityQueue[tuple[int, int, np.ndarray, asyncio.Future[str]]]) -> None:
        loop = asyncio.get_running_loop()
        while True:
            priority, _, audio, future = await queue.get()
            if future.done():
                continue  # the caller gave up
            start = time.perf_counter()
            try:
                text = await loop.run_in_executor(self._executor, self._transcribe, audio, start + _DUE_S[priority])
            except Exception as e:  # noqa: BLE001 - handed to the caller
                if not future.done():
                    future.set_exception(e)
                continue
            metrics.STAGE_SECONDS.labels(_STAGE[priority]).observe(
                time.perf_counter() - start
            )
            if not future.done():
                future.set_result(text)

    def _transcribe(self, audio: np.ndarray, deadline: float) -> str:
        if self._cpu is None:
            return self.engine.transcribe(audio)
        with self._cpu.slot(deadline, kind="asr"):
            return self.engine.transcribe(audio)

    async def close(self) -> None:
        if isinstance(self.engine, RemoteASREngine):
            await self.engine.close()
        if self._worker is not None:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)
        self._executor.shutdown(wait=True, cancel_futures=True)
