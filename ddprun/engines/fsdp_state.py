"""Loading saved states into sharded components: from a sharded folder through DCP (resharded to
the current world size), or from a file checkpoint's full states, which each rank shards.

Called by `FullyShardedDataParallelEngine.unpack_checkpoint` for the model, the criterion and
the optimizer(s); components may be dicts (key by key, as file checkpoints are).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from ddprun import checkpoint_folders as folders
from ddprun.checkpoint import CheckpointError
from ddprun.engines import fsdp_modules


def _per_key(saved: Any, component: Any, what: str) -> dict[Any, tuple[Any, Any]]:
    """``{key: (saved state, component)}``; one entry under None for a single component."""
    if not isinstance(component, Mapping):
        return {None: (saved, component)}
    if not isinstance(saved, Mapping) or set(component) - set(saved):
        have = sorted(saved) if isinstance(saved, Mapping) else "a single state dict"
        raise CheckpointError(f"{what} is a dict with keys {sorted(component)}, saved: {have}")
    return {key: (saved[key], value) for key, value in component.items()}


def _sharded_templates(entry: Any, component: Any, template: Any, group: Any) -> Any:
    """Read `entry` (a ShardedEntry) into templates made by ``template(part)`` for `component`
    (a dict: key by key) and return the filled templates."""
    if isinstance(component, Mapping):
        templates = {key: template(part) for key, part in component.items()}
    else:
        templates = template(component)
    box = {entry.key: templates}
    folders.load_shards(box, entry.folder, group)
    return box[entry.key]


def load_module(saved: Any, component: Any, owner: nn.Module, group: Any, key: str) -> None:
    """Load a module state (or a dict of them) into `component`."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        set_model_state_dict,
    )

    def template(module: Any) -> Any:
        plain = getattr(module, "_orig_mod", module)
        if fsdp_modules.is_sharded(plain):
            return get_model_state_dict(plain)
        return plain.state_dict() if isinstance(plain, nn.Module) else None

    full = not _is_sharded_entry(saved)
    if not full:
        saved = _sharded_templates(saved, component, template, group)
    for state, module in _per_key(saved, component, key).values():
        plain = getattr(module, "_orig_mod", module)
        if not isinstance(plain, nn.Module) or state is None:
            continue
        if fsdp_modules.is_sharded(plain):
            options = StateDictOptions(full_state_dict=full)
            set_model_state_dict(plain, state, options=options)
        else:
            plain.load_state_dict(state)


def load_optimizer(saved: Any, optimizer: Any, owner: nn.Module, group: Any, key: str) -> None:
    """Load optimizer state(s): a folder's (keyed by parameter name in `owner`), or a file's
    (torch's numbered layout, renamed by the optimizer's parameters in `owner`)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    full = not _is_sharded_entry(saved)
    if not full:
        saved = _sharded_templates(
            saved, optimizer, lambda opt: get_optimizer_state_dict(owner, opt), group
        )
    names = {id(p): name for name, p in owner.named_parameters()}
    for state, opt in _per_key(saved, optimizer, key).values():
        if full:
            order = [names[id(p)] for g in opt.param_groups for p in g["params"]]
            state = folders.optimizer_to_names(state, order)
        options = StateDictOptions(full_state_dict=full)
        set_optimizer_state_dict(owner, opt, state, options=options)


def _is_sharded_entry(saved: Any) -> bool:
    return isinstance(saved, folders.ShardedEntry)
