"""Personalization's injection: the decoupled cross-attention of ``diffalign.backbones.user_attention``
(re-exported here) and sampling with a user embedding.

    load_injection(bb, "final/user_injection.safetensors")
    with personalized(bb, profile.embedding):          # every Cond the backbone builds carries it
        images = generate(bb, prompts, ...)             # stock samplers, unchanged
    images = generate_personalized(bb, prompts, embeddings_per_row, ...)   # users mixed in one batch
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from ..backbones.user_attention import (  # noqa: F401  (the public names)
    FORMAT,
    TOKENS_KEY,
    USER_KEY,
    InjectionConfig,
    InjectionError,
    UserAttnProcessor,
    UserProjection,
    has_injection,
    injection_config,
    injection_parameters,
    injection_state_dict,
    install_injection,
    load_injection,
    read_injection_config,
    remove_injection,
    save_injection,
    set_scale,
    user_processors,
    with_user,
    without_user,
)


@contextmanager
def personalized(backbone: Any, embedding: torch.Tensor, negative: str = "same") -> Iterator[Any]:
    """Within the block every conditioning the backbone builds carries ``embedding`` [D], so stock samplers
    (``generate``, guidance) sample the personalized model unchanged. ``negative``: the CFG unconditional
    branch gets the same embedding ("same": the profile conditions the model like a LoRA would) or a zero
    embedding ("zero": IP-Adapter's convention; CFG then amplifies the profile)."""
    if negative not in ("same", "zero"):
        raise ValueError(f"negative must be 'same' or 'zero', got {negative!r}")
    injection_config(backbone)  # fails clearly without an injection
    emb = embedding.detach().float().reshape(-1).to(backbone.device)
    enc, neg = backbone.encode_prompts, backbone.negative_cond

    def encode_prompts(prompts: list[str], *a: Any, **k: Any) -> Any:
        return with_user(enc(prompts, *a, **k), emb)

    def negative_cond(prompt: str, n: int) -> Any:
        return with_user(neg(prompt, n), emb if negative == "same" else torch.zeros_like(emb))

    backbone.encode_prompts, backbone.negative_cond = encode_prompts, negative_cond
    try:
        yield backbone
    finally:
        del backbone.encode_prompts, backbone.negative_cond  # the class methods again


@torch.no_grad()
def generate_personalized(
    backbone: Any, prompts: list[str], embeddings: torch.Tensor | None, *, latents: torch.Tensor | None = None,
    steps: int = 30, guidance_scale: float = 7.5, negative: str = "same", negative_prompt: str = "", seed: int = 0,
) -> torch.Tensor:
    """Images ``[B,3,H,W]`` for ``prompts``, row i conditioned on ``embeddings[i]`` (``[B, D]``, or ``[D]``
    for all rows; None: the model without a profile). One batch may mix users."""
    from ..sampling.solvers import sample_latents

    n = len(prompts)
    cond = backbone.encode_prompts(list(prompts))
    uncond = backbone.negative_cond(negative_prompt, n) if guidance_scale != 1.0 else None
    if embeddings is not None:
        e = embeddings.float().to(backbone.device)
        e = e.reshape(1, -1).expand(n, -1) if e.ndim == 1 else e
        cond = with_user(cond, e)
        if uncond is not None:
            uncond = with_user(uncond, e if negative == "same" else torch.zeros_like(e))
    gen = torch.Generator("cpu").manual_seed(seed)
    lat = sample_latents(backbone, cond, uncond, steps=steps, guidance_scale=guidance_scale, latents=latents,
                         generator=gen)
    return backbone.decode_latents(lat)
