"""The sharded strategy (FSDP2): each rank holds a shard of every parameter, gradient and
optimizer state; checkpoints are folders to which every rank writes its own shard.

Everything about processes is the DDP engine's (it is the base class): joining a launched group
or spawning workers, samplers, collectives, the stop agreement. What changes is the model
(`ddprun.engines.fsdp_modules`: ``fully_shard`` by a policy), gradient accumulation,
mixed precision and checkpoints (`ddprun.checkpoint_folders`).
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ddprun import checkpoint as ckpt_io
from ddprun import checkpoint_folders as folders
from ddprun.checkpoint_manifest import write_folder_manifest
from ddprun.engines import fsdp_modules
from ddprun.engines.ddp import DistributedDataParallelEngine
from ddprun.engines.device import parse_dtype
from ddprun.engines.engine import map_components
from ddprun.engines.precision import Precision, ShardedMixedPrecision


class FullyShardedDataParallelEngine(DistributedDataParallelEngine):
    """Fully sharded data parallel training (torch FSDP2, ``fully_shard``) over N processes.

    Args:
        wrap: which submodules become FSDP units of their own (each unit's parameters are
            gathered just before its forward, see `reshard_after_forward`): None, each child
            module that holds parameters; module classes, every submodule of those classes; or
            a function ``fn(module) -> bool``. The root module is always sharded last, holding the rest.
        reshard_after_forward: free each unit's gathered parameters after its forward and
            gather them again in backward (less memory, more communication). The root keeps
            its own (torch's default: backward starts with it).
        param_dtype, reduce_dtype: mixed precision (torch dtypes or "bf16"/"fp16"): the dtype
            units compute and gather in, and the one gradients are reduced in (default: the
            param dtype). bf16 runs on CPU and GPU; fp16 adds a ShardedGradScaler. The master
            weights and the optimizer stay fp32; the model's outputs are cast to fp32.
        cpu_offload: keep sharded parameters, gradients and optimizer states in CPU memory
            (torch's CPUOffloadPolicy; the optimizer steps on the CPU). On CPU ranks there is
            nothing to move.
        gather_on_end: at the end of a successful run, turn the models back into plain
            modules holding the full weights on every rank, as DDP leaves them (needed for
            spawn mode, and for using ``runner.model`` after ``train``). Set False when one
            rank cannot hold the whole model; ``runner.model`` then stays sharded.
        scaler_kwargs: passed to the ShardedGradScaler (fp16).
        fsdp_kwargs: further ``fully_shard`` arguments (e.g. ``shard_placement_fn``).
        address, port, world_size, backend, process_group_kwargs: as for the DDP engine.

    Gradient accumulation (OptimizerCallback's ``accumulation_steps``) turns FSDP's gradient
    sync off on accumulating batches (``set_requires_gradient_sync(False)``: no reduce-scatter;
    gradients accumulate unsharded), so the step batch reduce-scatters the window once.
    Clipping with ``torch.nn.utils.clip_grad_norm_`` works on the sharded gradients and clips by
    the global norm (DTensor computes the norm across shards). Frozen parameters are sharded
    too and get no gradient.

    Checkpoints (CheckpointCallback): ``best``, ``last`` and ``<stage>.<epoch>`` are folders
    (see `ddprun.checkpoint_folders`), every rank writing its own shard; loading them reshards
    to the current world size. ``ddprun.checkpoint.load_checkpoint(folder)`` reads one in a
    plain process. Optimizers built before sharding (ddprun's runners build them first) are
    pointed at the sharded parameters (`prepare_optimizer`; every engine call taking an
    optimizer, and any ``optimizer.step()``, does it too).
    """

    is_sharded = True

    def __init__(
        self,
        wrap: fsdp_modules.WrapPolicy = None,
        reshard_after_forward: bool = True,
        param_dtype: torch.dtype | str | None = None,
        reduce_dtype: torch.dtype | str | None = None,
        cpu_offload: bool = False,
        gather_on_end: bool = True,
        scaler_kwargs: dict[str, Any] | None = None,
        fsdp_kwargs: dict[str, Any] | None = None,
        address: str | None = None,
        port: int | str | None = None,
        world_size: int | None = None,
        backend: str | None = None,
        process_group_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(
            address=address,
            port=port,
            world_size=world_size,
            backend=backend,
            process_group_kwargs=process_group_kwargs,
        )
        self.wrap, self.reshard_after_forward = wrap, bool(reshard_after_forward)
        self.param_dtype = _dtype(param_dtype)
        self.reduce_dtype = _dtype(reduce_dtype)
        self.cpu_offload, self.gather_on_end = bool(cpu_offload), bool(gather_on_end)
        self.scaler_kwargs, self.fsdp_kwargs = scaler_kwargs, dict(fsdp_kwargs or {})
        self._params = fsdp_modules.ParameterMap()
        self._roots: list[weakref.ref] = []  # modules sharded for the current stage
        self._mesh: Any = None
        self._step_hook: Any = None
        self.precision = self._make_precision("cuda" if torch.cuda.is_available() else "cpu")

    def __getstate__(self) -> dict[str, Any]:
        # spawn mode pickles the engine: what it tracks belongs to this process only
        state = dict(self.__dict__)
        state.update(_params=fsdp_modules.ParameterMap(), _roots=[], _mesh=None, _step_hook=None)
        return state

    # ----------------------------------------------------------------- process
    def spawn(self, runner: Any) -> None:
        """As the DDP engine's spawn mode; the parent adopts rank 0's gathered weights."""
        if not self.gather_on_end:
            raise ValueError(
                "FSDPEngine(gather_on_end=False) cannot run in spawn mode: the parent takes "
                "rank 0's full weights at the end; launch with `ddprun --nproc N` instead"
            )
        super().spawn(runner)

    def setup(self) -> None:
        """Join the group (DDP engine), build the 1-D device mesh, and hook optimizer steps
        so an optimizer made before sharding steps the sharded parameters."""
        from torch.distributed.device_mesh import init_device_mesh
        from torch.optim.optimizer import register_optimizer_step_pre_hook

        super().setup()
        self._mesh = init_device_mesh(self.device.type, (self.world_size,))
        if self._step_hook is None:
            params = self._params
            self._step_hook = register_optimizer_step_pre_hook(lambda opt, *_: params.rebind(opt))

    def _configure_precision(self) -> None:
        self.precision = self._make_precision(self.device.type)

    def _make_precision(self, device_type: str) -> Precision:
        if self.param_dtype in (None, torch.float32):
            return Precision()
        return ShardedMixedPrecision(device_type, self.param_dtype, self.scaler_kwargs)

    def teardown(self) -> None:
        """Turn this stage's sharded models back into plain ones (`gather_on_end`), then
        leave the group."""
        if self._step_hook is not None:
            self._step_hook.remove()
            self._step_hook = None
        if self.gather_on_end and dist.is_initialized():
            for root in [ref() for ref in self._roots]:
                if root is not None and fsdp_modules.is_sharded(root):
                    fsdp_modules.to_plain(root)
        self._params.clear()
        super().teardown()

    # -------------------------------------------------------------- components
    def prepare_model(self, model: Any) -> Any:
        self._roots = []
        self._params.clear()  # the previous stage's optimizers are gone
        return super().prepare_model(model)

    def _wrap(self, module: nn.Module) -> nn.Module:
        """Shard `module` in place (already sharded: kept); a module without parameters
        only moves to the device."""
        module = self.unwrap(module)
        if fsdp_modules.is_sharded(module):
            self._roots.append(weakref.ref(module))
            return module
        if next(module.parameters(), None) is None:
            return module.to(self.device)
        old = self._params.before(module)
        units, root = self._shard_kwargs(root=False), self._shard_kwargs(root=True)
        fsdp_modules.shard(module, self.wrap, root_kwargs=root, unit_kwargs=units)
        self._params.after(module, old)
        self._roots.append(weakref.ref(module))
        return module

    def _shard_kwargs(self, root: bool) -> dict[str, Any]:
        fsdp = fsdp_modules._fsdp()
        kwargs: dict[str, Any] = {"mesh": self._mesh}
        if not root:
            kwargs["reshard_after_forward"] = self.reshard_after_forward
        if self.param_dtype is not None or self.reduce_dtype is not None:
            # the root's outputs in fp32: the loss and the metrics see full-precision values
            output = torch.float32 if root and self.param_dtype is not None else None
            kwargs["mp_policy"] = fsdp.MixedPrecisionPolicy(
                param_dtype=self.param_dtype, reduce_dtype=self.reduce_dtype, output_dtype=output
            )
        if self.cpu_offload:
            pin = self.device.type == "cuda"
            kwargs["offload_policy"] = fsdp.CPUOffloadPolicy(pin_memory=pin)
        return {**kwargs, **self.fsdp_kwargs}

    def prepare_optimizer(self, optimizer: Any) -> Any:
        self._params.rebind(optimizer)
        return optimizer

    def full_state_dict(self, model: Any) -> Any:
        """Plain state dict(s) of `model` (a dict of them for a dict), full on every rank
        (a collective for sharded modules)."""

        def full(module: Any) -> Any:
            module = getattr(module, "_orig_mod", module)
            if fsdp_modules.is_sharded(module):
                return fsdp_modules.full_state_dict(module)
            return module.state_dict()

        return map_components(model, full)

    # ------------------------------------------------------------------- steps
    def unscale_gradients(self, optimizer: torch.optim.Optimizer) -> None:
        self._params.rebind(optimizer)
        super().unscale_gradients(optimizer)

    def optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        self._params.rebind(optimizer)
        super().optimizer_step(optimizer)

    def zero_grad(self, optimizer: torch.optim.Optimizer) -> None:
        self._params.rebind(optimizer)
        super().zero_grad(optimizer)

    @contextlib.contextmanager
    def no_sync(self, model: Any) -> Iterator[None]:
        """Turn FSDP's gradient sync off inside (no reduce-scatter on accumulating batches:
        gradients accumulate unsharded until a backward with sync on)."""
        module = getattr(model, "_orig_mod", model)
        if not fsdp_modules.is_sharded(module):
            yield
            return
        module.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            module.set_requires_gradient_sync(True)

    def finish_accumulation(self, models: Sequence[Any]) -> None:
        """Reduce-scatter gradients of an accumulation window still open at a loader's end."""
        for model in models:
            fsdp_modules.flush_accumulated_gradients(model)

    # -------------------------------------------------------------- checkpoints
    def checkpoint_path(self, folder: str | Path, name: str) -> Path:
        """A sharded checkpoint is the folder ``<folder>/<name>``."""
        return Path(folder) / name

    def remove_checkpoint(self, path: str | Path) -> None:
        path = Path(path)
        folders.remove_folder(path) if path.is_dir() else path.unlink(missing_ok=True)

    def pack_checkpoint(self, model=None, criterion=None, optimizer=None, scheduler=None, **extra):
        """A checkpoint dict like the other engines', with sharded states (DTensors) for the
        sharded model, criterion and optimizer(s); optimizer states are keyed by parameter
        name (DCP's layout) until `ddprun.checkpoint_folders.consolidate` numbers them."""
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        self._params.rebind(optimizer)
        owner = _owner(model, criterion)
        packed = ckpt_io.pack_checkpoint(scheduler=scheduler, **extra)  # the same key order
        packed["model_state_dict"] = map_components(model, _module_state)
        packed["criterion_state_dict"] = map_components(criterion, _module_state)
        packed["optimizer_state_dict"] = map_components(
            optimizer, lambda opt: get_optimizer_state_dict(owner, opt)
        )
        packed["scaler_state_dict"] = self.state_dict().get("scaler")
        return packed

    def save_checkpoint(
        self,
        obj: Any,
        path: str | Path | Sequence[str | Path],
        async_: bool = False,
        on_written: Callable[[], Any] | None = None,
    ) -> Future | None:
        """Write `obj` as a sharded folder at the first path, every rank its own shard, then
        rank 0 adds the manifest (sizes, checksums: ``manifest.json``, written last) and
        publishes the folder at once; further paths (best, an epoch folder) get hard-linked
        copies, and `on_written` runs on rank 0. Collective.

        Synchronous: every rank then passes `checkpoint_barrier`. With `async_`, the shards
        are staged to CPU memory and written by ``torch.distributed.checkpoint.async_save`` in
        the background; the manifest, the publishing and `on_written` happen in
        `wait_for_checkpoint` (the next save, a load, the run's end), after every rank's
        shards are complete, so an interrupted write never replaces the previous folder.
        """
        self.wait_for_checkpoint()
        paths = [Path(path)] if isinstance(path, (str, Path)) else [Path(p) for p in path]
        if not paths:
            self.checkpoint_barrier()
            return None
        sharded, rest = folders.split_sharded(obj)
        temp = None
        if self.is_master:
            folders.remove_stale_temps(paths[0])
            temp = folders.temp_folder(paths[0])
        box = [temp]
        dist.broadcast_object_list(box, src=0, group=self._file_group)
        temp = box[0]

        def publish() -> None:  # rank 0, once every rank's shards are in `temp`
            write_folder_manifest(temp)
            folders.publish(temp, paths[0])
            for target in paths[1:]:
                folders.copy_folder(paths[0], target)
            if on_written is not None:
                on_written()

        if not async_:
            folders.write_folder(sharded, rest, temp, self.is_master, self._file_group)
            if self.is_master:
                publish()
            self.checkpoint_barrier()
            return None
        future = folders.write_folder_async(sharded, rest, temp, self.is_master, self._file_group)
        self.checkpoint_writer.track(future, finalize=publish if self.is_master else None)
        self._checkpoint_pending = True  # every rank: all of them wait for it later
        return future

    def load_checkpoint(self, path: str | Path) -> dict[str, Any]:
        """A file checkpoint as it is; a sharded folder as its unsharded entries, with a
        `ddprun.checkpoint_folders.ShardedEntry` in place of each sharded one (which
        `unpack_checkpoint` reads into the live components)."""
        path = Path(path)
        if not folders.is_sharded_folder(path):
            return ckpt_io.load_checkpoint(path)
        state = folders.read_state(path)
        for key in state.pop(folders.SHARDED_KEYS, []):
            state[key] = folders.ShardedEntry(path, key)
        return state

    def unpack_checkpoint(
        self,
        checkpoint,
        model=None,
        criterion=None,
        optimizer=None,
        scheduler=None,
        source: str = "checkpoint",
    ) -> None:
        """Load states into the (sharded) components: from a folder through DCP (resharded
        to this world size), from a file checkpoint as full states each rank shards."""
        from ddprun.engines import fsdp_state

        self._params.rebind(optimizer)
        given = {"model": model, "criterion": criterion, "optimizer": optimizer}
        for name, component in given.items():
            if component is None:
                continue
            key = f"{name}_state_dict"
            if key not in checkpoint:
                raise ckpt_io.CheckpointError(f"{source} has no {key} (have {sorted(checkpoint)})")
            load = fsdp_state.load_optimizer if name == "optimizer" else fsdp_state.load_module
            try:
                load(checkpoint[key], component, _owner(model, criterion), self._file_group, key)
            except (RuntimeError, KeyError, ValueError, TypeError) as error:
                raise ckpt_io.CheckpointError(
                    f"{source}: the saved {name} state does not fit the {name}: {error}"
                ) from error
        ckpt_io.unpack_checkpoint(checkpoint, scheduler=scheduler, source=source)
        if checkpoint.get("scaler_state_dict") is not None:
            self.load_state_dict({"scaler": checkpoint["scaler_state_dict"]})


#: the name ddprun's docs and ``dl`` use
FSDPEngine = FullyShardedDataParallelEngine


def _dtype(value: torch.dtype | str | None) -> torch.dtype | None:
    """A dtype option: None, a torch dtype, "bf16"/"fp16"/... or "fp32"/"float32"."""
    if value in ("fp32", "float32"):
        return torch.float32
    return parse_dtype(value)


def _module_state(module: Any) -> Any:
    """Sharded state dict of a sharded module (DTensors), plain state of anything else."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    plain = getattr(module, "_orig_mod", module)
    if fsdp_modules.is_sharded(plain):
        return get_model_state_dict(plain)
    return plain.state_dict() if hasattr(plain, "state_dict") else None


def _owner(model: Any, criterion: Any) -> nn.Module:
    """One module holding the model(s) and a criterion with parameters: optimizer states are
    named by parameter paths inside it (the same at save and load)."""
    parts = {}
    for name, component in (("model", model), ("criterion", criterion)):
        if isinstance(component, Mapping):
            modules = {k: v for k, v in component.items() if isinstance(v, nn.Module)}
            parts[name] = nn.ModuleDict(modules)
        elif isinstance(component, nn.Module):
            parts[name] = component
    return nn.ModuleDict(parts)
