#!/usr/bin/env bash
# Set up the venv (with the test extra) and run the whole test suite, slow end-to-end runs included.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
EXTRAS="${EXTRAS:-test,demo}" . "$REPO/launcher/setup_env.sh"
cd "$REPO"
# Two workers (pytest-xdist), each taking whole files (module fixtures run once; conftest.py puts the
# files that start processes first): half of the suite's time is interpreters starting up on one core.
exec python -m pytest -q -ra --durations=25 -n "${TEST_WORKERS:-2}" --dist loadfile "$@" tests
