#!/usr/bin/env bash
# Install what ddprun needs on a fresh machine: torch first (the CPU wheel on disk), then the
# project with its dev extra and the optional extras the tests need. Installing torch first keeps
# pip from pulling a CUDA build.
set -euo pipefail
python -m pip install --quiet --upgrade pip
python -m pip install --quiet "torch==2.13.0"
# the optional extras whose tests run in CI (each tested with the real package)
python -m pip install --quiet -e ".[dev,torchmetrics,mlflow,wandb,optuna,onnx]"
python -c "import torch, ddprun; print('torch', torch.__version__, '| ddprun', ddprun.__version__)"
