"""What the FSDP engine does to modules: shard them (FSDP2's ``fully_shard``) by a policy, point
optimizers made before sharding at the sharded parameters, reduce an open accumulation window,
and turn sharded modules back into plain ones holding the full weights.

Sharding replaces every parameter by a new ``nn.Parameter`` holding a DTensor (torch asks for
the optimizer to be built after ``fully_shard``). ddprun's runners build the optimizer first, as
Catalyst does, so `ParameterMap` remembers which new parameter replaced which old one and
`ParameterMap.rebind` swaps them inside an optimizer (its param groups and any state).

`to_plain` and `flush_accumulated_gradients` reach into FSDP2's state (``_get_fsdp_state``,
its param groups and hook handles): torch has no public call for either. Both are checked by
ddprun's tests against the installed torch; `to_plain` warns and leaves the module sharded if
that state is not laid out as expected.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

#: which submodules get their own FSDP unit: None (each child holding parameters), module
#: classes, or a function ``fn(module) -> bool``
WrapPolicy = None | type | tuple[type, ...] | Callable[[nn.Module], bool]


def _fsdp() -> Any:
    import torch.distributed.fsdp as fsdp

    if not hasattr(fsdp, "fully_shard"):
        raise RuntimeError(
            f"the FSDP engine needs torch.distributed.fsdp.fully_shard (torch >= 2.6); "
            f"this is torch {torch.__version__}"
        )
    return fsdp


def is_sharded(module: Any) -> bool:
    """Whether `module` went through ``fully_shard``."""
    return isinstance(module, _fsdp().FSDPModule)


def units(root: nn.Module, wrap: WrapPolicy) -> list[nn.Module]:
    """The submodules of `root` to shard as units of their own, innermost first (FSDP groups
    each parameter with the first unit that claims it); `root` is sharded last, by the caller.

    Default: each direct child that holds parameters. Classes: every submodule of those
    classes. A function: every submodule it accepts.
    """
    if wrap is None:
        chosen = [child for child in root.children() if _has_params(child)]
    elif isinstance(wrap, (type, tuple)):
        chosen = [m for m in root.modules() if m is not root and isinstance(m, wrap)]
    elif callable(wrap):
        chosen = [m for m in root.modules() if m is not root and wrap(m)]
    else:
        raise TypeError(f"wrap must be None, module class(es) or a function, got {wrap!r}")
    chosen_ids = {id(m) for m in chosen if _has_params(m)}
    # reversed pre-order puts every module after its descendants
    return [m for m in reversed(list(root.modules())) if id(m) in chosen_ids]


def _has_params(module: nn.Module) -> bool:
    return next(module.parameters(), None) is not None


def shard(root: nn.Module, wrap: WrapPolicy, root_kwargs: dict, unit_kwargs: dict) -> None:
    """``fully_shard`` each unit of `root` (see `units`), then `root` itself."""
    fully_shard = _fsdp().fully_shard
    for unit in units(root, wrap):
        fully_shard(unit, **unit_kwargs)
    fully_shard(root, **root_kwargs)


class ParameterMap:
    """Old parameter -> the sharded parameter that replaced it, for optimizers made before
    sharding. Old parameters are held weakly; an optimizer holding them keeps them alive."""

    def __init__(self) -> None:
        self._map: dict[int, tuple[weakref.ref, nn.Parameter]] = {}
        self._generation = 0
        self._bound: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def __getstate__(self) -> dict[str, Any]:
        return {}  # a copy in another process starts empty: ids mean nothing there

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__()

    def clear(self) -> None:
        """Forget every replacement (a new stage shards new modules; the old sharded
        parameters must not be kept alive here)."""
        self._map.clear()
        self._generation += 1

    def before(self, root: nn.Module) -> dict[str, nn.Parameter]:
        """Call before sharding `root`: its parameters by name."""
        return dict(root.named_parameters())

    def after(self, root: nn.Module, old: dict[str, nn.Parameter]) -> None:
        """Call after sharding `root`: record which new parameter replaced each old one."""
        new = dict(root.named_parameters())
        for name, param in old.items():
            if new.get(name) is not None and new[name] is not param:
                self._map[id(param)] = (weakref.ref(param), new[name])
        self._generation += 1

    def rebind(self, optimizer: Any) -> None:
        """Point `optimizer` (or each of a dict of them) at the sharded parameters, moving
        state it already holds; a no-op for an optimizer already bound since the last
        sharding."""
        if isinstance(optimizer, dict):
            for value in optimizer.values():
                self.rebind(value)
            return
        if optimizer is None or self._bound.get(optimizer) == self._generation:
            return
        for group in optimizer.param_groups:
            params = group["params"]
            for index, param in enumerate(params):
                entry = self._map.get(id(param))
                if entry is not None and entry[0]() is param:
                    params[index] = entry[1]
                    if param in optimizer.state:
                        optimizer.state[entry[1]] = optimizer.state.pop(param)
        self._bound[optimizer] = self._generation


def flush_accumulated_gradients(model: Any) -> None:
    """Reduce-scatter the gradients FSDP accumulated unsharded while gradient sync was off,
    when no synchronising backward will come (an accumulation window open at a loader's end).

    FSDP runs this reduction in the callback that closes a backward pass; it is called here
    directly on the root module's state. Collective: every rank calls it.
    """
    model = getattr(model, "_orig_mod", model)
    if not is_sharded(model):
        return
    model.set_requires_gradient_sync(True)
    model._get_fsdp_state()._root_post_backward_final_callback()


def full_state_dict(root: nn.Module) -> dict[str, torch.Tensor]:
    """The whole state dict of a sharded module, plain tensors on every rank (collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(root, options=StateDictOptions(full_state_dict=True))


def to_plain(root: nn.Module) -> bool:
    """Turn the sharded module `root` back into the plain module it was, holding its full
    weights (gathered on every rank: a collective, on the device it trained on). Afterwards
    it needs no process group, and may be sharded again. False (with a warning) when this
    torch's FSDP state is not laid out as expected: then nothing is changed and the module
    stays sharded."""
    full = full_state_dict(root)
    try:  # read everything first: a layout this code does not know changes nothing
        found = [(m, _added_by_fully_shard(m)) for m in root.modules() if is_sharded(m)]
    except AttributeError as error:
        warnings.warn(
            f"ddprun: could not turn the sharded {type(root).__name__} back into a plain module "
            f"with torch {torch.__version__} ({error!r}); it stays sharded (load a checkpoint "
            "for inference)",
            stacklevel=2,
        )
        return False
    fsdp_module = _fsdp().FSDPModule
    for module, (handles, keys) in found:
        for handle in handles:
            handle.remove()
        module.__class__ = next(c for c in type(module).__mro__ if not issubclass(c, fsdp_module))
        for key in keys:
            module.__dict__.pop(key, None)
    from torch.distributed import _composable_state

    mapping = getattr(_composable_state, "_module_state_mapping", {})
    for module in root.modules():
        mapping.pop(module, None)
        for flag in ("_is_fsdp_managed_module", "_fsdp_use_orig_params"):  # for torch.compile
            module.__dict__.pop(flag, None)
    _assign(root, full)
    return True


def _added_by_fully_shard(module: nn.Module) -> tuple[list[Any], tuple[str, str]]:
    """The hook handles ``fully_shard`` registered for `module`'s FSDP state (forward hooks,
    state-dict hooks of the modules owning its parameters), and the ``__dict__`` keys under
    which torch's composable API registered it (cleared so it can be sharded again)."""
    import importlib

    # the module, not the `contract` function the package re-exports under the same name
    contract = importlib.import_module("torch.distributed._composable.contract")
    state = module._get_fsdp_state()
    handles = list({state._pre_forward_hook_handle, state._post_forward_hook_handle})
    for group in state._fsdp_param_groups:
        handles += group._module_to_pre_save_state_dict_hook_handle.values()
        handles += group._module_to_pre_load_state_dict_hook_handle.values()
        handles += [fsdp_param._post_load_hook_handle for fsdp_param in group.fsdp_params]
    return handles, (contract.STATE_KEY, contract.REGISTRY_KEY)


def _assign(root: nn.Module, full: dict[str, torch.Tensor]) -> None:
    """Register plain parameters holding `full`, keeping each parameter's requires_grad; a
    parameter shared by several modules stays one parameter."""
    made: dict[int, nn.Parameter] = {}
    for owner_name, owner in root.named_modules(remove_duplicate=False):
        for name, param in list(owner._parameters.items()):
            if param is None:
                continue
            if id(param) not in made:
                key = f"{owner_name}.{name}" if owner_name else name
                made[id(param)] = nn.Parameter(full[key], requires_grad=param.requires_grad)
            owner._parameters[name] = made[id(param)]
