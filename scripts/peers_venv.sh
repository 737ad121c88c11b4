#!/usr/bin/env bash
# Creates a separate virtualenv for the "peer" servers the benchmark compares coe against:
#   - LiteLLM proxy            (litellm[proxy], pinned below)
#   - llama-cpp-python server  (python -m llama_cpp.server: the [server] extra of llama-cpp-python)
# It never touches the project's own venv (.venv). llama-cpp-python is NOT recompiled: the wheel that
# scripts/_setup.sh built and cached in ~/.cache/coe/wheels/llama-<key>/ is reused (same key logic); only when
# no cached wheel exists is it built, exactly as _setup.sh does (portable AVX2 build on x86_64, ~6 min).
# Idempotent: a stamp file (hash of this script + the wheel key) makes a second run instant.
# Works as root with no stdin. Prints the venv path on stdout at the end (all other output goes to stderr).
#
# Usage:   scripts/peers_venv.sh                  # -> $ROOT/.venv-peers
#          COE_PEERS_VENV=/some/dir scripts/peers_venv.sh
# Env:     COE_PEERS_VENV (venv path), PYTHON (interpreter, default python3.11),
#          COE_WHEEL_CACHE / COE_LLAMA_CMAKE_ARGS (as in _setup.sh).
# The resolved versions of everything are written to $VENV/peers-freeze.txt.
# Servers (loopback only):
#   $VENV/bin/python -m llama_cpp.server --model <gguf> --model_alias smollm2 --n_threads 1 --n_threads_batch 1 \
#       --n_ctx 2048 --verbose False --host 127.0.0.1 --port <p1>
#   LITELLM_MASTER_KEY=sk-<anything> LITELLM_LOCAL_MODEL_COST_MAP=True LITELLM_TELEMETRY_DISABLED=true LITELLM_LOG=ERROR \
#       $VENV/bin/litellm --config cfg.yaml --host 127.0.0.1 --port <p2> --num_workers 1
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${COE_PEERS_VENV:-$ROOT/.venv-peers}"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null 2>&1 || PY=python3

# Pinned to the newest release whose [proxy] extra is installable from PyPI (checked 2026-12-05): from 1.108.8 on
# the extra pins litellm-enterprise==0.1.79.post2 / litellm-proxy-extras==0.4.113 / litellm-proxy==<same>, none of
# which is published, so `pip install litellm[proxy]` (unpinned) fails with "No matching distribution".
LITELLM="litellm[proxy]==1.108.7"

# --- llama-cpp-python wheel: same version, flags and cache key as scripts/_setup.sh -----------------------
LLAMA="llama-cpp-python==0.3.36"
if [ "$(uname -m)" = "x86_64" ]; then
  LLAMA_CMAKE="${COE_LLAMA_CMAKE_ARGS:--DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON}"
else
  LLAMA_CMAKE="${COE_LLAMA_CMAKE_ARGS:-}"
fi
LLAMA_KEY="$(printf '%s|%s|%s' "$LLAMA" "$LLAMA_CMAKE" "$(uname -m)" | sha256sum | cut -c1-12)"
WHEELS="${COE_WHEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/coe/wheels}/llama-$LLAMA_KEY"

STAMP="$VENV/.coe-peers-installed"
WANT="$( (cat "${BASH_SOURCE[0]}"; echo "$LLAMA_KEY") | sha256sum | cut -c1-16)"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ] && [ -x "$VENV/bin/litellm" ]; then
  echo "$VENV"
  exit 0
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "[peers] creating virtualenv $VENV" >&2
  "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-input --upgrade pip >&2
fi
PIP=("$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-input)

if ! ls "$WHEELS"/llama_cpp_python-*.whl >/dev/null 2>&1; then
  echo "[peers] building $LLAMA (${LLAMA_CMAKE:-default flags}; ~6 min, once per machine)" >&2
  rm -rf "$WHEELS.tmp" && mkdir -p "$WHEELS.tmp"
  CMAKE_ARGS="$LLAMA_CMAKE" "$VENV/bin/python" -m pip wheel -q --disable-pip-version-check --no-input \
    --no-deps --no-cache-dir "$LLAMA" -w "$WHEELS.tmp" >&2
  rm -rf "$WHEELS" && mv "$WHEELS.tmp" "$WHEELS"
fi
WHL="$(ls "$WHEELS"/llama_cpp_python-*.whl | head -n1)"

# One resolver run for both, so the [server] extra's requirements (uvicorn, fastapi, pydantic-settings,
# sse-starlette, starlette-context<0.4, PyYAML; read from the wheel's METADATA) and litellm[proxy]'s agree.
echo "[peers] installing $LITELLM + $(basename "$WHL")[server]" >&2
"${PIP[@]}" "$LITELLM" "$WHL[server]" >&2
# Make sure llama_cpp in the venv is exactly the cached wheel of this key (as _setup.sh does; once per key, so a
# re-run after editing this script does not swap the library under a running server).
if [ ! -f "$VENV/.coe-llama-$LLAMA_KEY" ]; then
  "${PIP[@]}" --force-reinstall --no-deps "$WHL" >&2
  rm -f "$VENV"/.coe-llama-* && touch "$VENV/.coe-llama-$LLAMA_KEY"
fi
"$VENV/bin/python" -m pip check >&2 || echo "[peers] WARNING: pip check reports conflicts (see above)" >&2
LITELLM_LOCAL_MODEL_COST_MAP=True "$VENV/bin/python" -c "import llama_cpp.server.app, litellm.proxy.proxy_server" >&2

"$VENV/bin/python" -m pip freeze --all --disable-pip-version-check > "$VENV/peers-freeze.txt"

echo "$WANT" > "$STAMP"
echo "$VENV"
