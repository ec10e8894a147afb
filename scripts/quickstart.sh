#!/usr/bin/env bash
# Set up everything and run the main job on the embedded model: `bash scripts/quickstart.sh [quickstart options]`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=scripts/setup.sh
. "$ROOT/scripts/setup.sh"
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
if [ "$#" -eq 0 ]; then
  set -- --output "$ROOT/quickstart_output" --overwrite
fi
exec hf-effllm quickstart "$@"
