from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.openai_server import Behaviour, OpenAITestServer


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
