from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from avatarchat.config import load_settings
from tests.support.live_app import LiveApp
from tests.support.openai_server import Behaviour, OpenAITestServer

# The session memory ceiling reads the process's RSS, and this process hosts every test's app (the zh
# profile's models, the Wav2Lip engine, the fuzzers' apps...): past 6 GB, later apps refused every session.
os.environ.setdefault("AVATARCHAT_SESSION__MEMORY_CEILING_MB", str(1 << 17))


@pytest.fixture(scope="session")
def openai_server() -> Iterator[OpenAITestServer]:
    server = OpenAITestServer().start()
    yield server
    server.stop()


@pytest.fixture
def upstream(openai_server: OpenAITestServer) -> Iterator[OpenAITestServer]:
    """The shared test upstream, reset to its default behaviour for each test."""
    openai_server.behaviour = Behaviour()
    openai_server.requests.clear()
    yield openai_server
    openai_server.behaviour = Behaviour()


@pytest.fixture(scope="session")
def live_app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveApp]:
    """The real app with the embedded models, shared by the end-to-end tests. Its admission is fixed: what it
    admits must not depend on how busy the machine running the tests is (measured admission has its own tests)."""
    avatars = tmp_path_factory.mktemp("avatars")
    settings = load_settings(session={"max_sessions": 4, "admission": "fixed"}, llm={"max_tokens": 60},
                             avatar={"dir": str(avatars)})
    app = LiveApp(settings).start()
    yield app
    app.stop()
