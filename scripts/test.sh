#!/usr/bin/env bash
# Installs everything into .venv, then runs ruff and the test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/install.sh test
ruff check .
rc=0
python -m pytest "$@" || rc=$?
if [ "$rc" -eq 5 ]; then
    echo "pytest collected no tests (exit 5) for this selection" >&2
    rc=0
fi
exit "$rc"
