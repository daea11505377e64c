"""Keep one command running: ``python -m avatarchat.supervise [options] -- COMMAND ARGS…``.

scripts/run.sh runs the Celery worker of queue mode under it (issue 14: a worker that exited left queue
mode dead until someone noticed). The command is started again whenever it exits, after a delay that
doubles from ``--min-delay`` up to ``--max-delay`` while it keeps dying young, and is back to the shortest
once it has run ``--stable`` seconds. SIGTERM, SIGINT or SIGHUP stop the supervisor: the child gets
SIGTERM (SIGKILL after ``--stop-timeout``) and the supervisor exits once it is gone. The child runs in its
own process group, so a Ctrl-C at the terminal reaches the supervisor only and the child is stopped once;
on Linux the child also gets SIGTERM if the supervisor itself is killed, so none is left behind.
"""

from __future__ import annotations

import argparse
import ctypes
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from types import FrameType

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:  # not glibc Linux: the supervisor's own stop path still ends the child
        pass


def _say(message: str) -> None:
    print(f"supervise: {message}", file=sys.stderr, flush=True)


def supervise(command: Sequence[str], *, min_delay: float = 1.0, max_delay: float = 30.0, stable: float = 60.0,
              stop_timeout: float = 30.0, stop: threading.Event | None = None) -> int:
    """Run ``command`` until ``stop`` is set (by a signal when this is the main thread); 0 once stopped."""
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        def on_signal(signum: int, _frame: FrameType | None) -> None:
            stop.set()

        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, on_signal)
    name = command[0].rsplit("/", 1)[-1]
    delay = min_delay
    while not stop.is_set():
        started = time.monotonic()
        try:
            # preexec_fn is safe here: this process runs no other thread.
            child = subprocess.Popen(command, process_group=0, preexec_fn=_die_with_parent)  # noqa: PLW1509
        except OSError as e:
            _say(f"cannot start {name}: {e}")
            return 1
        _say(f"started {name} (pid {child.pid})")
        while child.poll() is None and not stop.wait(0.2):
            pass
        if child.poll() is None:  # stopping
            child.terminate()
            try:
                child.wait(stop_timeout)
            except subprocess.TimeoutExpired:
                _say(f"{name} still runs {stop_timeout:g} s after SIGTERM: killing it")
                child.kill()
                child.wait()
            _say(f"stopped {name}")
            return 0
        ran = time.monotonic() - started
        delay = min_delay if ran >= stable else delay
        _say(f"{name} (pid {child.pid}) exited with code {child.returncode} after {ran:.1f} s; "
             f"starting it again in {delay:g} s")
        if stop.wait(delay):
            break
        delay = min(max_delay, delay * 2)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m avatarchat.supervise", description=__doc__.split("\n")[0])
    parser.add_argument("--min-delay", type=float, default=1.0, help="seconds before the first restart")
    parser.add_argument("--max-delay", type=float, default=30.0, help="longest wait between restarts")
    parser.add_argument("--stable", type=float, default=60.0, help="a run this long resets the delay")
    parser.add_argument("--stop-timeout", type=float, default=30.0, help="SIGKILL the child this long after SIGTERM")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND ARGS…")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command to supervise (put it after --)")
    return supervise(command, min_delay=args.min_delay, max_delay=args.max_delay, stable=args.stable,
                     stop_timeout=args.stop_timeout)


if __name__ == "__main__":
    sys.exit(main())
