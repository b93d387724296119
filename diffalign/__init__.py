"""diffalign: align text-to-image diffusion and flow models with preferences.

``diffalign.sample(...)`` (see ``diffalign.api``) is imported on first use, so ``import diffalign``
stays cheap (no torch import).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .api import Samples, sample

__all__ = ["Samples", "sample"]


def __getattr__(name: str) -> Any:
    if name in ("sample", "Samples"):
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'diffalign' has no attribute {name!r}")
