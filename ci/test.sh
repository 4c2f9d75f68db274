#!/usr/bin/env bash
# The README's test command.
set -euo pipefail
python -m pytest -q
