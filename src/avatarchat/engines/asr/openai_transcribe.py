"""Any OpenAI-compatible ``POST /v1/audio/transcriptions`` (OpenAI, speaches, faster-whisper-server,
LocalAI, a gateway). The utterance goes up as 16 kHz 16-bit WAV; ``asr.language`` and
``asr.initial_prompt`` go with it, and ``asr.simplified`` converts the answer as it does for Whisper."""

from __future__ import annotations

import asyncio
import io
import wave
from typing import Any

import httpx
import numpy as np

from avatarchat.config import ASRConfig
from avatarchat.engines.asr.base import ASRError


class OpenAITranscribeEngine:
    name = "openai"
    sample_rate = 16000

    def __init__(self, config: ASRConfig, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self._config = config
        c = config.openai
        self._url = c.base_url.rstrip("/") + "/audio/transcriptions"
        self._headers = {"Authorization": f"Bearer {key}"} if (key := c.resolved_key()) else {}
        # The pool wait counts too: a request queued behind max_concurrent others still ends by timeout_s.
        self._timeout = httpx.Timeout(c.timeout_s, connect=c.connect_timeout_s)
        self._client = httpx.AsyncClient(timeout=self._timeout, headers=self._headers, transport=transport,
                                         limits=httpx.Limits(max_connections=c.max_concurrent, keepalive_expiry=2.0))
        self._sync: httpx.Client | None = None
        self._t2s: Any = None

    def load(self) -> None:
        if self._config.simplified:
            from opencc import OpenCC

            self._t2s = OpenCC("t2s")

    def _form(self, audio: np.ndarray) -> tuple[dict[str, str], dict[str, tuple[str, bytes, str]]]:
        seconds = len(audio) / self.sample_rate
        if seconds > self._config.openai.max_audio_s:
            raise ASRError(f"utterance of {seconds:.1f} s is longer than asr.openai.max_audio_s "
                           f"({self._config.openai.max_audio_s:g} s)")
        data = {"model": self._config.openai.model, "response_format": "json", "temperature": "0"}
        if self._config.language:
            data["language"] = self._config.language
        if self._config.initial_prompt:
            data["prompt"] = self._config.initial_prompt
        return data, {"file": ("utterance.wav", wav_bytes(audio, self.sample_rate), "audio/wav")}

    def _text(self, response: httpx.Response) -> str:
        if response.status_code != 200:
            raise ASRError(f"ASR server {self._url} answered {response.status_code}: {response.text[:300]}")
        try:
            text = response.json().get("text")
        except (ValueError, AttributeError) as e:
            raise ASRError(f"ASR server {self._url} sent no JSON transcript: {response.text[:200]!r}") from e
        if not isinstance(text, str):
            raise ASRError(f"ASR server {self._url} sent no text field: {response.text[:200]!r}")
        text = " ".join(text.split())
        return self._t2s.convert(text) if self._t2s is not None else text

    def _error(self, e: Exception) -> ASRError:
        if isinstance(e, httpx.TimeoutException | TimeoutError):
            return ASRError(f"ASR server {self._url} did not answer within {self._config.openai.timeout_s:g} s "
                            f"({type(e).__name__})")
        return ASRError(f"ASR server {self._url} unreachable or failed: {type(e).__name__}: {e}")

    async def transcribe_async(self, audio: np.ndarray) -> str:
        data, files = self._form(audio)
        try:
            async with asyncio.timeout(self._config.openai.timeout_s):  # the whole request, not each read
                response = await self._client.post(self._url, data=data, files=files)
        except (TimeoutError, httpx.HTTPError) as e:
            raise self._error(e) from e
        return self._text(response)

    def transcribe(self, audio: np.ndarray) -> str:
        data, files = self._form(audio)
        if self._sync is None:
            self._sync = httpx.Client(timeout=self._timeout, headers=self._headers)
        try:
            response = self._sync.post(self._url, data=data, files=files)
        except httpx.HTTPError as e:
            raise self._error(e) from e
        return self._text(response)

    async def close(self) -> None:
        await self._client.aclose()
        if self._sync is not None:
            self._sync.close()


def wav_bytes(audio: np.ndarray, rate: int) -> bytes:
    """Mono float32 audio as a 16-bit PCM WAV file."""
    pcm = (np.clip(np.asarray(audio, np.float32), -1.0, 1.0) * 32767).astype("<i2")
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())
    return out.getvalue()
