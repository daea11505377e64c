"""An OpenAI-compatible speech service on loopback for tests: ``POST /v1/audio/speech`` speaks with the
real Piper voice and ``POST /v1/audio/transcriptions`` transcribes with the real Whisper tiny.en, next to
the chat API of ``OpenAITestServer`` (so one server can play a whole remote deployment).

``SpeechBehaviour`` makes it fail the ways real services do: an error status, slow headers, a stall or
a drop mid-audio, audio that is not audio. Requests and client disconnects are recorded.
"""

from __future__ import annotations

import asyncio
import functools
import io
import threading
import wave
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from avatarchat.config import ASRConfig
from avatarchat.engines.asr.openai_transcribe import wav_bytes
from avatarchat.engines.asr.whisper import WhisperEngine
from avatarchat.pipeline.media import resample
from tests.support.openai_server import OpenAITestServer
from tests.support.speech import _piper

PCM_RATE = 24000  # OpenAI's pcm format


@dataclass
class SpeechBehaviour:
    status: int = 200  # audio routes answer this (an error body unless 200)
    headers_delay_s: float = 0.0
    chunk_bytes: int = 4096
    chunk_delay_s: float = 0.0
    stall_after_bytes: int | None = None  # stop sending (without closing) after this many bytes
    drop_after_bytes: int | None = None  # close the stream abruptly after this many bytes
    garbage: bool = False  # send bytes that are no audio format
    transcript: str | None = None  # answer this instead of Whisper's transcript
    transcript_body: bytes | None = None  # answer these bytes as they are


_WHISPER_LOCK = threading.Lock()  # the model is not thread-safe


@functools.cache
def _whisper() -> WhisperEngine:
    engine = WhisperEngine(ASRConfig())
    engine.load()
    return engine


def _transcribe(audio: np.ndarray) -> str:
    with _WHISPER_LOCK:
        return _whisper().transcribe(audio)


def _encode(audio: np.ndarray, rate: int, fmt: str) -> tuple[bytes, str]:
    if fmt == "pcm":
        return (np.clip(resample(audio, rate, PCM_RATE), -1, 1) * 32767).astype("<i2").tobytes(), "audio/pcm"
    if fmt == "wav":
        return wav_bytes(audio, rate), "audio/wav"
    import av

    out = io.BytesIO()
    with av.open(out, "w", format=fmt) as container:
        stream = container.add_stream({"mp3": "libmp3lame", "flac": "flac"}[fmt], rate=rate, layout="mono")
        frame = av.AudioFrame.from_ndarray(audio.astype(np.float32)[None, :], format="flt", layout="mono")
        frame.sample_rate = rate
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return out.getvalue(), f"audio/{fmt}"


@dataclass
class SpeechTestServer(OpenAITestServer):
    speech: SpeechBehaviour = field(default_factory=SpeechBehaviour)
    audio_requests: list[dict[str, Any]] = field(default_factory=list)
    sent_audio: list[np.ndarray] = field(default_factory=list)  # what /audio/speech spoke, at its own rate
    disconnects: int = 0  # audio streams the client closed before their end, and transcriptions it gave up on
    asr_disconnects: int = 0  # of those, transcriptions (a speech stream of an earlier test may notice its late)

    def _app(self) -> Starlette:
        app = super()._app()

        def refused(b: SpeechBehaviour) -> Response | None:
            if b.status == 200:
                return None
            return JSONResponse({"error": {"message": f"test error {b.status}", "type": "test"}}, status_code=b.status)

        async def speech(request: Request) -> Response:
            body = await request.json()
            self.audio_requests.append({"route": "speech", "body": body, "headers": dict(request.headers)})
            b = self.speech
            await asyncio.sleep(b.headers_delay_s)
            if (error := refused(b)) is not None:
                return error
            if b.garbage:
                data, media = b"this is not audio at all " * 40, "audio/mpeg"
            else:
                s = await asyncio.to_thread(_piper().synthesize, body["input"], rate=float(body.get("speed", 1.0)))
                self.sent_audio.append(s.audio)
                data, media = _encode(s.audio, s.sample_rate, body.get("response_format", "mp3"))

            async def gen() -> Any:
                sent = 0
                try:
                    while sent < len(data):
                        if b.drop_after_bytes is not None and sent >= b.drop_after_bytes:
                            raise RuntimeError("test: drop the connection mid-audio")
                        if b.stall_after_bytes is not None and sent >= b.stall_after_bytes:
                            await asyncio.sleep(3600)
                        yield data[sent : sent + b.chunk_bytes]
                        sent += b.chunk_bytes
                        await asyncio.sleep(b.chunk_delay_s)
                except asyncio.CancelledError:
                    self.disconnects += 1
                    raise

            return StreamingResponse(gen(), media_type=media)

        async def transcriptions(request: Request) -> Response:
            form = await request.form()
            upload = form["file"]
            raw = await upload.read()  # type: ignore[union-attr]
            fields = {k: v for k, v in form.items() if isinstance(v, str)}
            self.audio_requests.append({"route": "transcriptions", "form": fields, "bytes": len(raw),
                                        "headers": dict(request.headers)})
            b = self.speech
            if b.headers_delay_s:
                try:  # the body is read: the next message is the client's disconnect, if it comes
                    message = await asyncio.wait_for(request.receive(), b.headers_delay_s)
                except TimeoutError:
                    message = {}
                if message.get("type") == "http.disconnect":
                    self.disconnects += 1
                    self.asr_disconnects += 1
                    return Response(status_code=499)
            if (error := refused(b)) is not None:
                return error
            if b.transcript_body is not None:
                return Response(b.transcript_body, media_type="application/json")
            if b.transcript is not None:
                return JSONResponse({"text": b.transcript})
            with wave.open(io.BytesIO(raw)) as w:
                pcm = np.frombuffer(w.readframes(w.getnframes()), "<i2").astype(np.float32) / 32768
                rate = w.getframerate()
            text = await asyncio.to_thread(_transcribe, resample(pcm, rate, 16000))
            return JSONResponse({"text": text})

        app.router.routes.extend([Route("/v1/audio/speech", speech, methods=["POST"]),
                                  Route("/v1/audio/transcriptions", transcriptions, methods=["POST"])])
        return app
