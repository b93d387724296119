"""DDIM-InPO (Lu et al., CVPR 2025): Diffusion-DPO on noise implied by DDIM inversion.

Instead of drawing eps, each clean latent (winner and loser separately) is DDIM-inverted by the
CURRENT policy (text-conditioned, no CFG, no gradient) up to the sampled level t_s, and the noise that
the inverted latent implies is the target:

    x_inv = Invert_th(x0, c, 0 -> t_s)            (<= ``inversion_steps`` no-grad forwards per image)
    eps~  = (x_inv - alpha(t_s) x0) / sigma(t_s)
    then the Diffusion-DPO loss (``loss_type`` sigmoid, the official one; hinge; ipo) with (x_inv, t_s, target(x0, eps~, t_s)) in place of
    (x_t, t, target(x0, eps, t)):   z = -(beta/2) ((e_th^w - e_th^l) - (e_ref^w - e_ref^l)),  L = -log sigmoid(z)

Winner and loser share t_s but get different eps~; each pair draws its own t_s (the official code
draws one per device batch, which there is a single pair). The inversion is written here on a fixed grid
(levels 0, T/n, 2T/n, ...; ``Backbone.ddim_step`` towards the noisier level, with the model called at
the source level, as diffusers 0.20's DDIMInverseScheduler did) rather than through a diffusers
scheduler, whose inverse semantics changed between versions. Two deliberate differences from the
official code: the clean latent is treated as level 0 (the official code labels it -99 with
alpha_bar[0]), and the last step lands exactly on t_s instead of on the next grid level above it, so
eps~ is the noise of a latent truly at t_s. ``inversion_eta`` adds eta * DDIM-sigma noise after each
step (0.1 officially). Epsilon, v and flow models work alike: on a flow the inverse step is the Euler
step of the ODE towards noise.

Cost: up to ``inversion_steps`` (10) extra no-grad forwards per image per training step, on top of
DPO's four forwards per pair (two with gradient); about 3-6x DPO's time per step at equal batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import torch
from pydantic import Field

from ..backbones.base import Backbone, Cond, per_sample_mse
from ..sampling.trajectories import ddim_invert
from .base import Objective, register
from .dpo import DiffusionDPO, LossType


@register("inpo")
@dataclass
class InPO(Objective):
    beta: Annotated[float, Field(gt=0)] = 2000.0
    inversion_steps: Annotated[int, Field(ge=1)] = 10
    inversion_eta: Annotated[float, Field(ge=0)] = 0.1
    loss_type: LossType = "sigmoid"

    def __post_init__(self) -> None:
        super().__post_init__()
        self._dpo = DiffusionDPO(beta=self.beta, loss_type=self.loss_type)

    def loss(self, batch: dict, backbone: Backbone) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x0_w, x0_l, cond = batch["latents_w"], batch["latents_l"], batch["cond"]
        b = x0_w.shape[0]
        x0 = torch.cat([x0_w, x0_l])
        t = backbone.sample_timesteps(b, device=x0.device).repeat(2)  # shared t_s for the pair
        cond2: Cond = cond.repeat(2)

        x_inv = ddim_invert(backbone, x0, cond2, t, self.inversion_steps, self.inversion_eta)
        a, s = backbone._bcast(backbone.alpha(t), x0), backbone._bcast(backbone.sigma(t), x0)
        eps = ((x_inv.float() - a * x0.float()) / s.clamp_min(1e-6)).to(x0.dtype)  # eps~: distinct for w and l
        target = backbone.target(x0, eps, t)

        err = per_sample_mse(backbone.predict(x_inv, t, cond2), target)
        err_ref = per_sample_mse(backbone.predict(x_inv, t, cond2, reference=True), target)
        loss, metrics = self._dpo.preference_loss(err, err_ref, batch.get("weight"))
        metrics["inverted_eps_std"] = eps.detach().float().std()
        return loss, metrics
