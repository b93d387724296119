"""Small helpers on torch modules that every layer may use (no imports from the rest of diffalign)."""

from __future__ import annotations

from torch import nn


def unwrap(model: nn.Module) -> nn.Module:
    """The module under DDP/accelerate wrappers (``model.module`` chains); the model itself otherwise."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return model


def trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters of the unwrapped ``model`` that require grad, by name (under LoRA: the adapter)."""
    return {n: p for n, p in unwrap(model).named_parameters() if p.requires_grad}
