"""Gradient checkpointing of the denoiser, full or selective.

Every diffusers denoiser (UNet2DConditionModel, SD3Transformer2DModel, FluxTransformer2DModel) runs its blocks
through ``self._gradient_checkpointing_func`` once checkpointing is on; the function decides what is kept.

- ``True`` (full): diffusers' own: nothing inside a block is kept, the backward runs each block's forward again.
- ``"selective"``: the block is checkpointed with torch's selective activation checkpointing: the outputs of
  its convolutions and attention kernels are kept (the costly part of a forward to run again), everything else
  (the linear layers, norms, activations, reshapes) runs again in the backward. In a diffusion transformer block
  the linear layers' outputs are most of the memory (the feed-forward's 4x-wide hidden states) and a small part
  of the FLOPs next to attention over thousands of tokens. SD1.5 architecture, 512 px, DPO with LoRA in bf16
  (docs/BENCHMARKS.md, "Speed, part 4"): the steps' peak RSS falls from 5.7 to 4.2 GB for about +8% CPU time,
  where full checkpointing gives 4.0 GB for +13-18%.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch

_KEEP_NAMES = (
    "convolution",
    "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention",
)


def kept_ops() -> set[Any]:
    """The aten ops whose outputs selective checkpointing keeps (those this torch build has)."""
    aten = torch.ops.aten
    return {getattr(aten, n).default for n in _KEEP_NAMES if hasattr(aten, n)}


def selective_checkpoint_func() -> Callable[..., Any]:
    """A ``gradient_checkpointing_func`` for diffusers' ``enable_gradient_checkpointing``: keep the outputs of
    convolutions and attention, run everything else again in the backward."""
    from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

    keep = kept_ops()

    def policy(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
        return CheckpointPolicy.MUST_SAVE if op in keep else CheckpointPolicy.PREFER_RECOMPUTE

    context = functools.partial(create_selective_checkpoint_contexts, policy)

    def run(module: torch.nn.Module, *args: Any) -> Any:
        return checkpoint(module.__call__, *args, use_reentrant=False, context_fn=context)

    return run


def enable_checkpointing(denoiser: torch.nn.Module, mode: bool | str) -> None:
    """Turn on gradient checkpointing of ``denoiser``: ``True`` (full) or ``"selective"`` (see the module)."""
    if mode is True:
        denoiser.enable_gradient_checkpointing()
    elif mode == "selective":
        denoiser.enable_gradient_checkpointing(selective_checkpoint_func())
    elif mode:
        raise ValueError(f"model.gradient_checkpointing: {mode!r} is not one of false, true, selective")
