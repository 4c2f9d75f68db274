"""Optional dependencies (mlflow, wandb, optuna, onnx): imported on first use, never by
``import ddprun``, with an error naming the extra that installs them."""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["import_optional"]


def import_optional(module: str, extra: str, feature: str) -> ModuleType:
    """Import `module`, or raise an ImportError saying how to install it.

    Args:
        module: the module to import, e.g. ``"mlflow"``.
        extra: the ddprun extra that installs it, e.g. ``"mlflow"`` for ``ddprun[mlflow]``.
        feature: what needs it, e.g. ``"MLflowLogger"``, for the message.

    Raises:
        ImportError: naming `feature`, the missing module and ``pip install "ddprun[<extra>]"``.
    """
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(
            f"{feature} needs the optional package {module!r}, which is not installed "
            f'({error}); install it with: pip install "ddprun[{extra}]"'
        ) from error
