"""Objectives: each one file, ``loss(batch, backbone) -> (loss, metrics)``; built by name."""

from __future__ import annotations

from typing import Any

from .dpo import DiffusionDPO
from .dro import DiffusionDRO
from .inpo import InPO
from .mapo import MaPO

OBJECTIVES: dict[str, type] = {"dpo": DiffusionDPO, "inpo": InPO, "dro": DiffusionDRO, "mapo": MaPO}


def build_objective(name: str, **kwargs: Any) -> Any:
    if name not in OBJECTIVES:
        raise KeyError(f"unknown objective {name!r}; available: {', '.join(sorted(OBJECTIVES))}")
    return OBJECTIVES[name](**kwargs)


__all__ = ["OBJECTIVES", "DiffusionDPO", "DiffusionDRO", "InPO", "MaPO", "build_objective"]
