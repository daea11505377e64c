"""Shared parts of the router benches: a generated 10,000-model discovery cache, router configs,
loopback upstreams in their own processes, and the router CLI as a subprocess."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "src"), str(ROOT)]
ADMIN = "bench-admin"
VENDORS = [f"vendor{i}" for i in range(20)] + ["qwen", "meta-llama", "mistralai", "google", "deepseek"]
FAMILIES = ["qwen-2.5", "llama-3.1", "mistral", "gemma-2", "phi-3", "deepseek-v2", "yi", "command-r"]
SIZES = [1, 3, 7, 8, 14, 32, 70, 72, 405]


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}:{ROOT}", "ROUTER_ADMIN_TOKEN": ADMIN}


def model_object(rng: random.Random, i: int) -> dict[str, Any]:
    """A model as OpenRouter's /models lists it, with the metadata that makes such caches big (~5 KB)."""
    mid = f"{rng.choice(VENDORS)}/{rng.choice(FAMILIES)}-{rng.choice(SIZES)}b-v{i}" + (":free" if i % 3 == 0 else "")
    free = i % 3 == 0
    words = " ".join(rng.choice(FAMILIES) for _ in range(180))
    return {
        "id": mid, "name": mid.replace("/", ": "), "created": 1700000000 + i, "description": words,
        "context_length": rng.choice([4096, 8192, 32768, 131072]),
        "architecture": {"modality": "text->text", "input_modalities": ["text"], "output_modalities": ["text"],
                         "tokenizer": rng.choice(FAMILIES), "instruct_type": "chatml"},
        "pricing": {"prompt": "0" if free else f"{rng.uniform(1e-8, 2e-5):.10f}",
                    "completion": "0" if free else f"{rng.uniform(1e-8, 6e-5):.10f}", "request": "0", "image": "0"},
        "top_provider": {"context_length": 32768, "max_completion_tokens": 4096, "is_moderated": False},
        "supported_parameters": ["max_tokens", "temperature", "top_p", "stop", "frequency_penalty", "presence_penalty",
                                 "seed", "logit_bias", "response_format", "tools", "tool_choice"],
        "endpoints": [{"provider_name": f"host{k}", "status": 0, "uptime_last_30m": rng.random(), "latency_ms": rng.random() * 900,
                       "quantization": rng.choice(["fp8", "bf16", "int4"]), "region": rng.choice(["us", "eu", "ap"]),
                       "notes": words[:330]} for k in range(6)],
    }


def generate_cache(path: Path, n: int = 10_000, providers: int = 4, seed: int = 5) -> list[str]:
    """Write the discovery cache; returns the model ids (per provider, in order)."""
    rng = random.Random(seed)
    per = n // providers
    data: dict[str, Any] = {"version": 1, "providers": {}}
    ids = []
    for p in range(providers):
        models = [model_object(rng, p * per + i) for i in range(per)]
        ids += [m["id"] for m in models]
        data["providers"][f"p{p}"] = {"fetched_at": time.time(), "models": models}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return ids


def router_config(upstream_url: str, cache: str | None, providers: int = 4, **over: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "providers": {f"p{p}": {"base_url": upstream_url} for p in range(providers)},
        "channels": [{"name": f"p{p}-all", "provider": f"p{p}", "models": ["*"], "tags": [f"key{p}"]} for p in range(providers)]
        + [{"name": "static", "provider": "p0", "models": ["test-model"], "cost_in": 0.1, "cost_out": 0.2}],
        "aliases": {"chat": "tag:free,qwen"},
        "strategy": "balanced",
        "health": {"interval_s": 0},
        "admin": {"token_env": "ROUTER_ADMIN_TOKEN"},
        "loop_lag_probe": True,
    }
    if cache:
        cfg["discovery_cache"] = cache
    cfg.update(over)
    return cfg


def write_yaml(path: Path, cfg: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


@contextmanager
def upstream_process(token_delay_s: float = 0.0, first_token_delay_s: float = 0.0, reply: str | None = None,
                     status: int = 200) -> Iterator[str]:
    """An OpenAI-compatible loopback upstream (tests/support/openai_server.py) in its own process."""
    code = (
        "import sys, time; sys.path[:0] = sys.argv[1:3]\n"
        "from tests.support.openai_server import OpenAITestServer, Behaviour\n"
        "b = Behaviour(token_delay_s=float(sys.argv[3]), first_token_delay_s=float(sys.argv[4]), status=int(sys.argv[6]))\n"
        "b.reply = sys.argv[5] or b.reply\n"
        "s = OpenAITestServer(behaviour=b).start(); print(s.base_url, flush=True)\n"
        "sys.stdin.read()\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(ROOT / "src"), str(ROOT), str(token_delay_s),
                             str(first_token_delay_s), reply or "", str(status)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        yield proc.stdout.readline().strip()
    finally:
        proc.kill()
        proc.wait()


def start_router(config: Path, port: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "avatarchat", "--config", str(config), "router", "--port", str(port),
                             "--log-level", "warning"], env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"router exited: {proc.stderr.read().decode() if proc.stderr else ''}")
        try:
            if httpx.get(url + "/ready", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.02)
    raise TimeoutError("router not ready")


def admin_stats(url: str) -> dict[str, Any]:
    return httpx.get(url + "/admin/stats", headers={"authorization": f"Bearer {ADMIN}"}, timeout=5).json()
