"""Forwarding benchmark (issue 6, seed 000): a gateway in front of an upstream that takes 3 s a request.

    .venv/bin/python bench/forwarding/run.py [--users 10 100 1000] [--delay 3] [--deadline 45]

Variants, all measured in the same run against the same upstream process:
  (a) baseline: Flask + requests under Gunicorn sync workers (2 x cores + 1 = 5), seed 000's original;
  (b) Flask async views + httpx under Gunicorn gthread workers (2 workers x 100 threads), seed 000's fix;
  (c) ours: `avatarchat serve --role gateway`, forwarding /api/avatar/list over one pooled httpx client.
Each (variant, N) gets a fresh server; the load generator (load.py) is a separate process. CPU seconds
and peak RSS are of the server's whole process tree (Gunicorn master + workers).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from _common import free_port  # noqa: E402


def tree(pid: int) -> list[psutil.Process]:
    p = psutil.Process(pid)
    return [p, *p.children(recursive=True)]


def cpu_seconds(pid: int) -> float:
    total = 0.0
    for p in tree(pid):
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def rss_mb(pid: int) -> float:
    total = 0
    for p in tree(pid):
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total / 2**20


def wait_up(url: str, proc: subprocess.Popen[bytes], timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited ({proc.returncode})")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(url)


def start(variant: str, port: int, upstream: str) -> tuple[subprocess.Popen[bytes], str]:
    env = {**os.environ, "UPSTREAM": upstream, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{HERE}"}
    py = sys.executable
    if variant == "a":
        cmd = [py, "-m", "gunicorn", "-w", "5", "--backlog", "2048", "-t", "120", "-b", f"127.0.0.1:{port}",
               "flask_requests:app"]
        ready = f"http://127.0.0.1:{port}/nope"
    elif variant == "b":
        cmd = [py, "-m", "gunicorn", "-w", "2", "-k", "gthread", "--threads", "100", "--backlog", "2048", "-t", "120",
               "-b", f"127.0.0.1:{port}", "flask_httpx:app"]
        ready = f"http://127.0.0.1:{port}/nope"
    else:
        env.update(
            AVATARCHAT_SERVICES__AVATAR__URL=upstream,
            AVATARCHAT_SERVICES__AVATAR__MAX_CONNECTIONS="1100",
            AVATARCHAT_SERVICES__AVATAR__MAX_KEEPALIVE_CONNECTIONS="1100",
            AVATARCHAT_SERVICES__AVATAR__CONNECT_TIMEOUT_S="10",  # a starved upstream accepts 1000 slowly
            AVATARCHAT_LLM__ENGINE="openai",
            AVATARCHAT_TTS__ENGINE="espeak",
            AVATARCHAT_SERVER__LOG_LEVEL="warning",
        )
        cmd = [py, "-m", "avatarchat", "serve", "--role", "gateway", "--port", str(port)]
        ready = f"http://127.0.0.1:{port}/ready"
    proc = subprocess.Popen(cmd, env=env, cwd=HERE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return proc, ready


def ready_check(url: str, proc: subprocess.Popen[bytes]) -> None:
    if url.endswith("/nope"):  # Flask: any answer (404) means it listens
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                httpx.get(url, timeout=2)
                return
            except httpx.HTTPError:
                time.sleep(0.2)
        raise TimeoutError(url)
    wait_up(url, proc)


def measure(variant: str, n: int, upstream: str, deadline: float, upstream_pid: int) -> dict[str, object]:
    if variant == "u":  # the floor: the load generator straight at the upstream, no forwarder
        return _run_load(variant, n, upstream, deadline, upstream_pid)
    port = free_port()
    proc, ready = start(variant, port, upstream)
    try:
        ready_check(ready, proc)
        time.sleep(2)  # let start-up work settle before counting CPU
        return _run_load(variant, n, f"http://127.0.0.1:{port}", deadline, proc.pid)
    finally:
        for p in reversed(tree(proc.pid)) if proc.poll() is None else []:
            try:
                p.terminate()
            except psutil.NoSuchProcess:
                pass
        proc.wait(30)


def _run_load(variant: str, n: int, base: str, deadline: float, pid: int) -> dict[str, object]:
    cpu0 = cpu_seconds(pid)
    peak = rss_mb(pid)
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.wait(0.2):
            peak = max(peak, rss_mb(pid))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out = subprocess.run(
        [sys.executable, str(HERE / "load.py"), f"{base}/api/avatar/list", str(n), str(deadline)],
        capture_output=True, text=True, check=True,
    )
    stop.set()
    sampler.join()
    cpu = cpu_seconds(pid) - cpu0
    res = json.loads(out.stdout)
    lat = res.pop("latencies")
    ok = res["ok"]
    res.update(
        variant=variant,
        rpm=60 * ok / res["wall_s"] if res["wall_s"] else 0.0,
        p50_s=statistics.median(lat) if lat else None,
        p95_s=lat[min(len(lat) - 1, int(0.95 * len(lat)))] if lat else None,
        cpu_s=cpu,
        cpu_ms_per_request=1000 * cpu / ok if ok else None,
        peak_rss_mb=peak,
    )
    return res


NAMES = {"u": "(floor) no forwarder: straight to the upstream", "a": "(a) Flask + requests, Gunicorn sync ×5 (baseline)", "b": "(b) Flask async + httpx, gthread 2×100",
         "c": "(c) ours: gateway, pooled httpx"}


def runs_note(r: dict[str, object]) -> str:
    walls = r.get("runs_wall_s") or []
    return f" ({', '.join(str(w) for w in walls)})" if len(walls) > 1 else ""  # type: ignore[arg-type]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--users", type=int, nargs="+", default=[10, 100, 1000])
    ap.add_argument("--delay", type=float, default=3.0)
    ap.add_argument("--deadline", type=float, default=45.0, help="a run stops waiting after this long")
    ap.add_argument("--variants", default="abc", help="a, b, c; u = the load generator straight at the upstream")
    ap.add_argument("--repeat", type=int, default=1, help="runs of each (variant, N); the table shows their median")
    args = ap.parse_args()

    uport = free_port()
    upstream_proc = subprocess.Popen([sys.executable, str(HERE / "upstream.py"), str(uport), str(args.delay)])
    upstream = f"http://127.0.0.1:{uport}"
    results = []
    try:
        wait_up(upstream + "/health", upstream_proc)
        for n in args.users:
            for v in args.variants:
                runs = []
                for _ in range(args.repeat):
                    runs.append(measure(v, n, upstream, args.deadline, upstream_proc.pid))
                    print(json.dumps(runs[-1]), file=sys.stderr, flush=True)
                runs.sort(key=lambda r: r["wall_s"])
                median = dict(runs[len(runs) // 2])
                median["runs_wall_s"] = [round(r["wall_s"], 2) for r in runs]
                results.append(median)
    finally:
        upstream_proc.terminate()
        upstream_proc.wait(10)

    print(f"upstream delay {args.delay:g} s, deadline {args.deadline:g} s per run, load average "
          f"{os.getloadavg()[0]:.2f} at the end\n")
    print("| N | variant | done | wall s (runs) | req/min | × baseline | p50 s | p95 s | CPU s | CPU ms/req | peak RSS MB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for n in args.users:
        base = next((r for r in results if r["n"] == n and r["variant"] == "a"), None)
        for r in (r for r in results if r["n"] == n):
            ratio = f"{r['rpm'] / base['rpm']:.1f}×" if base and base["rpm"] else "–"
            f = lambda x, d=2: "–" if x is None else f"{x:.{d}f}"  # noqa: E731
            print(f"| {n} | {NAMES[r['variant']]} | {r['ok']}/{n} | {f(r['wall_s'], 1)}{runs_note(r)} | {r['rpm']:.0f} | {ratio} | "
                  f"{f(r['p50_s'])} | {f(r['p95_s'])} | {f(r['cpu_s'])} | {f(r['cpu_ms_per_request'])} | "
                  f"{r['peak_rss_mb']:.0f} |")
    out = ROOT / "bench" / "results"
    out.mkdir(exist_ok=True)
    (out / "forwarding.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
