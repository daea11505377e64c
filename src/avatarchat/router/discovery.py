"""The model-discovery cache (each provider's GET /models, with pricing) and its compact snapshot.

The cache is one JSON document and may be tens of MB. Start-up never parses it: it reads the snapshot
next to it (``<cache>.snap``, JSON lines of ``[provider, id, context, usd_per_1m_in, usd_per_1m_out]``,
~1/50 of the size), which records the cache's size and mtime so a stale snapshot is detected. A stale
or missing snapshot is rebuilt in a child process (``python -m avatarchat.router.discovery snapshot
CACHE``) so that parsing 50 MB never holds this process's GIL.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from avatarchat.router.index import Discovered

SNAPSHOT_VERSION = 1


def snapshot_path(cache: str | Path) -> Path:
    c = Path(cache)
    return c.with_name(c.name + ".snap")


def _stamp(cache: Path) -> dict[str, int]:
    st = cache.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _per_million(v: object) -> float | None:
    try:
        return None if v is None or v == "" else round(float(v) * 1e6, 6)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def _context(m: dict[str, Any]) -> int | None:
    v = m.get("context_length") or (m.get("top_provider") or {}).get("context_length")
    return int(v) if isinstance(v, (int, float)) else None


def models_from_cache(data: dict[str, Any]) -> list[Discovered]:
    out: list[Discovered] = []
    for provider, pdata in (data.get("providers") or {}).items():
        for m in (pdata or {}).get("models") or ():
            if not isinstance(m, dict) or not isinstance(m.get("id"), str):
                continue
            pricing = m.get("pricing") or {}
            out.append((provider, m["id"], _context(m), _per_million(pricing.get("prompt")), _per_million(pricing.get("completion"))))
    return out


def write_snapshot(cache: Path, models: Iterable[Discovered]) -> int:
    """Write atomically; the header ties it to the cache file as it is now."""
    snap = snapshot_path(cache)
    tmp = snap.with_name(snap.name + f".tmp{os.getpid()}")
    lines = [json.dumps(list(m), separators=(",", ":"), ensure_ascii=False) for m in models]
    header = {"v": SNAPSHOT_VERSION, **_stamp(cache), "count": len(lines), "written_at": time.time()}
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(json.dumps(header) + "\n")
        f.write("\n".join(lines))
        f.write("\n")
    os.replace(tmp, snap)
    return len(lines)


def read_snapshot(cache: str | Path) -> list[Discovered] | None:
    """The snapshot's models, or None when it is missing, of another version, or older than the cache."""
    cache = Path(cache)
    snap = snapshot_path(cache)
    try:
        raw = snap.read_bytes()
        stamp = _stamp(cache)
    except OSError:
        return None
    head, _, body = raw.partition(b"\n")
    try:
        header = json.loads(head)
    except ValueError:
        return None
    if header.get("v") != SNAPSHOT_VERSION or header.get("size") != stamp["size"] or header.get("mtime_ns") != stamp["mtime_ns"]:
        return None
    # Parsed as JSON arrays of 1,000 lines: ~3x faster than a parse per line, and each C call is short
    # enough (a few ms) that a reader thread never holds the GIL long enough to stall the event loop.
    lines = body.rstrip(b"\n").split(b"\n") if body.strip() else []
    out: list[Discovered] = []
    try:
        for i in range(0, len(lines), 1000):
            out += [tuple(r) for r in json.loads(b"[" + b",".join(lines[i : i + 1000]) + b"]")]  # type: ignore[misc]
    except ValueError:
        return None
    return out


def build_snapshot(cache: str | Path) -> int:
    cache = Path(cache)
    with open(cache, "rb") as f:
        data = json.load(f)
    return write_snapshot(cache, models_from_cache(data))


async def rebuild_snapshot(cache: str | Path) -> None:
    """Parse the big cache in a child process (its GIL, not ours)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "avatarchat.router.discovery", "snapshot", str(cache),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )
    _, err = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"snapshot of {cache} failed: {err.decode(errors='replace').strip()[-500:]}")


def write_cache(cache: Path, providers: dict[str, list[dict[str, Any]]]) -> int:
    """Write the cache (one model per line, so it is serialized piecewise and never holds the GIL long),
    then its snapshot. Blocking: run it in a thread."""
    tmp = cache.with_name(cache.name + f".tmp{os.getpid()}")
    cache.parent.mkdir(parents=True, exist_ok=True)
    with open(tmp, "w", encoding="utf-8") as f:
        f.write('{"version": 1, "written_at": %r, "providers": {' % time.time())
        for i, (name, models) in enumerate(providers.items()):
            f.write(("," if i else "") + f"\n{json.dumps(name)}: " + '{"fetched_at": %r, "models": [' % time.time())
            for j, m in enumerate(models):
                f.write(("," if j else "") + "\n" + json.dumps(m, ensure_ascii=False))
            f.write("]}")
        f.write("}}\n")
    os.replace(tmp, cache)
    return write_snapshot(cache, flatten(providers))


def flatten(providers: dict[str, list[dict[str, Any]]]) -> list[Discovered]:
    """Each provider's GET /models entries as the snapshot's compact rows."""
    return models_from_cache({"providers": {name: {"models": models} for name, models in providers.items()}})


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or args[0] != "snapshot":
        print("usage: python -m avatarchat.router.discovery snapshot CACHE.json", file=sys.stderr)
        return 2
    try:
        n = build_snapshot(args[1])
    except (OSError, ValueError) as e:
        print(f"cannot snapshot {args[1]}: {e}", file=sys.stderr)
        return 1
    print(f"{n} models", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
