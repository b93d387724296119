"""Build rewards by name: ``rewards.load("pickscore", path=...)``; ``rewards.available()`` lists names."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .base import Reward

_REGISTRY: dict[str, Callable[..., Reward]] = {}


def register(name: str) -> Callable[[Callable[..., Reward]], Callable[..., Reward]]:
    """Decorator: register a reward factory ``f(path=None, **kwargs) -> Reward`` under ``name``."""

    def deco(factory: Callable[..., Reward]) -> Callable[..., Reward]:
        if name in _REGISTRY:
            raise ValueError(f"reward {name!r} is registered twice")
        _REGISTRY[name] = factory
        return factory

    return deco


def available() -> list[str]:
    _import_builtin()
    return sorted(_REGISTRY)


def load(name: str, path: str | None = None, **kwargs: Any) -> Reward:
    """Build the reward registered as ``name`` from local weights at ``path``."""
    _import_builtin()
    if name not in _REGISTRY:
        raise KeyError(f"unknown reward {name!r}; available: {', '.join(sorted(_REGISTRY))}")
    reward = _REGISTRY[name](path=path, **kwargs)
    reward.name = name
    return reward


def _import_builtin() -> None:
    # Importing the modules registers their rewards. Each module that exists is imported once.
    import importlib

    for mod in ("toy", "aesthetic", "clip", "pickscore", "hps", "imagereward", "identity", "composition",
                "toy_composition"):
        try:
            importlib.import_module(f"rewards.{mod}")
        except ModuleNotFoundError as e:  # module not written yet
            if e.name != f"rewards.{mod}":
                raise
