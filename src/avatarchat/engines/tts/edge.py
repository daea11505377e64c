"""Microsoft Edge's online voices (``tts.engine: edge``) through the optional ``edge-tts`` package (LGPLv3).

Edge streams 24 kHz MP3 over a WebSocket; PyAV decodes it to mono float32 at ``tts.edge.sample_rate``.
A remote voice: a turn awaits ``speak`` on the event loop (no CPU slot); ``synthesize`` is its blocking form.

``phonemes`` is None. Edge's boundaries time words (or, as edge-tts asks by default, sentences), not sounds:
the viseme mapper reads a phoneme as its first known IPA character, so a word would hold one shape ("hello"
as "h") and a hanzi none (a neutral half-open mouth) for its whole length, which looks worse than the mouth
the avatar drives from the audio itself. The audio is kept as sent, its short lead-in and tail included: they
are the voice's own pacing between pieces.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import types
from typing import Any

import numpy as np

from avatarchat.config import EdgeTTSConfig
from avatarchat.engines.tts.audio import AudioDecodeError, decode_audio
from avatarchat.engines.tts.base import TTSError
from avatarchat.engines.types import Speech
from avatarchat.redact import redact_url

EDGE_URL = "wss://speech.platform.bing.com/consumer/speech/synthesize/readaloud/edge/v1"  # for messages


def rate_string(rate: float) -> str:
    """Our rate (1.0 normal, 1.5 = 50 % faster) as edge-tts's prosody rate: '+50%'."""
    return f"{round((rate - 1.0) * 100):+d}%"


def communicate_class(url: str | None) -> Any:
    """edge-tts's ``Communicate``, or with ``url`` a subclass that connects there instead.

    edge-tts 7.3.1 has no endpoint option: ``Communicate.__stream`` reads the module constant ``WSS_URL`` and
    appends ``&ConnectionId=…&Sec-MS-GEC=…``. Setting ``edge_tts.communicate.WSS_URL`` would repoint every user
    in the process; instead the subclass gets a copy of that one method whose globals hold our URL."""
    try:
        import edge_tts
        from edge_tts import communicate
    except ImportError as e:
        raise TTSError("tts.engine edge needs the edge-tts package: pip install edge-tts==7.3.1") from e
    if url is None:
        return edge_tts.Communicate
    stream = getattr(communicate.Communicate, "_Communicate__stream", None)
    if stream is None or "WSS_URL" not in stream.__code__.co_names:
        raise TTSError(f"edge-tts {edge_tts.__version__} connects differently: tts.edge.url needs edge-tts 7.3.1")
    scope = {**stream.__globals__, "WSS_URL": url if "?" in url else url + "?"}
    method = types.FunctionType(stream.__code__, scope, stream.__name__, stream.__defaults__, stream.__closure__)
    return type("Communicate", (communicate.Communicate,), {"_Communicate__stream": method})


class EdgeEngine:
    name = "edge"

    def __init__(self, config: EdgeTTSConfig) -> None:
        self._config = config
        self._cls: Any = None
        self._where = f"Edge TTS ({redact_url(config.url or EDGE_URL)}, voice {config.voice})"

    @property
    def sample_rate(self) -> int:
        return self._config.sample_rate

    def voices(self) -> list[str]:
        return [self._config.voice]

    def load(self) -> None:
        """Import edge-tts and check the voice settings; nothing goes over the network."""
        if self._cls is None:
            cls = communicate_class(self._config.url)
            self._new(cls, "check", 1.0)
            self._cls = cls

    def _new(self, cls: Any, text: str, rate: float) -> Any:
        c = self._config
        try:
            return cls(text, c.voice, rate=rate_string(rate), volume=c.volume, pitch=c.pitch, proxy=c.proxy,
                       # edge-tts's own limits, in whole seconds: the socket connect, and the handshake's read
                       # (the WebSocket itself reads unbounded). Ours below bound every wait.
                       connect_timeout=c.connect_timeout_s, receive_timeout=math.ceil(c.total_timeout_s) + 1)
        except (TypeError, ValueError) as e:
            raise TTSError(f"{self._where}: {e}") from e

    def synthesize(self, text: str, *, rate: float = 1.0) -> Speech:
        """Blocking: runs ``speak`` on an event loop of its own (call it from a thread without a running loop)."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(self.speak(text, rate=rate))
        raise TTSError("EdgeEngine.synthesize blocks: await speak() on the event loop instead")

    async def speak(self, text: str, *, rate: float = 1.0) -> Speech:
        self.load()
        if not text.strip():
            return Speech(np.zeros(0, np.float32), self.sample_rate, None, text)
        mp3 = await self._fetch(text, rate)
        # Decoding a piece takes milliseconds, but off the loop that serves every session.
        audio = await asyncio.to_thread(self._decode, mp3)
        return Speech(audio, self.sample_rate, None, text)

    async def close(self) -> None:
        return None  # each speak opens and closes its own connection

    async def _fetch(self, text: str, rate: float) -> bytes:
        import aiohttp
        from edge_tts import exceptions

        c = self._config
        comm = self._new(self._cls, text, rate)
        start = asyncio.get_running_loop().time()
        mp3 = bytearray()
        deadline = asyncio.timeout_at(start + min(c.first_audio_timeout_s, c.total_timeout_s))
        try:
            async with deadline, contextlib.aclosing(comm.stream()) as chunks:
                async for chunk in chunks:
                    if chunk["type"] == "audio":
                        if not mp3:
                            deadline.reschedule(start + c.total_timeout_s)
                        mp3 += chunk["data"]
        except TimeoutError as e:  # ours, or aiohttp's connect timeout (a TimeoutError too)
            if not deadline.expired():
                raise TTSError(f"{self._where}: no connection within {c.connect_timeout_s} s") from e
            if mp3:
                raise TTSError(f"{self._where}: speech not finished within {c.total_timeout_s:g} s") from e
            raise TTSError(f"{self._where}: no audio within "
                           f"{min(c.first_audio_timeout_s, c.total_timeout_s):g} s") from e
        except aiohttp.WSServerHandshakeError as e:
            raise TTSError(f"{self._where}: WebSocket refused: {e.status} {e.message}") from e
        except aiohttp.ClientConnectorError as e:
            raise TTSError(f"{self._where}: cannot connect: {e.os_error}") from e
        except aiohttp.ClientError as e:
            raise TTSError(f"{self._where}: connection failed: {e}") from e
        except exceptions.NoAudioReceived as e:
            raise TTSError(f"{self._where}: the service closed without sending audio") from e
        except exceptions.EdgeTTSException as e:
            raise TTSError(f"{self._where}: unexpected response: {e}") from e
        # edge-tts ends its stream quietly when the socket closes before turn.end; only at turn.end does it add
        # a request's audio bytes to this count, so a shortfall is speech cut off.
        if comm.state["cumulative_audio_bytes"] != len(mp3):
            raise TTSError(f"{self._where}: the service closed before the end of the speech "
                           f"({len(mp3)} bytes of audio)")
        return bytes(mp3)

    def _decode(self, mp3: bytes) -> np.ndarray:
        try:
            audio = decode_audio(mp3, self.sample_rate, "mp3")
        except AudioDecodeError as e:
            raise TTSError(f"{self._where}: bad MP3 ({len(mp3)} bytes): {e}") from e
        if not len(audio):
            raise TTSError(f"{self._where}: no audio decoded from {len(mp3)} bytes of MP3")
        return audio
