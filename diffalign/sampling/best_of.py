"""Best-of-N and rejection sampling by any reward (or ``rewards.Ensemble``).

Best-of-N draws N candidates per prompt and keeps the one the reward scores highest. Rejection
sampling (``threshold``) draws candidates one round at a time and stops, per prompt, at the first
whose score reaches the threshold; a prompt that never reaches it keeps its best of N.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class Selection:
    images: torch.Tensor  # [P,3,H,W] the kept image per prompt
    scores: torch.Tensor  # [P] its reward
    tries: torch.Tensor  # [P] candidates drawn for it
    chosen: torch.Tensor  # [P] the round (0-based) the kept image comes from


@torch.no_grad()
def best_of_n(
    sample_round: Callable[[int, list[int]], torch.Tensor],
    prompts: list[str],
    reward: Any,
    n: int,
    threshold: float | None = None,
) -> Selection:
    """``sample_round(k, idx)`` returns candidate ``k`` (images ``[len(idx),3,H,W]`` in [0,1]) for the
    prompts at positions ``idx``; it must be deterministic in (k, prompt position)."""
    if n < 1:
        raise ValueError(f"best-of-N needs N >= 1, got {n}")
    p = len(prompts)
    best: torch.Tensor | None = None
    scores = torch.full((p,), float("-inf"))
    tries = torch.zeros(p, dtype=torch.long)
    chosen = torch.zeros(p, dtype=torch.long)
    pending = list(range(p))
    for k in range(n):
        if not pending:
            break
        imgs = sample_round(k, pending).detach().float().cpu()
        r = reward(imgs, [prompts[i] for i in pending]).float().cpu()
        if best is None:
            best = torch.zeros(p, *imgs.shape[1:], dtype=imgs.dtype)
        idx = torch.tensor(pending)
        tries[idx] += 1
        better = r > scores[idx]  # NaN scores (e.g. no face found) never win
        if k == 0:
            better = torch.ones_like(better)
        scores[idx[better]] = r[better]
        chosen[idx[better]] = k
        best[idx[better]] = imgs[better]
        if threshold is not None:
            pending = [i for i in pending if not scores[i] >= threshold]
    assert best is not None
    return Selection(best, scores, tries, chosen)
