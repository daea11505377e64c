"""The Edge TTS engine against a loopback stand-in for Edge's read-aloud WebSocket, sending real speech
(Piper's, encoded as Edge's 24 kHz 48 kbit/s MP3)."""

from __future__ import annotations

import asyncio
import io
import json
import re
import socket
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import av
import numpy as np
import pytest
from scipy.signal import resample_poly
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from avatarchat.config import EdgeTTSConfig, load_settings
from avatarchat.engines.registry import TTS_ENGINES
from avatarchat.engines.tts.base import RemoteTTSEngine, TTSError
from avatarchat.engines.tts.edge import EdgeEngine, communicate_class, rate_string
from tests.support.speech import _piper

TEXT = "Hello there. This is a test of the Edge voice."
RATE = 24000
MP3_FRAME_S = 1152 / RATE
TICKS = 10_000_000


def encode_mp3(pcm: np.ndarray) -> bytes:
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp3") as out:
        stream = out.add_stream("libmp3lame", rate=RATE, layout="mono")
        stream.bit_rate = 48000
        for i in range(0, len(pcm), 1152):
            frame = av.AudioFrame.from_ndarray(pcm[None, i : i + 1152], format="flt", layout="mono")
            frame.sample_rate = RATE
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return buf.getvalue()


def text_message(request_id: str, path: str, body: dict[str, Any]) -> str:
    return (f"X-RequestId:{request_id}\r\nContent-Type:application/json; charset=utf-8\r\nPath:{path}\r\n\r\n"
            + json.dumps(body))


def audio_message(request_id: str, data: bytes) -> bytes:
    """Edge's binary frame: a 2-byte big-endian header length, the header lines, the audio."""
    kind = "Content-Type:audio/mpeg\r\n" if data else ""  # the end-of-stream frame has neither
    head = f"X-RequestId:{request_id}\r\n{kind}X-StreamId:A1\r\nPath:audio\r\n".encode()
    return len(head).to_bytes(2, "big") + head + data


class EdgeServer:
    """Edge's read-aloud protocol as edge-tts 7.3.1 speaks it: speech.config and SSML in; turn.start, audio
    with WordBoundary metadata (one per word, spread over the speech; edge-tts reads the SentenceBoundary that
    it asks for by default alike), turn.end out. ``mode`` picks a failure. Runs on a loop of its own, in a
    thread, so that the blocking ``synthesize`` can be tested too."""

    def __init__(self) -> None:
        self.mode = "speak"
        self.pcm = np.zeros(0, np.float32)
        self.mp3 = b""
        self.requests: list[dict[str, Any]] = []
        self.ssml_received = threading.Event()
        self.closed_at: list[float] = []
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Future[None] | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/consumer/speech/synthesize/readaloud/edge/v1?TrustedClientToken=t"

    def reset(self) -> None:
        self.mode = "speak"
        self.requests.clear()
        self.ssml_received.clear()
        self.closed_at.clear()

    def start(self) -> EdgeServer:
        ready = threading.Event()

        async def main() -> None:
            async with serve(self._handle, "127.0.0.1", 0) as server:
                self.port = next(iter(server.sockets)).getsockname()[1]
                self._stop = asyncio.get_running_loop().create_future()
                ready.set()
                await self._stop

        def run() -> None:
            self._loop = asyncio.new_event_loop()
            self._loop.run_until_complete(main())
            self._loop.close()

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        assert ready.wait(10)
        return self

    def stop(self) -> None:
        assert self._loop is not None and self._stop is not None and self._thread is not None
        self._loop.call_soon_threadsafe(self._stop.set_result, None)
        self._thread.join(10)

    async def _handle(self, ws: ServerConnection) -> None:
        request: dict[str, Any] = {"path": ws.request.path if ws.request else ""}
        self.requests.append(request)
        mode = self.mode
        try:
            request["config"] = await ws.recv()
            request["ssml"] = ssml = str(await ws.recv())
            self.ssml_received.set()
            rid = re.search(r"X-RequestId:(\w+)", ssml)[1]  # type: ignore[index]
            if mode == "close_before_audio":
                await ws.close()
                return
            if mode == "stall":
                await ws.wait_closed()
                return
            await ws.send(text_message(rid, "turn.start", {"context": {"serviceTag": "test"}}))
            audio = b"this is not an mp3 stream " * 200 if mode == "bad_mp3" else self.mp3
            chunks = [audio[i : i + 4096] for i in range(0, len(audio), 4096)]
            if mode in ("close_mid_audio", "stall_after_audio"):
                chunks = chunks[: len(chunks) // 2]
            words = TEXT.split()
            word_s = len(self.pcm) / RATE / len(words)
            for i, chunk in enumerate(chunks):
                await ws.send(audio_message(rid, chunk))
                for k in range(i * len(words) // len(chunks), (i + 1) * len(words) // len(chunks)):
                    await ws.send(text_message(rid, "audio.metadata", {"Metadata": [{"Type": "WordBoundary", "Data": {
                        "Offset": int(k * word_s * TICKS), "Duration": int(word_s * TICKS),
                        "text": {"Text": words[k], "Length": len(words[k]), "BoundaryType": "WordBoundary"}}}]}))
            if mode == "close_mid_audio":
                await ws.close()
                return
            if mode == "stall_after_audio":
                await ws.wait_closed()
                return
            await ws.send(audio_message(rid, b""))
            await ws.send(text_message(rid, "turn.end", {}))
            await ws.wait_closed()
        except ConnectionClosed:
            pass
        finally:
            self.closed_at.append(time.monotonic())


@pytest.fixture(scope="module")
def edge_server() -> Iterator[EdgeServer]:
    speech = _piper().synthesize(TEXT)
    pcm = resample_poly(speech.audio, RATE // 50, speech.sample_rate // 50).astype(np.float32)  # 22.05 → 24 kHz
    server = EdgeServer()
    server.pcm, server.mp3 = pcm, encode_mp3(pcm)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def server(edge_server: EdgeServer, monkeypatch: pytest.MonkeyPatch) -> EdgeServer:
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")  # edge-tts honours proxy variables (trust_env)
    edge_server.reset()
    return edge_server


def engine(url: str, **kw: Any) -> EdgeEngine:
    e = EdgeEngine(EdgeTTSConfig(url=url, **kw))
    e.load()
    return e


async def test_speaks_the_audio_sent(server: EdgeServer) -> None:
    e = engine(server.url)
    speech = await e.speak(TEXT)
    assert isinstance(e, RemoteTTSEngine) and e.name == "edge" and e.voices() == ["zh-CN-XiaoxiaoNeural"]
    assert speech.sample_rate == RATE == e.sample_rate and speech.audio.dtype == np.float32
    assert speech.phonemes is None and speech.text == TEXT
    assert abs(speech.duration - len(server.pcm) / RATE) <= MP3_FRAME_S
    n = min(len(speech.audio), len(server.pcm))
    assert np.corrcoef(speech.audio[:n], server.pcm[:n])[0, 1] > 0.9  # the same speech, through MP3
    assert float(np.max(np.abs(speech.audio))) <= 1.0
    # edge-tts built its request URL on ours, and sent Edge's request.
    (req,) = server.requests
    assert req["path"].startswith("/consumer/speech/synthesize/readaloud/edge/v1?TrustedClientToken=t&ConnectionId=")
    assert "Sec-MS-GEC=" in req["path"] and "Path:speech.config" in req["config"]
    assert "<voice name='Microsoft Server Speech Text to Speech Voice (zh-CN, XiaoxiaoNeural)'>" in req["ssml"]
    assert "pitch='+0Hz' rate='+0%' volume='+0%'" in req["ssml"] and "Hello there." in req["ssml"]
    await e.close()


def test_without_a_url_edge_tts_is_untouched() -> None:
    import edge_tts

    assert communicate_class(None) is edge_tts.Communicate
    assert edge_tts.communicate.WSS_URL.startswith("wss://speech.platform.bing.com/")  # after the tests above
    EdgeEngine(EdgeTTSConfig()).load()  # offline: load checks the settings, sends nothing


async def test_rate_voice_pitch_and_volume_reach_the_ssml(server: EdgeServer) -> None:
    e = engine(server.url, voice="en-US-AriaNeural", pitch="-10Hz", volume="+20%")
    await e.speak(TEXT, rate=1.5)
    ssml = server.requests[-1]["ssml"]
    assert "pitch='-10Hz' rate='+50%' volume='+20%'" in ssml
    assert "Microsoft Server Speech Text to Speech Voice (en-US, AriaNeural)" in ssml
    assert [rate_string(r) for r in (1.0, 1.5, 0.8, 2.0, 1.234)] == ["+0%", "+50%", "-20%", "+100%", "+23%"]


async def test_resamples_to_the_configured_rate(server: EdgeServer) -> None:
    speech = await engine(server.url, sample_rate=16000).speak(TEXT)
    assert speech.sample_rate == 16000
    assert abs(speech.duration - len(server.pcm) / RATE) <= MP3_FRAME_S


def test_blocking_synthesize(server: EdgeServer) -> None:
    speech = engine(server.url).synthesize(TEXT, rate=1.5)
    assert abs(speech.duration - len(server.pcm) / RATE) <= MP3_FRAME_S
    assert "rate='+50%'" in server.requests[-1]["ssml"]


async def test_blocking_synthesize_refuses_a_running_loop(server: EdgeServer) -> None:
    with pytest.raises(TTSError, match="await speak"):
        engine(server.url).synthesize(TEXT)


async def test_registry_builds_it_from_config(server: EdgeServer) -> None:
    settings = load_settings(tts={"engine": "edge", "edge": {"url": server.url, "voice": "zh-CN-YunxiNeural"}})
    e = TTS_ENGINES[settings.tts.engine](settings)
    assert isinstance(e, EdgeEngine) and isinstance(e, RemoteTTSEngine)
    e.load()
    speech = await e.speak(TEXT)
    assert speech.duration > 1 and "(zh-CN, YunxiNeural)" in server.requests[-1]["ssml"]


@pytest.mark.parametrize(("mode", "message"), [
    ("close_before_audio", "closed without sending audio"),
    ("close_mid_audio", r"closed before the end of the speech \(\d+ bytes"),
    ("bad_mp3", r"no audio decoded from 5200 bytes|bad MP3"),
])
async def test_a_broken_answer_is_a_tts_error(server: EdgeServer, mode: str, message: str) -> None:
    server.mode = mode
    with pytest.raises(TTSError, match=message) as info:
        await engine(server.url).speak(TEXT)
    assert f"127.0.0.1:{server.port}" in str(info.value) and "zh-CN-XiaoxiaoNeural" in str(info.value)


@pytest.mark.parametrize(("mode", "timeout", "message"), [
    ("stall", {"first_audio_timeout_s": 0.5}, r"no audio within 0.5 s"),
    ("stall_after_audio", {"total_timeout_s": 1.0}, r"speech not finished within 1 s"),
], ids=["before-audio", "mid-speech"])
async def test_a_stalled_service_times_out(server: EdgeServer, mode: str, timeout: dict[str, float], message: str) -> None:
    server.mode = mode
    e = engine(server.url, **timeout)
    start = time.monotonic()
    with pytest.raises(TTSError, match=message):
        await e.speak(TEXT)
    assert time.monotonic() - start < next(iter(timeout.values())) + 0.5


async def test_a_handshake_that_never_comes_times_out() -> None:
    """A listener that never accepts: the kernel completes TCP, the WebSocket upgrade is never answered."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        e = engine(f"ws://127.0.0.1:{sock.getsockname()[1]}/edge/v1", first_audio_timeout_s=0.5)
        start = time.monotonic()
        with pytest.raises(TTSError, match="no audio within 0.5 s"):
            await e.speak(TEXT)
        assert time.monotonic() - start < 0.5 + 0.5


async def test_connection_refused() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, not listening: refused
        with pytest.raises(TTSError, match=f"127.0.0.1:{port}.*cannot connect"):
            await engine(f"ws://127.0.0.1:{port}/edge/v1").speak(TEXT)


async def test_cancelling_speak_closes_the_connection(server: EdgeServer) -> None:
    server.mode = "stall"
    task = asyncio.create_task(engine(server.url).speak(TEXT))
    while not server.ssml_received.is_set():
        assert not task.done()
        await asyncio.sleep(0.01)
    task.cancel()
    cancelled = time.monotonic()
    with pytest.raises(asyncio.CancelledError):
        await task
    while not server.closed_at and time.monotonic() - cancelled < 2:
        await asyncio.sleep(0.01)
    assert server.closed_at and server.closed_at[0] - cancelled < 1.0


async def test_empty_text_needs_no_request(server: EdgeServer) -> None:
    speech = await engine(server.url).speak("  ")
    assert len(speech.audio) == 0 and not server.requests


def test_without_edge_tts_load_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "edge_tts", None)  # import edge_tts raises ImportError
    with pytest.raises(TTSError, match="pip install edge-tts"):
        EdgeEngine(EdgeTTSConfig()).load()


def test_config_is_checked() -> None:
    with pytest.raises(ValueError, match="url"):
        EdgeTTSConfig(url="http://127.0.0.1/edge")
    with pytest.raises(ValueError, match="pitch"):
        EdgeTTSConfig(pitch="+10%")
    with pytest.raises(TTSError, match="Invalid voice"):
        EdgeEngine(EdgeTTSConfig(voice="not a voice", url="ws://127.0.0.1:9/")).load()
