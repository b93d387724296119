"""Diffusion-DPO (Wallace et al., 2023), as in the official code (SalesforceAIResearch/DiffusionDPO).

For a pair (winner w, loser l) with the SAME noise eps and timestep t:

    e_th^w = mse(f_th(x_t^w, t, c), target^w)     e_ref^w = mse(f_ref(x_t^w, t, c), target^w)
    e_th^l = mse(f_th(x_t^l, t, c), target^l)     e_ref^l = mse(f_ref(x_t^l, t, c), target^l)
    z = -(beta / 2) * ((e_th^w - e_th^l) - (e_ref^w - e_ref^l))
    L = -log sigmoid(z)                    (sigmoid, default)
      = max(0, 1 - z)                      (hinge)
      = (z / beta - 1 / (2 beta))^2        (ipo: squared distance of the log-ratio z/beta to 1/(2 beta))

mse is the per-sample MEAN over latent elements (beta = 5000 is tied to it); the target is the
backbone's (eps, v, or flow velocity). At initialisation the policy equals the reference, so z = 0
exactly, L = ln 2, and the implicit accuracy mean[z > 0] = 0 (no credit for ties, as official).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from ..backbones.base import Backbone, Cond, per_sample_mse
from .base import Objective, register


def noised_pairs(batch: dict, backbone: Backbone) -> tuple[torch.Tensor, torch.Tensor, Cond, torch.Tensor]:
    """Winners then losers ``[2B]`` noised with the SAME eps and t per pair: ``(x_t, t, cond, target)``."""
    x0_w, x0_l = batch["latents_w"], batch["latents_l"]
    b = x0_w.shape[0]
    x0 = torch.cat([x0_w, x0_l])
    noise = torch.randn(x0_w.shape, device=x0.device).repeat(2, *([1] * (x0.ndim - 1)))  # shared eps
    t = backbone.sample_timesteps(b, device=x0.device).repeat(2)  # shared t
    return backbone.add_noise(x0, noise, t), t, batch["cond"].repeat(2), backbone.target(x0, noise, t)


LossType = Literal["sigmoid", "hinge", "ipo"]


def preference_losses(z: torch.Tensor, beta: float, loss_type: str) -> torch.Tensor:
    """Per-pair loss of the implicit reward margin ``z`` (see the module docstring)."""
    if loss_type == "sigmoid":
        return -F.logsigmoid(z)
    if loss_type == "hinge":
        return F.relu(1 - z)
    if loss_type == "ipo":
        return (z / beta - 1 / (2 * beta)) ** 2
    raise ValueError(f"loss_type must be sigmoid, hinge or ipo, got {loss_type!r}")


def weighted_mean(x: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """Mean of ``x`` [B], weighted by ``weight`` [B] when given (pair weights of ranked data)."""
    return (x * weight).sum() / weight.sum() if weight is not None else x.mean()


@register("dpo")
@dataclass
class DiffusionDPO(Objective):
    beta: Annotated[float, Field(gt=0)] = 5000.0
    loss_type: LossType = "sigmoid"

    def loss(self, batch: dict, backbone: Backbone) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        xt, t, cond2, target = noised_pairs(batch, backbone)
        err = per_sample_mse(backbone.predict(xt, t, cond2), target)
        err_ref = per_sample_mse(backbone.predict(xt, t, cond2, reference=True), target)
        return self.preference_loss(err, err_ref, batch.get("weight"))

    def preference_loss(
        self, err: torch.Tensor, err_ref: torch.Tensor, weight: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The DPO loss from per-sample errors ``[2B]`` (winners first) of the policy and the reference."""
        b = err.shape[0] // 2
        model_diff = err[:b] - err[b:]
        ref_diff = err_ref[:b] - err_ref[b:]
        z = -0.5 * self.beta * (model_diff - ref_diff)
        loss = weighted_mean(preference_losses(z, self.beta, self.loss_type), weight)

        e = err.detach()
        metrics = {
            "loss": loss.detach(),
            "implicit_acc": (z.detach() > 0).float().mean(),
            "logit": z.detach().mean(),
            "model_mse": e.mean(),
            "ref_mse": err_ref.detach().mean(),
            "model_mse_w": e[:b].mean(),
            "model_mse_l": e[b:].mean(),
        }
        return loss, metrics
