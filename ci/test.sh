#!/usr/bin/env bash
# The README's test command.
set -euo pipefail
python -m pytest -q
# the long matrix and stress tests (marked slow), run all the same
python -m pytest -q -m slow
