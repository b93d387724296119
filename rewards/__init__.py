"""Reward models behind one interface: images [B,3,H,W] in [0,1] + prompts -> scores [B]."""

from ._common import RewardLoadError
from .base import Reward, RewardInputError, check_images
from .ensemble import Ensemble
from .registry import available, load, register
from .spec import from_spec, parse_spec

__all__ = ["Ensemble", "Reward", "RewardInputError", "RewardLoadError", "available", "check_images", "from_spec", "load",
           "parse_spec", "register"]
