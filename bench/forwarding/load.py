"""The load generator, in its own process: N concurrent users, one GET each, over raw asyncio streams
(so the client's own CPU stays small and out of the server's accounting). Prints one JSON line.

    python bench/forwarding/load.py URL N DEADLINE_S [EXPECT]
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from urllib.parse import urlsplit

EXPECT = sys.argv[4].encode() if len(sys.argv) > 4 else b"avatars"  # a byte string every good answer holds


async def one(host: str, port: int, path: str) -> float:
    start = time.perf_counter()
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n".encode())
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")), None)
    body = await (reader.readexactly(length) if length is not None else reader.read())
    writer.close()
    if status != 200 or EXPECT not in body:
        raise RuntimeError(f"HTTP {status}")
    return time.perf_counter() - start


async def main(url: str, n: int, deadline: float) -> dict[str, object]:
    u = urlsplit(url)
    start = time.perf_counter()
    tasks = [asyncio.create_task(one(u.hostname or "127.0.0.1", u.port or 80, u.path)) for _ in range(n)]
    done, pending = await asyncio.wait(tasks, timeout=deadline)
    wall = time.perf_counter() - start
    for t in pending:
        t.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    latencies = sorted(t.result() for t in done if t.exception() is None)
    errors = [repr(t.exception()) for t in done if t.exception() is not None]
    last = max(latencies) if latencies else wall
    return {"n": n, "ok": len(latencies), "errors": len(errors), "unfinished": len(pending),
            "first_error": errors[0] if errors else None, "latencies": latencies,
            "wall_s": last if not pending else wall}


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(sys.argv[1], int(sys.argv[2]), float(sys.argv[3])))))
