"""How uvicorn serves the app (``avatarchat serve`` and the tests' live app alike): bounds on what a client
sends before the app sees any of it.

- Request heads: ``server.max_header_bytes``. uvicorn serves with httptools when it is installed, and
  httptools has no bound at all (a 100 MB header was read, and kept, whole); ``HeadLimitedHttpTools``
  adds one. Without httptools uvicorn's h11 protocol applies the same number itself.
- WebSocket messages: ``server.max_frame_bytes`` (uvicorn's ``ws_max_size``), well above the app's own
  ``server.max_message_bytes``, so a message between the two gets the ``message_too_large`` error event
  and only an absurd one closes the connection (1009).
"""

from __future__ import annotations

import asyncio
from typing import Any

from avatarchat.config import ServerConfig

HEAD_TOO_LARGE = b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: text/plain; charset=utf-8\r\n"
LINGER_S = 1.0  # how long a refused client may go on sending (discarded) before its connection is closed

try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:  # no httptools: h11, bounded by h11_max_incomplete_event_size
    HTTP: type[asyncio.Protocol] | str = "h11"
else:

    class HeadLimitedHttpTools(HttpToolsProtocol):
        """uvicorn's httptools protocol with each request's head (request line and headers) bounded by the
        h11 setting, ``h11_max_incomplete_event_size``; past it: 431 and the connection is closed."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._limit: int = self.config.h11_max_incomplete_event_size or 16 * 1024  # h11's own default
            self._head: int | None = 0  # bytes received since the current request began; None past its head
            self._refused = False

        def data_received(self, data: bytes) -> None:
            if self._refused:
                return  # discarded: see _refuse
            if self._head is not None:
                self._head += len(data)
            super().data_received(data)
            # After parsing: the read that completes a head may also carry much of a body.
            if self._head is not None and self._head > self._limit and not self.transport.is_closing():
                self._refuse()

        def on_headers_complete(self) -> None:
            self._head = None
            super().on_headers_complete()

        def on_message_complete(self) -> None:
            super().on_message_complete()
            self._head = 0  # the next request on this connection

        def _refuse(self) -> None:
            """Answer 431, then close after a moment, discarding what still comes: closed at once with unread
            data, the socket would send a reset, and the client would likely lose the answer to it."""
            self._refused = True
            body = f"the request head is over the {self._limit}-byte limit".encode()
            self.transport.write(HEAD_TOO_LARGE + b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(body), body))
            if self.transport.can_write_eof():
                self.transport.write_eof()
            self.loop.call_later(LINGER_S, self.transport.close)

    HTTP = HeadLimitedHttpTools


def uvicorn_options(server: ServerConfig) -> dict[str, Any]:
    """uvicorn.Config / uvicorn.run keyword arguments that bound client input."""
    return {"http": HTTP, "h11_max_incomplete_event_size": server.max_header_bytes, "ws_max_size": server.max_frame_bytes}
