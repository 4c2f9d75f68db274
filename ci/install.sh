#!/usr/bin/env bash
# Install what ddprun needs on a fresh machine: torch first (the CPU wheel on disk), then the
# project with its dev extra. Installing torch first keeps pip from pulling a CUDA build.
set -euo pipefail
python -m pip install --quiet --upgrade pip
python -m pip install --quiet "torch==2.13.0"
python -m pip install --quiet -e ".[dev]"
python -c "import torch, ddprun; print('torch', torch.__version__, '| ddprun', ddprun.__version__)"
