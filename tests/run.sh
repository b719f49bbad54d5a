#!/usr/bin/env bash
# Set up the venv (with the test extra) and run the whole test suite, slow end-to-end runs included.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
EXTRAS="${EXTRAS:-test,demo}" . "$REPO/launcher/setup_env.sh"
cd "$REPO"
exec python -m pytest -q -ra --durations=25 "$@" tests
