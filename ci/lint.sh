#!/usr/bin/env bash
# ruff lint and format check over the whole repository (pyproject.toml holds the excludes).
set -euo pipefail
ruff check .
ruff format --check .
