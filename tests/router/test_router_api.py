"""The HTTP surface: malformed requests, admin auth, reload (endpoint, under load, SIGHUP), the openai SDK."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from tests.router.conftest import ADMIN, base_config, write
from tests.support.openai_server import OpenAITestServer

ROOT = Path(__file__).parents[2]


@pytest.mark.parametrize("content, status, code", [
    (b"{not json", 400, "invalid_json"),
    (b"", 400, "invalid_json"),
    (b"[1, 2]", 400, "invalid_json"),
    (b'{"messages": [{"role": "user", "content": "x"}]}', 400, "missing_model"),
    (b'{"model": 5, "messages": [{"role": "user", "content": "x"}]}', 400, "invalid_model"),
    (b'{"model": "gpt-4o"}', 400, "invalid_messages"),
    (b'{"model": "gpt-4o", "messages": []}', 400, "invalid_messages"),
    (b'{"model": "gpt-4o", "messages": ["hi"]}', 400, "invalid_messages"),
    (b'{"model": "gpt-4o", "messages": [{"role": "user"}], "stream": "yes"}', 400, "invalid_stream"),
    (b'{"model": "tag:,", "messages": [{"role": "user"}]}', 400, "invalid_model"),
    (b'{"model": "no-such-model", "messages": [{"role": "user"}]}', 404, "model_not_found"),
    (b'{"model": "gpt-4o", "messages": [{"role": "user"}], "router_strategy": "random"}', 400, "invalid_strategy"),
])
async def test_malformed_requests_get_openai_errors(live_router, content: bytes, status: int, code: str) -> None:
    live = await live_router()
    r = await live.client.post("/v1/chat/completions", content=content, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == code and err["message"] and set(err) == {"message", "type", "param", "code"}


async def test_oversized_body_is_413(live_router, ups: list[OpenAITestServer]) -> None:
    live = await live_router(base_config(ups, limits={"max_body_bytes": 2048}))
    r = await live.chat("gpt-4o", padding="x" * 5000)
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"

    async def chunks():  # no content-length: the limit applies while reading
        for _ in range(10):
            yield b"x" * 1000

    r = await live.client.post("/v1/chat/completions", content=chunks())
    assert r.status_code == 413


async def test_upstream_400_is_passed_through_without_failover(live_router, ups: list[OpenAITestServer]) -> None:
    live = await live_router()
    ups[0].behaviour.status = 400
    r = await live.chat("shared-model", router_strategy="cost_first")
    assert r.status_code == 400 and r.json()["error"]["message"] == "test error 400"
    assert not ups[1].requests and not ups[2].requests


async def test_admin_needs_the_token(live_router, monkeypatch: pytest.MonkeyPatch) -> None:
    live = await live_router()
    for path in ("/admin/channels", "/admin/stats", "/admin/explain?model=gpt-4o"):
        r = await live.client.get(path)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        assert r.headers["www-authenticate"] == "Bearer"
        r = await live.client.get(path, headers={"authorization": "Bearer wrong"})
        assert r.status_code == 401
        r = await live.client.get(path, headers=live.admin)
        assert r.status_code == 200
    r = await live.client.post("/admin/reload", headers={"authorization": "Basic " + ADMIN})
    assert r.status_code == 401
    monkeypatch.delenv("ROUTER_TEST_ADMIN")
    r = await live.client.get("/admin/channels", headers=live.admin)
    assert r.status_code == 503 and "ROUTER_TEST_ADMIN" in r.json()["error"]["message"]


async def test_reload_applies_good_and_rejects_bad_config(live_router, ups: list[OpenAITestServer]) -> None:
    live = await live_router()
    cfg = base_config(ups)
    cfg["channels"].append({"name": "d", "provider": "a", "models": ["new-model"]})
    write(live.path, cfg)
    r = await live.client.post("/admin/reload", headers=live.admin)
    assert r.status_code == 200 and r.json()["generation"] == 2
    assert (await live.chat("new-model")).status_code == 200
    cfg["channels"].append({"name": "e", "provider": "zzz", "models": ["m"]})
    write(live.path, cfg)
    r = await live.client.post("/admin/reload", headers=live.admin)
    assert r.status_code == 400
    msg = r.json()["error"]["message"]
    assert "running config stays in force" in msg and "channels.4.provider: unknown provider 'zzz'" in msg
    assert live.router.state.generation == 2 and (await live.chat("new-model")).status_code == 200
    live.path.write_text("providers: {")
    r = await live.client.post("/admin/reload", headers=live.admin)
    assert r.status_code == 400 and "not valid YAML" in r.json()["error"]["message"]


async def test_reload_under_load_loses_no_request(live_router, ups: list[OpenAITestServer]) -> None:
    live = await live_router()
    ups[0].behaviour.token_delay_s = 0.01
    stop = False
    results: list[int] = []

    async def client() -> None:
        while not stop:
            r = await live.chat("shared-model", stream=bool(len(results) % 2))
            results.append(r.status_code)
            assert r.status_code == 200, r.text

    workers = [asyncio.create_task(client()) for _ in range(8)]
    cfg = base_config(ups)
    for i in range(5):
        await asyncio.sleep(0.08)
        cfg["channels"][0]["priority"] = i % 2  # flip which channel is preferred
        write(live.path, cfg)
        r = await live.client.post("/admin/reload", headers=live.admin)
        assert r.status_code == 200
    stop = True
    await asyncio.gather(*workers)
    assert len(results) > 20 and set(results) == {200}
    assert live.router.state.generation == 6


async def test_openai_sdk_works_unchanged(live_router, ups: list[OpenAITestServer]) -> None:
    live = await live_router()
    client = openai.AsyncOpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0)
    try:
        done = await client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
        assert done.choices[0].message.content == "answer from b ."
        stream = await client.chat.completions.create(model="tag:cheap", messages=[{"role": "user", "content": "hi"}], stream=True)
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        assert text == "answer from c ."
        models = await client.models.list()
        assert "gpt-4o" in [m.id for m in models.data]
        with pytest.raises(openai.NotFoundError, match="no channel serves"):
            await client.chat.completions.create(model="missing", messages=[{"role": "user", "content": "hi"}])
        with pytest.raises(openai.BadRequestError):
            await client.chat.completions.create(model="gpt-4o", messages=[])
        ups[2].behaviour.drop_after_tokens = 1  # after the first token: the SDK sees the error frame
        stream = await client.chat.completions.create(model="tag:cheap", messages=[{"role": "user", "content": "hi"}], stream=True)
        with pytest.raises(openai.APIError, match="stream_interrupted|ended|failed"):
            async for _ in stream:
                pass
    finally:
        await client.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ready(url: str, proc: subprocess.Popen, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
        try:
            if httpx.get(url + "/ready", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.05)
    raise AssertionError("router did not start")


def test_cli_subprocess_serves_and_reloads_on_sighup(tmp_path: Path, ups: list[OpenAITestServer]) -> None:
    cfg = base_config(ups)
    path = write(tmp_path / "r.yaml", cfg)
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}:{ROOT}", "ROUTER_TEST_ADMIN": ADMIN}
    proc = subprocess.Popen([sys.executable, "-m", "avatarchat", "--config", str(path), "router", "--port", str(port),
                             "--log-level", "warning"], env=env, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(url, proc)
        body = {"model": "sighup-model", "messages": [{"role": "user", "content": "x"}]}
        assert httpx.post(url + "/v1/chat/completions", json=body).status_code == 404
        cfg["channels"].append({"name": "d", "provider": "c", "models": ["sighup-model"]})
        write(path, cfg)
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while httpx.post(url + "/v1/chat/completions", json=body).status_code != 200:
            assert time.monotonic() < deadline, "SIGHUP did not reload"
            time.sleep(0.05)
        path.write_text("channels: 3\n")  # a bad file on SIGHUP: logged, the running config stays
        proc.send_signal(signal.SIGHUP)
        time.sleep(0.3)
        assert proc.poll() is None
        assert httpx.post(url + "/v1/chat/completions", json=body).status_code == 200
        stats = httpx.get(url + "/admin/stats", headers={"authorization": f"Bearer {ADMIN}"}).json()
        assert stats["reloads"] == 1 and stats["generation"] == 2
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=10)
    assert b"router config rejected" in err


def test_cli_rejects_bad_config(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    from avatarchat.cli import main

    monkeypatch.delenv("AVATARCHAT_CONFIG", raising=False)
    (tmp_path / "bad.yaml").write_text("providers: {}\nchannels: []\n")
    assert main(["--config", str(tmp_path / "bad.yaml"), "router"]) == 2
    assert "channels: must have at least 1 item" in capsys.readouterr().err
    assert main(["router"]) == 2
    err = capsys.readouterr().err
    assert "--config FILE" in err and "$AVATARCHAT_CONFIG" in err


@pytest.mark.parametrize("argv, env, used", [
    (["router", "--config", "{d}/sub.yaml"], None, "sub.yaml"),
    (["--config", "{d}/top.yaml", "router"], None, "top.yaml"),
    (["router"], "{d}/env.yaml", "env.yaml"),
    # The most specific wins: the router's own flag, then the global one, then the environment.
    (["--config", "{d}/top.yaml", "router", "--config", "{d}/sub.yaml"], "{d}/env.yaml", "sub.yaml"),
    (["--config", "{d}/top.yaml", "router"], "{d}/env.yaml", "top.yaml"),
])
def test_cli_router_config_each_spelling_loads_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                        monkeypatch: pytest.MonkeyPatch, argv: list[str],
                                                        env: str | None, used: str) -> None:
    from avatarchat.cli import main

    for name in ("sub.yaml", "top.yaml", "env.yaml"):  # each invalid, so the error names the file that was read
        (tmp_path / name).write_text("providers: {}\nchannels: []\n")
    monkeypatch.delenv("AVATARCHAT_CONFIG", raising=False)
    if env:
        monkeypatch.setenv("AVATARCHAT_CONFIG", env.format(d=tmp_path))
    assert main([a.format(d=tmp_path) for a in argv]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / used}: channels: must have at least 1 item" in err, err
    assert ("$AVATARCHAT_CONFIG" in err) == (used == "env.yaml")  # a path from the environment says so


def test_cli_router_serves_with_config_after_the_subcommand(tmp_path: Path, ups: list[OpenAITestServer]) -> None:
    cfg = base_config(ups)
    cfg["channels"][0]["models"].append("only-in-this-file")
    path = write(tmp_path / "r.yaml", cfg)
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}:{ROOT}"}
    env.pop("AVATARCHAT_CONFIG", None)
    proc = subprocess.Popen([sys.executable, "-m", "avatarchat", "router", "--config", str(path), "--port", str(port),
                             "--log-level", "warning"], env=env, stderr=subprocess.PIPE)
    try:
        _wait_ready(f"http://127.0.0.1:{port}", proc)
        ids = [m["id"] for m in httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=10).json()["data"]]
        assert "only-in-this-file" in ids
    finally:
        proc.terminate()
        proc.communicate(timeout=10)


async def test_unknown_strategy_names_the_field_that_carried_it(live_router) -> None:
    live = await live_router()
    msgs = [{"role": "user", "content": "x"}]
    r = await live.client.post("/v1/chat/completions", json={"model": "gpt-4o", "messages": msgs, "router_strategy": "random"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "router_strategy"
    assert r.json()["error"]["code"] == "invalid_strategy" and "'random'" in r.json()["error"]["message"]
    r = await live.client.post("/v1/chat/completions", json={"model": "gpt-4o", "messages": msgs},
                               headers={"x-router-strategy": "random"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "x-router-strategy"
    r = await live.client.get("/admin/explain", params={"model": "gpt-4o", "strategy": "random"}, headers=live.admin)
    assert r.status_code == 400 and r.json()["error"]["param"] == "strategy"
    r = await live.client.post("/admin/explain", json={"model": "gpt-4o", "router_strategy": "random"}, headers=live.admin)
    assert r.status_code == 400 and r.json()["error"]["param"] == "router_strategy"
    r = await live.client.get("/admin/explain", params={"model": "tag:,"}, headers=live.admin)
    assert r.status_code == 400 and r.json()["error"]["param"] == "model"  # a bad model is still the model's fault
