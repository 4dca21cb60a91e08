#!/usr/bin/env bash
# Install everything from scratch (see setup.sh) and run the whole CPU test suite, slow tier included.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --dev
bash scripts/system_packages.sh  # PostgreSQL and chromium for the sweep and report tests
. .venv/bin/activate
ruff check leantune tests bench
python -m pytest -q -p no:cacheprovider --timeout 900 --durations 15 "$@"
