"""DDIM-InPO (Lu et al., CVPR 2025): Diffusion-DPO on noise implied by DDIM inversion.

Instead of drawing eps, each clean latent (winner and loser separately) is DDIM-inverted by the
CURRENT policy (text-conditioned, no CFG, no gradient) up to the sampled level t_s, and the noise that
the inverted latent implies is the target:

    x_inv = Invert_th(x0, c, 0 -> t_s)            (<= ``inversion_steps`` no-grad forwards per image)
    eps~  = (x_inv - alpha(t_s) x0) / sigma(t_s)
    then the official Diffusion-DPO loss with (x_inv, t_s, target(x0, eps~, t_s)) in place of
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

import torch

from ..backbones.base import Backbone, Cond, per_sample_mse
from .dpo import DiffusionDPO


@torch.no_grad()
def ddim_invert(backbone: Backbone, x0: torch.Tensor, cond: Cond, t_target: torch.Tensor, steps: int = 10,
                eta: float = 0.0) -> torch.Tensor:
    """Invert clean latents ``x0`` [B,...] to per-sample levels ``t_target`` [B] with the current policy.

    Grid levels tau_k = k * T / steps; while tau_k < t_target a sample moves tau_k -> min(tau_k + T/steps,
    t_target) using the model output at (x, tau_k); samples already at their target stay put."""
    x = x0.clone()
    b = x.shape[0]
    t_target = t_target.float()
    stride = backbone.num_train_timesteps / steps
    for k in range(steps):
        tau = torch.full((b,), k * stride, device=x.device)
        active = tau < t_target
        if not bool(active.any()):
            break
        nxt = torch.minimum(tau + stride, t_target)
        if backbone.prediction_type != "flow":  # discrete timesteps for the UNet
            tau, nxt = tau.round().long(), nxt.round().long()
        out = backbone.predict(x, tau, cond)
        x_new = backbone.ddim_step(out, x, tau, nxt)
        if eta > 0:
            a, s = backbone.alpha(tau), backbone.sigma(tau)
            a2, s2 = backbone.alpha(nxt), backbone.sigma(nxt)
            var = (s**2 / s2.clamp_min(1e-12) ** 2) * (1 - a2**2 / a.clamp_min(1e-12) ** 2)
            std = backbone._bcast(eta * var.clamp_min(0).sqrt(), x)
            x_new = x_new + std.to(x.dtype) * torch.randn(x.shape, device=x.device).to(x.dtype)
        mask = backbone._bcast(active.float(), x).bool()
        x = torch.where(mask, x_new, x)
    return x


@dataclass
class InPO:
    beta: float = 2000.0
    inversion_steps: int = 10
    inversion_eta: float = 0.1

    def __post_init__(self) -> None:
        self._dpo = DiffusionDPO(beta=self.beta)

    def loss(self, batch: dict, backbone: Backbone) -> tuple[torch.Tensor, dict[str, float]]:
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
        metrics["inverted_eps_std"] = eps.float().std().item()
        return loss, metrics
