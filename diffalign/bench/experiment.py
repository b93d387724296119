"""Toy-world evaluation: score a model on held-out prompts (rewards, oracle metrics, diversity).

Every image's starting noise is seeded by (seed, image index), so a prompt's images are the same
whatever the batch size, and "before" and "after" images share their noise.
"""

from __future__ import annotations

from typing import Any

import torch

from ..backbones.base import Backbone
from ..toyworld.pairs import TOY_GUIDANCE, sample_images, seeded_latents

ORACLES = ("toy_color", "toy_shape", "toy_position", "toy_oracle")
__all__ = ["ORACLES", "TOY_GUIDANCE", "diversity", "evaluate", "load_rewards", "sample_images", "score_all",
           "seeded_latents"]


def load_rewards(names: list[str], clip_path: str | None = None) -> dict[str, Any]:
    """Each named reward, built alone (``toy_clip`` reads ``clip_path``)."""
    import rewards

    return {n: rewards.from_spec(n, paths={"toy_clip": clip_path}) for n in names}


@torch.no_grad()
def score_all(rs: dict[str, Any], images: torch.Tensor, prompts: list[str], batch_size: int = 256) -> dict[str, torch.Tensor]:
    out = {}
    for name, r in rs.items():
        out[name] = torch.cat([
            r(images[i : i + batch_size], prompts[i : i + batch_size]).float().cpu()
            for i in range(0, len(prompts), batch_size)
        ])
    return out


def diversity(images: torch.Tensor, groups: int) -> float:
    """Mean pairwise RMS pixel distance between the images of each prompt (``groups`` seeds per prompt)."""
    x = images.reshape(-1, groups, *images.shape[1:]).flatten(2)
    d = torch.cdist(x, x) / x.shape[-1] ** 0.5
    iu = torch.triu_indices(groups, groups, 1)
    return float(d[:, iu[0], iu[1]].mean())


def evaluate(
    backbone: Backbone, prompts: list[str], rs: dict[str, Any], seeds: int = 2, steps: int = 20,
    guidance_scale: float = TOY_GUIDANCE, seed: int = 1234, progress: bool = False,
) -> tuple[dict[str, float], torch.Tensor]:
    """Mean of every reward over ``prompts`` x ``seeds`` samples, plus ``diversity``; returns (metrics, images)."""
    expanded = [p for p in prompts for _ in range(seeds)]
    imgs = sample_images(backbone, expanded, seed=seed, steps=steps, guidance_scale=guidance_scale,
                         progress=progress, desc="evaluating")
    scores = score_all(rs, imgs, expanded)
    metrics = {k: float(v.mean()) for k, v in scores.items()}
    if seeds > 1:
        metrics["diversity"] = diversity(imgs, seeds)
    return metrics, imgs


