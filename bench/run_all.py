"""Run every benchmark in turn; each prints its own figures and writes bench/results/<name>.json.

    .venv/bin/python bench/run_all.py
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCHES = ["bench_render_encode.py", "bench_pipeline.py", "bench_voice.py", "bench_web.py"]


def main() -> int:
    here = Path(__file__).parent
    failed = []
    for name in BENCHES:
        print(f"\n=== {name} ===", flush=True)
        if subprocess.call([sys.executable, str(here / name)], cwd=here.parent) != 0:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
