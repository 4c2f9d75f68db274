"""ddprun: a key-value PyTorch training framework and multi-process launcher.

`from ddprun import dl, metrics, utils` is the public entry point. The submodules are loaded
on first attribute access, so `import ddprun` (and the `ddprun` launcher) stay cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {"dl", "metrics", "utils", "data", "contrib", "engines", "callbacks", "loggers", "core"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module = importlib.import_module(f"ddprun.{name}")
        globals()[name] = module
        return module
    raise AttributeError(f"module 'ddprun' has no attribute {name!r}")


__all__ = ["__version__", "dl", "metrics", "utils"]
