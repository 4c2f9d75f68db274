"""``from ddprun.contrib import nn``: the contrib layers, losses and models in one namespace, as
Catalyst 21.12's ``catalyst.contrib.nn``.

That import shadows ``torch.nn`` in the user's script (Catalyst's README does it), so any other
name is looked up in ``torch.nn``: ``nn.Linear``, ``nn.Module`` and ``nn.functional`` keep
working.
"""

from typing import Any

import torch

from ddprun.contrib import layers as _layers
from ddprun.contrib import losses as _losses
from ddprun.contrib import models as _models

# exactly the public names of the three packages, as each one's __all__ lists them
from ddprun.contrib.layers import *  # noqa: F403
from ddprun.contrib.losses import *  # noqa: F403
from ddprun.contrib.models import *  # noqa: F403

__all__: list[str] = []
__all__ += _layers.__all__
__all__ += _losses.__all__
__all__ += _models.__all__


def __getattr__(name: str) -> Any:
    # everything else is torch.nn's (this module usually stands in for it)
    try:
        return getattr(torch.nn, name)
    except AttributeError:
        raise AttributeError(f"neither ddprun.contrib.nn nor torch.nn has {name!r}") from None
