#!/usr/bin/env bash
# Set up the venv (with the test extra) and run the whole test suite, slow end-to-end runs included.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
EXTRAS="${EXTRAS:-test,demo}" . "$REPO/launcher/setup_env.sh"
cd "$REPO"
# Two workers (pytest-xdist), each taking whole files in collection order (a file's module fixtures run
# once; tests/conftest.py orders the files): much of the suite is interpreters starting up on one core or
# waiting for a peer's timeout, which the other worker's tests fill. The files with the most slow tests
# first ran 15% slower here: long multi-rank runs at once contend for the two cores.
exec python -m pytest -q -ra --durations=25 -n "${TEST_WORKERS:-2}" --dist loadfile --no-loadscope-reorder "$@" tests
