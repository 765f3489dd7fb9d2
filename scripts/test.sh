#!/usr/bin/env bash
# Installs everything into .venv, then runs ruff and the test suite (~16 minutes on 2 cores). Extra arguments go to
# pytest.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/install.sh test
ruff check .
rc=0
# The suite on every core (pytest-xdist, at most 4 workers), release checks (-m slow) deselected; arguments given
# later win: `bash scripts/test.sh -m slow` runs only those, `-m ""` everything, `-n 0` in one process.
python -m pytest -n auto --maxprocesses 4 -m "not slow" "$@" || rc=$?
if [ "$rc" -eq 5 ]; then
    echo "pytest collected no tests (exit 5) for this selection" >&2
    rc=0
fi
exit "$rc"
