"""Any OpenAI-compatible ``POST /v1/audio/speech`` (OpenAI, Kokoro-FastAPI, LocalAI, speaches, a gateway).

The body is read as it streams, each wait bounded: the first byte by ``first_byte_timeout_s``, the
whole answer by ``timeout_s``. A remote voice gives no phoneme timings, so the avatar's mouth follows
the audio itself (``engines/avatar/visemes.py``: loudness opens it, the spectrum widens it).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import httpx
import numpy as np

from avatarchat.config import OpenAISpeechConfig
from avatarchat.engines.tts.audio import AudioDecodeError, decode_audio
from avatarchat.engines.tts.base import TTSError
from avatarchat.engines.types import Speech
from avatarchat.pipeline.media import resample


class OpenAISpeechEngine:
    name = "openai"

    def __init__(self, config: OpenAISpeechConfig, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self._c = config
        self.sample_rate = config.sample_rate
        self._url = config.base_url.rstrip("/") + "/audio/speech"
        self._headers = {"Authorization": f"Bearer {key}"} if (key := config.resolved_key()) else {}
        timeout = httpx.Timeout(config.timeout_s, connect=config.connect_timeout_s)
        limits = httpx.Limits(max_connections=config.max_concurrent, keepalive_expiry=2.0)
        self._client = httpx.AsyncClient(timeout=timeout, limits=limits, headers=self._headers, transport=transport)
        self._sync: httpx.Client | None = None

    def load(self) -> None:
        return None  # remote: nothing to load; `doctor` checks that the server answers

    def voices(self) -> list[str]:
        return [self._c.voice]

    def _body(self, text: str, rate: float) -> dict[str, object]:
        if not text.strip():
            raise TTSError("nothing to say: the text is empty")
        return {"model": self._c.model, "input": text, "voice": self._c.voice,
                "response_format": self._c.response_format, "speed": round(min(4.0, max(0.25, rate)), 3)}

    def _error(self, e: Exception) -> TTSError:
        if isinstance(e, TTSError):
            return e
        if isinstance(e, httpx.TimeoutException | TimeoutError):
            return TTSError(f"TTS server {self._url} did not answer in time ({type(e).__name__})")
        return TTSError(f"TTS server {self._url} unreachable or failed: {type(e).__name__}: {e}")

    async def speak(self, text: str, *, rate: float = 1.0) -> Speech:
        body = self._body(text, rate)
        loop = asyncio.get_running_loop()
        end = loop.time() + self._c.timeout_s
        chunks: list[bytes] = []
        try:
            async with asyncio.timeout_at(min(end, loop.time() + self._c.first_byte_timeout_s)) as deadline:
                async with self._client.stream("POST", self._url, json=body) as response:
                    if response.status_code != 200:
                        raise self._status_error(response.status_code, await response.aread())
                    size = 0
                    async for chunk in response.aiter_bytes():
                        deadline.reschedule(end)  # audio is flowing: only the whole answer's deadline is left
                        size += len(chunk)
                        if size > self._c.max_audio_bytes:
                            raise TTSError(f"TTS server sent more than {self._c.max_audio_bytes} bytes for {len(text)} characters")
                        chunks.append(chunk)
        except (httpx.HTTPError, TimeoutError, TTSError) as e:
            raise self._error(e) from e
        # Decoding and resampling take milliseconds, but off the loop that serves every session.
        return await asyncio.to_thread(self._speech, b"".join(chunks), text)

    def synthesize(self, text: str, *, rate: float = 1.0) -> Speech:
        body = self._body(text, rate)
        if self._sync is None:
            # Blocking callers (the render CLI, calibration) get per-read timeouts; the size limit ends a trickle.
            self._sync = httpx.Client(timeout=httpx.Timeout(self._c.first_byte_timeout_s, connect=self._c.connect_timeout_s),
                                      headers=self._headers)
        try:
            with self._sync.stream("POST", self._url, json=body) as response:
                if response.status_code != 200:
                    raise self._status_error(response.status_code, response.read())
                data = b"".join(_limited(response.iter_bytes(), self._c.max_audio_bytes))
        except (httpx.HTTPError, TTSError) as e:
            raise self._error(e) from e
        return self._speech(data, text)

    def _status_error(self, status: int, body: bytes) -> TTSError:
        return TTSError(f"TTS server {self._url} answered {status}: {body[:300].decode('utf-8', 'replace')}")

    def _speech(self, data: bytes, text: str) -> Speech:
        if self._c.response_format == "pcm":
            pcm = np.frombuffer(data[: len(data) // 2 * 2], "<i2").astype(np.float32) / 32768.0
            audio = resample(pcm, self._c.pcm_sample_rate, self.sample_rate)
        else:
            try:
                audio = decode_audio(data, self.sample_rate)
            except AudioDecodeError as e:
                raise TTSError(f"TTS server {self._url} sent audio that cannot be decoded: {e}") from e
        if len(audio) == 0:
            raise TTSError(f"TTS server {self._url} sent no audio for {text[:40]!r}")
        return Speech(audio, self.sample_rate, None, text)

    async def close(self) -> None:
        await self._client.aclose()
        if self._sync is not None:
            self._sync.close()


def _limited(source: Iterator[bytes], limit: int) -> Iterator[bytes]:
    size = 0
    for chunk in source:
        size += len(chunk)
        if size > limit:
            raise TTSError(f"TTS server sent more than {limit} bytes")
        yield chunk
