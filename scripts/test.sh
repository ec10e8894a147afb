#!/usr/bin/env bash
# Set up everything and run the test suite (lint, then pytest): `bash scripts/test.sh [pytest options]`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=scripts/setup.sh
. "$ROOT/scripts/setup.sh"
cd "$ROOT"
export HF_HUB_OFFLINE=1
ruff check .
ruff format --check .
exec python -m pytest -q "$@"
