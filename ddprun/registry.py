"""The registry of the Config API (``_target_`` names -> classes or functions to call) and
`load_config` (YAML/JSON config files, also ``ddprun.utils.load_config``).

``REGISTRY`` knows, on first lookup:

- torch: every ``torch.nn`` module and loss, the ``torch.optim`` optimizers, the
  ``torch.optim.lr_scheduler`` schedulers, ``torch.utils.data``'s DataLoader, datasets and
  samplers, and ``clip_grad_norm_`` / ``clip_grad_value_``;
- ddprun: engines, callbacks, loggers, runners, and ``ddprun.data``'s samplers and transforms
  (a ddprun name wins over a torch name of the same spelling);
- ``ddprun.contrib`` (datasets, layers, losses, models, transforms) only when a name is found
  nowhere else: the core never imports contrib by itself, and a core name wins over a contrib
  one (contrib's ``Normalize`` layer is ``ddprun.contrib.layers.Normalize`` by full path).

Users add their own classes and functions (a name already taken is an error unless
``override=True``; a contrib name stays the user's, contrib being loaded only on a miss)::

    from ddprun.registry import REGISTRY

    @REGISTRY.add                      # registered as "MyNet"
    class MyNet(nn.Module): ...

    REGISTRY.add(MyDataset)            # or REGISTRY.add(MyDataset, name="Data")
    REGISTRY.add(Blocks=make_blocks)   # several at once, by keyword
    # ``ddprun.registry.register`` is REGISTRY.add

A name that is not registered may be a full import path (``"package.module.Name"``); so a
config names code to import and run: load configs you trust. An unknown name raises
`RegistryError` with the closest registered names.

A spec is a mapping with ``_target_`` (a name, a dotted path or the callable itself), keyword
arguments and optionally ``_args_`` (positional arguments). Values are built first, depth
first: mappings with ``_target_`` become objects, other mappings and lists are walked.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import json
import os
import re
from collections.abc import Callable, Iterable, Mapping
from types import ModuleType
from typing import Any

__all__ = ["REGISTRY", "ConfigError", "Registry", "RegistryError", "load_config", "register"]

TARGET, ARGS = "_target_", "_args_"


class ConfigError(ValueError):
    """A config asks for something that cannot be built (names where and what was expected)."""


class RegistryError(ConfigError, LookupError):
    """A ``_target_`` name is neither registered nor importable, or a name is taken twice."""


class Registry:
    """Name -> factory map with built-ins loaded on first use (see the module docstring)."""

    def __init__(self) -> None:
        self._factories: dict[str, Callable[..., Any]] = {}
        self._builtin_loaders: list[Callable[[Registry], None]] = []
        self._fallback_loaders: list[Callable[[Registry], None]] = []
        self._builtins_loaded = False

    # ------------------------------------------------------------ registering
    def add(
        self,
        factory: Callable[..., Any] | None = None,
        *,
        name: str | None = None,
        override: bool = False,
        **named: Callable[..., Any],
    ) -> Any:
        """Register `factory` (under `name`, default its ``__name__``) and ``named`` factories.

        Returns `factory`, so ``@REGISTRY.add`` works as a decorator; ``@REGISTRY.add(name=
        "X")`` (no factory) returns a decorator. A name already held by another factory is a
        `RegistryError` unless ``override=True``.
        """
        if factory is None and not named:
            return lambda obj: self.add(obj, name=name, override=override)
        self._load_builtins()
        if factory is not None:
            self._put(name or _name_of(factory), factory, override=override)
        for key, value in named.items():
            self._put(key, value, override=override)
        return factory

    def add_from_module(
        self, module: ModuleType, prefix: str = "", names: Iterable[str] | None = None
    ) -> None:
        """Register the public callables of `module` (its ``__all__``, or `names`), each as
        ``prefix + name``; names already taken are kept as they are."""
        for key in names if names is not None else getattr(module, "__all__", ()):
            value = getattr(module, key, None)
            if callable(value) and not isinstance(value, ModuleType):
                self._factories.setdefault(prefix + key, value)

    def late_add(self, loader: Callable[[Registry], None]) -> None:
        """Run ``loader(registry)`` before the first lookup (built-ins of an optional part)."""
        if self._builtins_loaded:
            loader(self)
        else:
            self._builtin_loaders.append(loader)

    def _put(self, key: str, factory: Callable[..., Any], override: bool) -> None:
        if not isinstance(key, str) or not key:
            raise RegistryError(f"a registry name must be a non-empty str, got {key!r}")
        if not callable(factory):
            raise RegistryError(f"REGISTRY.add({key}=...): {factory!r} is not callable")
        held = self._factories.get(key)
        if held is not None and not override and not _same(held, factory):
            raise RegistryError(
                f"the name {key!r} is taken by {_describe(held)}; register "
                f"{_describe(factory)} under another name (REGISTRY.add(obj, name=...)) or "
                "pass override=True"
            )
        self._factories[key] = factory

    def _load_builtins(self) -> None:
        if self._builtins_loaded:
            return
        self._builtins_loaded = True
        for loader in self._builtin_loaders:
            loader(self)

    # ---------------------------------------------------------------- lookups
    def __contains__(self, name: object) -> bool:
        self._load_builtins()
        return name in self._factories

    def names(self) -> list[str]:
        """Every registered name (built-ins loaded; contrib's only once it was needed)."""
        self._load_builtins()
        return sorted(self._factories)

    def get(self, name: str | Callable[..., Any], where: str = "") -> Callable[..., Any]:
        """The factory for `name`: registered, else a dotted import path, else contrib.

        Raises:
            RegistryError: naming `name`, `where` it was asked for and the closest names.
        """
        if callable(name) and not isinstance(name, str):
            return name
        if not isinstance(name, str) or not name:
            raise RegistryError(f"{_at(where)}_target_ must be a name or a callable, got {name!r}")
        self._load_builtins()
        found = self._factories.get(name)
        if found is None and "." in name:
            found = _import_path(name, where)
        while found is None and self._fallback_loaders:
            self._fallback_loaders.pop(0)(self)
            found = self._factories.get(name)
        if found is None:
            raise RegistryError(self._unknown(name, where))
        return found

    def _unknown(self, name: str, where: str) -> str:
        names = list(self._factories)
        close = difflib.get_close_matches(name, names, n=5, cutoff=0.6)
        close += [n for n in names if n.lower() == name.lower() and n not in close]
        hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
        return (
            f"{_at(where)}unknown _target_ {name!r}{hint} Register your own with "
            "ddprun.registry.REGISTRY.add(obj) (or @REGISTRY.add), or give a full import path "
            "such as 'package.module.Name'"
        )

    # --------------------------------------------------------------- building
    def get_instance(self, name: str | Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``get(name)(*args, **kwargs)``."""
        return self.get(name)(*args, **kwargs)

    def get_from_params(self, *, shared_params: Mapping[str, Any] | None = None, **params: Any):
        """Build ``params`` (a spec, or a mapping of specs) as Catalyst's registry does;
        `shared_params` are extra keyword arguments of the top-level call."""
        return self.build(params, extra=shared_params)

    def build(self, spec: Any, where: str = "", extra: Mapping[str, Any] | None = None) -> Any:
        """Build `spec`: a mapping with ``_target_`` is called with its (built) arguments plus
        `extra`; other mappings and lists are walked; anything else is returned as is.

        Raises:
            RegistryError: an unknown name. ConfigError: arguments the factory refused (a
            TypeError), naming `where` in the config. Other errors of a factory propagate with
            a note naming `where`.
        """
        if isinstance(spec, Mapping):
            if TARGET not in spec:
                return {key: self.build(value, _join(where, key)) for key, value in spec.items()}
            return self._call(spec, where, extra or {})
        if isinstance(spec, (list, tuple)):
            return [self.build(value, _join(where, str(i))) for i, value in enumerate(spec)]
        return spec

    def _call(self, spec: Mapping[str, Any], where: str, extra: Mapping[str, Any]) -> Any:
        factory = self.get(spec[TARGET], where)
        args = spec.get(ARGS, ())
        if not isinstance(args, (list, tuple)):
            raise ConfigError(f"{_at(where)}_args_ must be a list, got {args!r}")
        args = [self.build(value, _join(where, f"{ARGS}.{i}")) for i, value in enumerate(args)]
        kwargs = {
            key: self.build(value, _join(where, key))
            for key, value in spec.items()
            if key not in (TARGET, ARGS)
        }
        kwargs.update(extra)
        try:
            return factory(*args, **kwargs)
        except TypeError as error:
            if not _is_call_error(error, factory, args, kwargs):
                _note(error, where, factory)
                raise
            shown = ", ".join(sorted(kwargs))
            raise ConfigError(
                f"{_at(where)}{_describe(factory)} does not take these arguments "
                f"({shown or 'none'}): {error}; its signature is {_signature(factory)}"
            ) from error
        except Exception as error:
            _note(error, where, factory)
            raise


# ----------------------------------------------------------------- helpers
def _note(error: BaseException, where: str, factory: Any) -> None:
    if not hasattr(error, "add_note"):  # Python 3.10: the error goes on without the note
        return
    error.add_note(f"ddprun config: while building {where or 'the config'} ({_describe(factory)})")


def _at(where: str) -> str:
    return f"config {where}: " if where else ""


def _join(where: str, key: Any) -> str:
    return f"{where}.{key}" if where else str(key)


def _name_of(factory: Any) -> str:
    name = getattr(factory, "__name__", None)
    if not name:
        raise RegistryError(f"{factory!r} has no __name__: register it with name=...")
    return name


def _describe(factory: Any) -> str:
    module = getattr(factory, "__module__", None)
    name = getattr(factory, "__qualname__", None) or repr(factory)
    return f"{module}.{name}" if module else name


def _same(a: Any, b: Any) -> bool:
    """One object, or the same definition run twice (a module imported again)."""
    return a is b or (isinstance(a, type) and isinstance(b, type) and _describe(a) == _describe(b))


def _signature(factory: Any) -> str:
    try:
        return f"{getattr(factory, '__name__', 'factory')}{inspect.signature(factory)}"
    except (TypeError, ValueError):
        return "unknown"


def _is_call_error(error: TypeError, factory: Any, args: list, kwargs: dict) -> bool:
    """Whether `error` is about the call's arguments rather than raised inside the factory."""
    try:
        inspect.signature(factory).bind(*args, **kwargs)
    except TypeError:
        return True
    except ValueError:  # no signature to check (some builtins): trust the message
        return "argument" in str(error)
    return False


def _import_path(path: str, where: str) -> Any:
    """``package.module.Name`` (also ``package.module.Class.attr``) imported, or None when
    no prefix of `path` is a module."""
    parts = path.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        module_name = ".".join(parts[:cut])
        try:
            value: Any = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            missing = error.name or ""
            if module_name != missing and not module_name.startswith(missing + "."):
                raise  # the module exists but fails to import something of its own
            continue
        for attr in parts[cut:]:
            value = getattr(value, attr, None)
            if value is None:
                raise RegistryError(
                    f"{_at(where)}_target_ {path!r}: module {module_name!r} has no "
                    f"{'.'.join(parts[cut:])!r}"
                )
        return value
    return None


# --------------------------------------------------------------- built-ins
def _torch_builtins(registry: Registry) -> None:
    import torch
    from torch.optim import lr_scheduler
    from torch.utils import data

    def public(module: ModuleType, kind: tuple[type, ...]) -> list[str]:
        return [
            key
            for key, value in vars(module).items()
            if not key.startswith("_") and isinstance(value, type) and issubclass(value, kind)
        ]

    registry.add_from_module(torch.nn, names=public(torch.nn, (torch.nn.Module,)))
    registry.add_from_module(torch.optim, names=public(torch.optim, (torch.optim.Optimizer,)))
    schedulers = (lr_scheduler.LRScheduler, lr_scheduler.ReduceLROnPlateau)
    registry.add_from_module(lr_scheduler, names=public(lr_scheduler, schedulers))
    kinds = (data.DataLoader, data.Dataset, data.Sampler)
    registry.add_from_module(data, names=public(data, kinds))
    registry.add_from_module(torch.nn.utils, names=["clip_grad_norm_", "clip_grad_value_"])


def _ddprun_builtins(registry: Registry) -> None:
    from ddprun import callbacks, data, dl, engines, loggers

    # first: a ddprun name wins over torch's of the same spelling
    for module in (dl, callbacks, engines, loggers, data):
        for key in getattr(module, "__all__", ()):
            value = getattr(module, key)
            if callable(value) and not isinstance(value, ModuleType):
                registry._factories[key] = value


def _contrib_fallback(registry: Registry) -> None:
    import ddprun.contrib as contrib

    registry.add_from_module(contrib)


# ----------------------------------------------------------------- config files
#: YAML 1.1 reads ``1e-3`` (no dot) as a string; configs mean a float (``lr: 1e-3``)
_EXPONENT_FLOAT = re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$")


def load_config(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML (``.yml``/``.yaml``) or JSON (``.json``) config file into a dict.

    YAML is read safely (no Python tags) in file order, anchors and aliases included, and
    ``1e-3`` is a float (plain PyYAML would read it as a string). YAML needs PyYAML.

    Raises:
        FileNotFoundError: no such file. ConfigError: another extension, or a file that does
        not hold a mapping. ImportError: a YAML file without PyYAML installed.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path!r} does not exist")
    suffix = os.path.splitext(path)[1].lower()
    with open(path, encoding="utf-8") as stream:
        if suffix == ".json":
            config = json.load(stream)
        elif suffix in (".yml", ".yaml"):
            config = _load_yaml(stream, path)
        else:
            raise ConfigError(f"config file {path!r}: expected a .yml, .yaml or .json file")
    if not isinstance(config, Mapping):
        raise ConfigError(f"config file {path!r} holds a {type(config).__name__}, not a mapping")
    return dict(config)


def _load_yaml(stream: Any, path: str) -> Any:
    try:
        import yaml
    except ImportError as error:
        raise ImportError(
            f"reading the YAML config {path!r} needs PyYAML: pip install pyyaml "
            "(or give the config as a dict or a .json file)"
        ) from error

    class _Loader(yaml.SafeLoader):
        pass

    _Loader.add_implicit_resolver("tag:yaml.org,2002:float", _EXPONENT_FLOAT, list("-+0123456789."))
    return yaml.load(stream, Loader=_Loader)  # noqa: S506  (a SafeLoader subclass)


REGISTRY = Registry()
REGISTRY.late_add(_torch_builtins)
REGISTRY.late_add(_ddprun_builtins)
REGISTRY._fallback_loaders.append(_contrib_fallback)

#: ``@register`` / ``register(obj, name=...)``: `Registry.add` of `REGISTRY`.
register = REGISTRY.add
