"""MaPO, margin-aware preference optimisation (Hong, Paul et al., 2024), as in the official code
(mapo-t2i/mapo, ``utils.compute_loss``). Reference-free: no frozen model is evaluated.

For a pair (winner w, loser l) with the SAME noise eps and timestep t:

    e_w = mse(f_th(x_t^w, t, c), target^w)           e_l = mse(f_th(x_t^l, t, c), target^l)
    log_odds = a e_w / (exp(a e_w) - 1)  -  a e_l / (exp(a e_l) - 1)          (a = snr_value = 0.5)
    L = mean(e_w) - beta * mean(log sigmoid(T * log_odds))                    (T = 1000, beta = 0.1)

The first term is plain supervised fine-tuning on the winner; the second widens the margin between
the winner's and the loser's likelihood proxies. ``x/(exp(x)-1)`` is decreasing in x, so log_odds > 0
exactly when the winner is denoised better than the loser; ``implicit_acc`` reports that.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..backbones.base import Backbone, per_sample_mse
from .dpo import noised_pairs


def _odds_term(x: torch.Tensor) -> torch.Tensor:
    """x / (exp(x) - 1), continuous at 0 (limit 1); ``expm1`` keeps small x accurate."""
    safe = torch.where(x.abs() < 1e-12, torch.full_like(x, 1e-12), x)
    return safe / torch.expm1(safe)


@dataclass
class MaPO:
    beta: float = 0.1
    snr_value: float = 0.5
    num_train_timesteps: int = 1000

    def loss(self, batch: dict, backbone: Backbone) -> tuple[torch.Tensor, dict[str, float]]:
        xt, t, cond2, target = noised_pairs(batch, backbone)  # same eps and t for a pair
        err = per_sample_mse(backbone.predict(xt, t, cond2), target)
        b = err.shape[0] // 2
        e_w, e_l = err[:b], err[b:]
        a = self.snr_value
        log_odds = _odds_term(a * e_w) - _odds_term(a * e_l)
        ratio = F.logsigmoid(log_odds * self.num_train_timesteps)
        weight = batch.get("weight")
        if weight is not None:
            sft = (e_w * weight).sum() / weight.sum()
            margin = (ratio * weight).sum() / weight.sum()
        else:
            sft, margin = e_w.mean(), ratio.mean()
        loss = sft - self.beta * margin

        metrics = {
            "loss": loss.item(),
            "implicit_acc": (log_odds > 0).float().mean().item(),
            "log_odds": log_odds.mean().item(),
            "sft_loss": sft.item(),
            "margin_loss": -margin.item(),
            "model_mse_w": e_w.mean().item(),
            "model_mse_l": e_l.mean().item(),
        }
        return loss, metrics
