"""Method registry: each module in this package registers its plug-in by name on import."""

from __future__ import annotations

import importlib
import pkgutil

from fedft.errors import ConfigError
from fedft.methods.base import Method

_REGISTRY: dict[str, type[Method]] = {}
_loaded = False


def register(cls: type[Method]) -> type[Method]:
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"method name '{cls.name}' is taken by {_REGISTRY[cls.name].__name__}")
    _REGISTRY[cls.name] = cls
    return cls


def _load_all() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for info in pkgutil.iter_modules(__path__):
        if info.name not in ("base",) and not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")


def available_methods() -> list[str]:
    _load_all()
    return list(_REGISTRY)


def get_method(name: str) -> type[Method]:
    _load_all()
    if name not in _REGISTRY:
        raise ConfigError(
            f"method.name: unknown method '{name}'; choose one of: {', '.join(_REGISTRY)}"
        )
    return _REGISTRY[name]


__all__ = ["Method", "available_methods", "get_method", "register"]
