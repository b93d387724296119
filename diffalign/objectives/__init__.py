"""Objectives: each one file, ``loss(batch, backbone) -> (loss, metrics)``, registered by name.

A new objective is one file (a dataclass with ``@register("name")``, see ``base.py``) plus one import
line below; its options become the config's ``objective:`` section.
"""

from __future__ import annotations

from . import dpo, dro, inpo, mapo, nft, policy_gradient, ppd, reward_feedback, seppo  # noqa: F401  (one line per objective: importing registers it)
from .base import OBJECTIVES, Objective, build_objective, options_model, register
from .dpo import DiffusionDPO
from .dro import DiffusionDRO
from .inpo import InPO
from .mapo import MaPO

__all__ = ["OBJECTIVES", "DiffusionDPO", "DiffusionDRO", "InPO", "MaPO", "Objective", "build_objective",
           "options_model", "register"]

from . import idaligner  # noqa: E402,F401  (ID-Aligner: reward feedback with identity references; own line for merges)
