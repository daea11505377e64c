"""A session client for voice tests and benches: records every event with its arrival time, reports playback as
the page does, and can play the replies into its own microphone (``speaker``)."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any

from websockets.asyncio.client import ClientConnection, connect

from tests.support.echo_room import SpeakerMic
from tests.support.speech import HEADER


@dataclass
class VoiceClient:
    """Records every message with its arrival time, and plays media the way a browser would (reports)."""

    ws: ClientConnection
    log: list[tuple[float, str, Any]] = field(default_factory=list)
    media_at: dict[int, list[float]] = field(default_factory=dict)
    _reader: asyncio.Task[None] | None = None
    _new: asyncio.Event = field(default_factory=asyncio.Event)
    _player: asyncio.Task[None] | None = None
    speaker: SpeakerMic | None = None  # set: the replies play into the microphone

    async def start(self) -> VoiceClient:
        self._reader = asyncio.create_task(self._read())
        await self.wait_for("session")
        await self.send(type="mic_start", sample_rate=16000, format="pcm_s16le")
        await self.wait_for("mic_ready")
        return self

    async def _read(self) -> None:
        async for msg in self.ws:
            now = time.perf_counter()
            if isinstance(msg, bytes):
                turn_id = HEADER.unpack_from(msg)[3]
                self.media_at.setdefault(turn_id, []).append(now)
                if self.speaker is not None:
                    self.speaker.media(turn_id, msg[HEADER.size :])
                self.log.append((now, "media", turn_id))
            else:
                e = json.loads(msg)
                self.log.append((now, e["type"], e))
                if e["type"] == "media_start":
                    self._start_player(e["turn_id"])
                if e["type"] == "interrupt" and self._player is not None:
                    self._player.cancel()
                stopped = e["type"] == "interrupt" or (e["type"] == "turn_done" and e["reason"] != "complete")
                if stopped and self.speaker is not None:
                    self.speaker.stop(e["turn_id"])  # the page flushes its player
            self._new.set()

    def _start_player(self, turn_id: int) -> None:
        """Report playback position every 100 ms from the first fragment, as the page does."""
        if self._player is not None:
            self._player.cancel()

        async def play() -> None:
            t0 = time.perf_counter()
            while True:
                await asyncio.sleep(0.1)
                if self.speaker is None:
                    await self.send(type="playback", turn_id=turn_id, position_ms=(time.perf_counter() - t0) * 1000,
                                    playing=True)
                else:  # on the microphone's clock, as the page reports it
                    await self.send(type="playback", turn_id=turn_id, position_ms=self.speaker.position_ms(turn_id),
                                    playing=self.speaker.playing(turn_id), mic_samples=self.speaker.samples)

        self._player = asyncio.create_task(play())

    async def send(self, **event: Any) -> None:
        await self.ws.send(json.dumps(event))

    def events(self, kind: str) -> list[dict[str, Any]]:
        return [p for _, k, p in self.log if k == kind]

    async def wait_for(self, kind: str, timeout: float = 60, after: int = 0, **match: Any) -> tuple[float, dict[str, Any]]:
        deadline = time.perf_counter() + timeout
        while True:
            for t, k, p in self.log[after:]:
                if k == kind and all(p.get(key) == v for key, v in match.items()):
                    return t, p
            self._new.clear()
            left = deadline - time.perf_counter()
            if left <= 0:
                raise TimeoutError(f"no {kind} {match}; saw {[k for _, k, _ in self.log][-30:]}")
            try:
                await asyncio.wait_for(self._new.wait(), left)
            except TimeoutError:
                pass

    async def close(self) -> None:
        for task in (self._player, self._reader):
            if task is not None:
                task.cancel()
        await self.ws.close()


async def voice_client(app) -> VoiceClient:  # type: ignore[no-untyped-def]  # app: LiveApp (or .ws: its URL)
    return await VoiceClient(await connect(app.ws, max_size=None)).start()
