"""MaPO, margin-aware preference optimisation (Hong, Paul et al., 2024), as in the official code
(mapo-t2i/mapo, ``utils.compute_loss``). Reference-free: no frozen model is evaluated.

For a pair (winner w, loser l) with the SAME noise eps and timestep t:

    e_w = mse(f_th(x_t^w, t, c), target^w)           e_l = mse(f_th(x_t^l, t, c), target^l)
    log_odds = a e_w / (exp(a e_w) - 1)  -  a e_l / (exp(a e_l) - 1)          (a = snr_value = 0.5)
    L = mean(e_w) - beta * mean(log sigmoid(T * log_odds))                    (T = temperature = 1000, beta = 0.1)

The first term is plain supervised fine-tuning on the winner; the second widens the margin between
the winner's and the loser's likelihood proxies. ``x/(exp(x)-1)`` is decreasing in x, so log_odds > 0
exactly when the winner is denoised better than the loser; ``implicit_acc`` reports that.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import torch
import torch.nn.functional as F
from pydantic import Field

from ..backbones.base import Backbone, per_sample_mse
from .base import Objective, register
from .dpo import noised_pairs, weighted_mean


def _odds_term(x: torch.Tensor) -> torch.Tensor:
    """x / (exp(x) - 1), continuous at 0 (limit 1); ``expm1`` keeps small x accurate."""
    safe = torch.where(x.abs() < 1e-12, torch.full_like(x, 1e-12), x)
    return safe / torch.expm1(safe)


@register("mapo")
@dataclass
class MaPO(Objective):
    beta: Annotated[float, Field(ge=0)] = 0.1
    snr_value: Annotated[float, Field(gt=0)] = 0.5
    temperature: Annotated[float, Field(gt=0)] = 1000.0  # T; the official code names it num_train_timesteps

    def loss(self, batch: dict, backbone: Backbone) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        xt, t, cond2, target = noised_pairs(batch, backbone)  # same eps and t for a pair
        err = per_sample_mse(backbone.predict(xt, t, cond2), target)
        b = err.shape[0] // 2
        e_w, e_l = err[:b], err[b:]
        a = self.snr_value
        log_odds = _odds_term(a * e_w) - _odds_term(a * e_l)
        ratio = F.logsigmoid(log_odds * self.temperature)
        weight = batch.get("weight")
        sft, margin = weighted_mean(e_w, weight), weighted_mean(ratio, weight)
        loss = sft - self.beta * margin

        lo = log_odds.detach()
        metrics = {
            "loss": loss.detach(),
            "implicit_acc": (lo > 0).float().mean(),
            "log_odds": lo.mean(),
            "sft_loss": sft.detach(),
            "margin_loss": -margin.detach(),
            "model_mse_w": e_w.detach().mean(),
            "model_mse_l": e_l.detach().mean(),
        }
        return loss, metrics
