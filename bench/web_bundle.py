"""Web app bundle (issue 4): every built JS/CSS file's size (raw and gzip -9), and what the chat view (/) loads in
Chromium on a first visit (fresh context: bytes on the wire and decoded, per kind, and load timings; median of RUNS
visits), served by the real server. With BASELINE=<git revision>, that revision's web app is built (vite build) and
served by that revision's server in the same run, and the ratios are printed.

    scripts/web_build.sh && BASELINE=main .venv/bin/python bench/web_bundle.py    # RUNS=5 visits each
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench._common import dump, machine, server, stats  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RUNS = int(os.environ.get("RUNS", "5"))


def assets(webapp: Path) -> list[dict[str, Any]]:
    rows = []
    for p in sorted((webapp / "assets").iterdir()):
        if p.suffix in (".js", ".css"):
            raw = p.read_bytes()
            rows.append({"file": p.name, "raw": len(raw), "gzip": len(gzip.compress(raw, 9))})
    return rows


def build_baseline(rev: str, tmp: Path) -> Path:
    """``rev``'s tree in tmp, its web app built there (with this tree's node_modules: same lock or close)."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", rev], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(tmp)], input=archive.stdout, check=True)
    (tmp / "web" / "node_modules").symlink_to(ROOT / "web" / "node_modules")
    subprocess.run(["npx", "vite", "build", "--logLevel", "warn"], cwd=tmp / "web", check=True)
    return tmp


def visit(tree: Path) -> list[dict[str, Any]]:
    """RUNS first visits of / in Chromium, the server being ``tree``'s (its code and its build)."""
    with tempfile.TemporaryDirectory() as avatars, server(
        {"PYTHONPATH": f"{tree / 'src'}:{tree}", "AVATARCHAT_AVATAR__DIR": avatars}
    ) as (base, _):
        out = subprocess.run(["node", str(ROOT / "bench" / "web_bundle.mjs")], capture_output=True, text=True,
                             timeout=600, env={**os.environ, "AVATARCHAT_URL": f"http://{base}", "RUNS": str(RUNS)})
    if out.returncode != 0:
        raise RuntimeError(out.stdout[-3000:] + out.stderr[-3000:])
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def report(name: str, tree: Path) -> dict[str, Any]:
    files = assets(tree / "src" / "avatarchat" / "server" / "webapp")
    print(f"\n{name}: built assets (raw / gzip -9, bytes)")
    for f in files:
        print(f"  {f['file']:<36} {f['raw']:>10,} {f['gzip']:>10,}")
    for ext in (".js", ".css"):
        sel = [f for f in files if f["file"].endswith(ext)]
        print(f"  {'all ' + ext:<36} {sum(f['raw'] for f in sel):>10,} {sum(f['gzip'] for f in sel):>10,}")
    runs = visit(tree)
    code = ("document", "script", "stylesheet")
    wire = [sum(r["kinds"].get(k, {}).get("wire", 0) for k in code) for r in runs]
    decoded = [sum(r["kinds"].get(k, {}).get("decoded", 0) for k in code) for r in runs]
    total = [sum(v["wire"] for v in r["kinds"].values()) for r in runs]
    first = runs[0]
    print(f"{name}: chat view (/) first visit in Chromium, n={len(runs)}")
    for f in first["files"]:
        print(f"  {f['path']:<44} wire {f['wire']:>9,}  decoded {f['decoded']:>9,}  {f['encoding'] or ''}")
    print(f"  HTML+JS+CSS: wire {stats(wire)['p50']:,.0f} B, decoded {stats(decoded)['p50']:,.0f} B; "
          f"everything (API, idle clip too): wire {stats(total)['p50']:,.0f} B")
    timing = {k: stats([r[k] for r in runs if r[k] is not None]) for k in ("fcp_ms", "load_ms", "session_ms")}
    for k, s in timing.items():
        print(f"  {k:<10} p50 {s['p50']:7.1f} ms  p95 {s['p95']:7.1f} ms")
    return {"assets": files, "code_wire": stats(wire), "code_decoded": stats(decoded), "all_wire": stats(total),
            "timing": timing, "runs": runs}


def main() -> int:
    print(f"machine: {machine()}; load average {os.getloadavg()}")
    results = {"current": report("this tree", ROOT)}
    if rev := os.environ.get("BASELINE"):
        with tempfile.TemporaryDirectory() as tmp:
            results["baseline"] = report(f"baseline {rev}", build_baseline(rev, Path(tmp)))
        cur, base = results["current"], results["baseline"]
        print("\nthis tree / baseline (chat view, first visit, p50)")
        for k in ("code_wire", "code_decoded", "all_wire"):
            print(f"  {k:<13} {cur[k]['p50']:>11,.0f} / {base[k]['p50']:>11,.0f} B  ratio {cur[k]['p50'] / base[k]['p50']:.3f}")
        for k in ("fcp_ms", "load_ms", "session_ms"):
            c, b = cur["timing"][k]["p50"], base["timing"][k]["p50"]
            print(f"  {k:<13} {c:>11.1f} / {b:>11.1f} ms ratio {c / b:.3f}")
    print(f"load average after: {os.getloadavg()}")
    dump("web_bundle", results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
