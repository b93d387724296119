"""Statistics for comparing two models on the same samples.

``paired_bootstrap(a, b)``: ``a[i]`` and ``b[i]`` are the scores of sample i under the two models
(same prompt, same starting noise), so the gain is estimated from the per-sample differences and
resampled over samples: a paired percentile-bootstrap confidence interval of ``mean(b - a)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Interval:
    mean: float
    low: float
    high: float
    n: int
    level: float

    def __str__(self) -> str:
        return f"{self.mean:+.3f} [{self.low:+.3f}, {self.high:+.3f}]"


def paired_bootstrap(a: torch.Tensor | list[float], b: torch.Tensor | list[float], n_boot: int = 2000,
                     level: float = 0.95, seed: int = 0) -> Interval:
    """The mean of ``b - a`` over paired samples and its percentile-bootstrap interval."""
    a_t, b_t = torch.as_tensor(a, dtype=torch.float64).flatten(), torch.as_tensor(b, dtype=torch.float64).flatten()
    if a_t.shape != b_t.shape or a_t.numel() == 0:
        raise ValueError(f"paired_bootstrap: need two score lists of one non-zero length, got {a_t.numel()} and "
                         f"{b_t.numel()}")
    if not 0 < level < 1:
        raise ValueError(f"paired_bootstrap: level must be in (0, 1), got {level}")
    d = b_t - a_t
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(d.numel(), (n_boot, d.numel()), generator=g)
    means = d[idx].mean(1)
    q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)
    lo, hi = torch.quantile(means, q).tolist()
    return Interval(float(d.mean()), lo, hi, d.numel(), level)
