"""Issue 14: credentials in configured URLs are shown as *** (avatarchat/redact.py), in log lines too."""

from __future__ import annotations

import logging

from avatarchat.logs import JsonFormatter, RedactingFormatter
from avatarchat.redact import redact_url

PASSWORD = "PASSWORD"


def test_redact_url() -> None:
    assert redact_url("redis://:PASSWORD@127.0.0.1:6379/0") == "redis://:***@127.0.0.1:6379/0"
    assert redact_url("https://user:PASSWORD@llm.example/v1") == "https://user:***@llm.example/v1"
    assert redact_url("https://TOKEN@llm.example/v1") == "https://***@llm.example/v1"
    assert redact_url("redis://:p@ss@h:1/0") == "redis://:***@h:1/0"  # a raw "@" in the password
    assert redact_url("redis://h:1/0?password=PASSWORD&db=1") == "redis://h:1/0?password=***&db=1"
    assert redact_url("Redis at redis://:PASSWORD@h:1/0 failed") == "Redis at redis://:***@h:1/0 failed"
    for clean in ("http://127.0.0.1:8000/v1", "http://h/x?to=a@b.example", "no URL here", "a=b"):
        assert redact_url(clean) == clean


def test_log_lines_are_redacted_whoever_writes_them() -> None:
    record = logging.LogRecord("celery", logging.ERROR, __file__, 1, "Cannot connect to %s", ("redis://:PASSWORD@h/0",),
                               None)
    record.url = "http://u:PASSWORD@h/v1"  # an extra field, as a JSON line carries it
    for inner in (JsonFormatter(), logging.Formatter("%(message)s")):
        line = RedactingFormatter(inner).format(record)
        assert PASSWORD not in line and "redis://:***@h/0" in line, line
