#!/usr/bin/env bash
# Set up (tools/setup.sh), then run ruff and the whole test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
./tools/setup.sh
.venv/bin/ruff check kmsfs tests tools
.venv/bin/python -m pytest -q "$@"
