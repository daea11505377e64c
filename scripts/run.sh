#!/usr/bin/env bash
# `make run`: start the app; in queue mode (services.llm.mode: queue) first make sure Redis answers
# (starting Debian's redis-server on the configured loopback port if not) and start a Celery worker,
# started again whenever it exits (python -m avatarchat.supervise). Both are stopped when the app exits
# or on Ctrl-C. Arguments go to `avatarchat serve`.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
# shown_url: the URL as printed, its password as *** (avatarchat/redact.py).
read -r mode redis_url shown_url concurrency < <("$VENV/bin/python" -c '
from avatarchat.config import load_settings
from avatarchat.redact import redact_url
s = load_settings().services.llm
print(s.mode, s.redis_url, redact_url(s.redis_url), s.worker_concurrency)')

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT INT TERM

if [ "$mode" = "queue" ]; then
  hostport=${redis_url#redis://}; hostport=${hostport%%/*}; hostport=${hostport##*@}
  host=${hostport%%:*}; port=${hostport##*:}; [ "$port" = "$hostport" ] && port=6379
  if ! redis-cli -h "$host" -p "$port" ping >/dev/null 2>&1; then
    case "$host" in
      127.0.0.1|localhost) ;;
      *) echo "Redis at $shown_url does not answer, and it is not local: start it there" >&2; exit 1 ;;
    esac
    mkdir -p data/redis
    redis-server --bind 127.0.0.1 --port "$port" --dir data/redis --save "" --appendonly no >data/redis/redis.log 2>&1 &
    pids+=($!)
    for _ in $(seq 50); do redis-cli -h "$host" -p "$port" ping >/dev/null 2>&1 && break; sleep 0.1; done
    echo "==> started redis-server on $host:$port" >&2
  fi
  "$VENV/bin/python" -m avatarchat.supervise -- \
    "$VENV/bin/celery" -A avatarchat.services.llm_tasks worker -P threads -c "$concurrency" \
    --without-gossip --without-mingle --without-heartbeat -l info &
  pids+=($!)
  echo "==> started a Celery worker ($concurrency threads), restarted whenever it exits" >&2
fi

# Each engine is run for real in a child process first (issue 12): a runtime that crashes on this CPU
# is reported in plain words instead of killing the server at start-up. AVATARCHAT_SKIP_CHECKS=1 skips it.
if [ "${AVATARCHAT_SKIP_CHECKS:-0}" != "1" ]; then
  echo "==> checking that every engine runs on this machine (avatarchat doctor --engines)" >&2
  if ! "$VENV/bin/avatarchat" doctor --engines; then
    echo "==> not starting: an engine above does not work on this machine; its 'fix:' line says what to do" >&2
    exit 1
  fi
fi

"$VENV/bin/avatarchat" serve "$@"
