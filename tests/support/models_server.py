"""A loopback server whose GET /v1/models is a big list, counting the bytes each response got onto the wire.

Plain ``http.server`` (one thread per request, blocking ``sendall``) with a small send buffer, so the count
is what the client's socket took, within about a buffer or two: a client that stops reading after the
headers leaves the rest unsent, and the handler ends when the connection is reset.
"""

from __future__ import annotations

import json
import queue
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

CHUNK = 64 * 1024


class BigModelsServer:
    def __init__(self, models: int = 64_000) -> None:
        data = [{"id": f"vendor{i % 40}/model-{i}-7b", "object": "model", "description": "x" * 200} for i in range(models)]
        self.body = json.dumps({"object": "list", "data": data}).encode()
        self.sent: queue.Queue[int] = queue.Queue()  # body bytes sent, one entry per finished response
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def setup(self) -> None:
                self.request.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, CHUNK)  # no autotuned MBs of buffer
                super().setup()

            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                if self.path != "/v1/models":
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(outer.body)))
                self.end_headers()
                n = 0
                try:
                    for i in range(0, len(outer.body), CHUNK):
                        self.wfile.write(outer.body[i : i + CHUNK])
                        n += len(outer.body[i : i + CHUNK])
                except OSError:
                    pass  # the client closed the connection
                finally:
                    outer.sent.put(n)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    def start(self) -> BigModelsServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def next_sent(self, timeout: float = 20) -> int:
        """Body bytes of the next response to finish (waits for it, bounded)."""
        return self.sent.get(timeout=timeout)
