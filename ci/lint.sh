#!/usr/bin/env bash
# ruff lint and format check over the package, tests, examples and benchmarks.
set -euo pipefail
ruff check ddprun tests examples benchmarks
ruff format --check ddprun tests examples benchmarks
