"""Property-based fuzzing of the HTTP API from its OpenAPI schema (Schemathesis), against the real app.

For every operation the app publishes, with schema-valid and schema-invalid requests sent over loopback HTTP:
no 5xx (the one exception: the task queue's 503 while Redis is down, a declared dependency failure), no hung
request (each has a timeout), a response conforms to the schema wherever the schema declares it, and a request
that breaks the schema is refused with a 4xx. Bounded and repeatable: a fixed seed, derandomized, a fixed
number of examples per operation (about 25 s in all on 2 cores).

The schema is the app's own (``create_app(...).openapi()``), needed when tests are collected: Schemathesis's
lazy loader (``schemathesis.pytest.from_fixture``) fails on pytest 9.2 (it sets ``node._nodeid``, gone).
``test_the_schema_is_the_live_apps`` checks it is the one the live app serves. The render API (role
``avatar``) is internal and not in any schema: tests/test_remote_render.py covers it.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import requests
import schemathesis
from schemathesis.checks import not_a_server_error
from schemathesis.config import SchemathesisConfig

from avatarchat.config import LLMExecConfig, OpenAIConfig, load_settings
from avatarchat.server.app import create_app
from avatarchat.services.llm_exec import LLMExecutor
from tests.support.live_app import LiveApp
from tests.support.openai_server import OpenAITestServer

pytestmark = pytest.mark.timeout(120)
REQUEST_TIMEOUT_S = 20.0  # a hang, not slowness: the slowest answer seen is well under 1 s
SCHEMA = create_app(load_settings(services={"role": "all"})).openapi()
CONFIG = SchemathesisConfig.from_dict({
    "seed": 14,
    "generation": {"max-examples": 150, "deterministic": True, "database": "none"},
    "checks": {
        # FastAPI declares 200 and 422 only; 400, 403, 404, 409 and 413 are answered by design.
        "status_code_conformance": {"enabled": False},
        # The schema types names as plain strings; the server checks their syntax (400).
        "positive_data_acceptance": {"enabled": False},
        # Starlette's 405 lists the methods of the first route on that path only.
        "allow_header_conformance": {"enabled": False},
    },
})
# /admin/reload re-reads this process's config and environment: it would reset the shared app under other tests
# (tests/test_llm_exec.py covers it). It takes no input to fuzz.
schema = schemathesis.openapi.from_dict(SCHEMA, config=CONFIG).exclude(path="/admin/reload")


def test_the_schema_is_the_live_apps(live_app: LiveApp) -> None:
    assert httpx.get(live_app.http + "/openapi.json").json() == SCHEMA
    ids = [op["operationId"] for path in SCHEMA["paths"].values() for op in path.values()]
    assert len(ids) == len(set(ids))  # the WebRTC proxy's five methods had one id


@pytest.mark.parametrize("field", [{"temperature": False}, {"temperature": "1"}, {"max_tokens": "9"}, {"max_tokens": True}])
def test_llm_chat_refuses_what_the_schema_refuses(live_app: LiveApp, field: dict[str, object]) -> None:
    """Found by the fuzzing: "temperature": false was taken as 0.0 (pydantic's lax mode), not refused."""
    body = {"messages": [{"role": "user", "content": "hi"}], **field}
    assert httpx.post(live_app.http + "/api/llm/chat", json=body).status_code == 422


@pytest.fixture(scope="module")
def http() -> Iterator[requests.Session]:
    with requests.Session() as s:
        yield s


@pytest.fixture(scope="module")
def fuzz_llm(live_app: LiveApp, openai_server: OpenAITestServer) -> Iterator[None]:
    """The LLM endpoints reach a loopback LLM server, so chat calls go all the way through; Redis is a refused
    port (bound, never listening), so the task queue is down, its 503 fast. The app's own executor and its
    mode are put back afterwards."""
    refused = socket.socket()
    refused.bind(("127.0.0.1", 0))
    state = live_app.app.state
    own = state.llm_exec
    fuzz = LLMExecutor(OpenAIConfig(base_url=openai_server.base_url),
                       LLMExecConfig(redis_url=f"redis://127.0.0.1:{refused.getsockname()[1]}/0", timeout_s=10))
    assert live_app.loop is not None
    fuzz.attach(live_app.loop)
    state.llm_exec = fuzz
    try:
        yield
    finally:
        state.llm_exec = own
        live_app.call(fuzz.aclose())
        refused.close()


@pytest.fixture(scope="module")
def avatars(live_app: LiveApp) -> Iterator[set[str]]:
    """The avatars there before the fuzzing: kept (deleting the default one is refused, and checked). Any
    avatar an upload made is deleted again, here as well as right after its case."""
    names = {a["name"] for a in httpx.get(live_app.http + "/api/avatar/list").json()["avatars"]}
    yield names
    for a in httpx.get(live_app.http + "/api/avatar/list").json()["avatars"]:
        if a["name"] not in names:
            httpx.post(live_app.http + "/api/avatar/delete", json={"name": a["name"]})


def _server_error(case: Any, r: requests.Response) -> str | None:
    if r.status_code < 500:
        return None
    if (r.status_code == 503 and case.operation.path.startswith("/api/llm/tasks")
            and r.json().get("detail", "").startswith("task queue unavailable")):
        return None
    if r.status_code == 503 and case.operation.path == "/ready" and r.json().get("ready") is False:
        return None  # a readiness probe's answer: a case switched the LLM calls to the task queue, whose Redis is down
    return f"{case.operation.label} answered {r.status_code}: {r.text[:500]}\n{case.as_curl_command()}"


@schema.parametrize()
def test_api(case: Any, live_app: LiveApp, http: requests.Session, fuzz_llm: None, avatars: set[str]) -> None:
    deleting = case.operation.path == "/api/avatar/delete" and isinstance(case.body, dict)
    name = case.body.get("name") if deleting else None
    name = name if isinstance(name, str) else None
    if name in avatars and name != live_app.settings.avatar.default:
        return  # another test's avatar
    try:
        r = case.call(base_url=live_app.http, session=http, timeout=REQUEST_TIMEOUT_S)
    except requests.Timeout:
        pytest.fail(f"{case.operation.label} did not answer within {REQUEST_TIMEOUT_S:g} s\n{case.as_curl_command()}")
    try:
        assert (error := _server_error(case, r)) is None, error
        if name == live_app.settings.avatar.default:
            assert r.status_code == 403, r.text
        case.validate_response(r, excluded_checks=[not_a_server_error])
    finally:
        if case.operation.path == "/api/avatar/add" and r.status_code == 201:
            http.post(live_app.http + "/api/avatar/delete", json={"name": r.json()["name"]}, timeout=REQUEST_TIMEOUT_S)
