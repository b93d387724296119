"""Diffusion-DRO (Wu et al., NeurIPS 2025): rank expert demonstrations above the policy's own samples,
as in the official code (basiclab/DiffusionDRO, train.py).

Before each loss (the ``collect`` hook) a lagged copy of the policy samples a trajectory for the batch's prompts into a
replay buffer (``replay.py``); the loss draws a state (t, x_t^pi, out^pi) from the buffer, where
out^pi is the sampler's own model output at that state, and noises the expert x0^E to the same t:

    x_t^E = alpha_t x0^E + sigma_t eps,   target^E = target(x0^E, eps, t)
    l^E  = mse(f_th(x_t^E, t, c), target^E) - mse(f_ref(x_t^E, t, c), target^E)     relative error, expert
    l^pi = mse(f_th(x_t^pi, t, c), out^pi)  - mse(f_ref(x_t^pi, t, c), out^pi)       relative error, policy
    L = mean(max(0, l^E - l^pi + margin))                                            (margin = 1e-3)

The loss is zero once the expert's relative error is below the policy sample's by the margin: it
pushes the expert's error down and the policy sample's error up until then. No reward model is used
in training; a reward only picks the experts offline (``diffalign select-experts``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

import torch
import torch.nn.functional as F
from pydantic import Field

from ..backbones.base import Backbone, Cond, per_sample_mse
from ..sampling.trajectories import rollout
from .base import Objective, register
from .replay import LaggedSampler, ReplayBuffer


@register("dro")
@dataclass
class DiffusionDRO(Objective):
    margin: Annotated[float, Field(ge=0)] = 0.001
    rollout_steps: Annotated[int, Field(ge=1)] = 20
    timestep_jitter: Annotated[float, Field(ge=0, le=1)] = 0.05
    buffer_size: Annotated[int, Field(ge=1)] = 4
    refresh_every: Annotated[int, Field(ge=1)] = 1

    data_kind = "experts"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.buffer = ReplayBuffer(self.buffer_size)
        self.lagged = LaggedSampler(self.refresh_every)

    # --- hooks called by the training loop ----------------------------------------------------------
    def setup(self, backbone: Backbone, reward: Any = None) -> None:
        self.lagged.refresh(backbone.denoiser)

    def on_update(self, backbone: Backbone) -> None:
        self.lagged.on_update(backbone.denoiser)

    def state_dict(self) -> dict[str, Any]:
        return {"buffer": self.buffer.state_dict(), "lagged": self.lagged.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.buffer.load_state_dict(state["buffer"])
        self.lagged.load_state_dict(state["lagged"])

    def collect(self, batch: dict, backbone: Backbone) -> None:
        """Before each loss: roll out the lagged policy for the batch's prompts and store the trajectory."""
        with self.lagged.active(backbone.denoiser):
            traj = rollout(backbone, batch["cond"], self.rollout_steps, self.timestep_jitter)
        self.buffer.add(traj, batch["latents"], batch["cond"])

    # --- the objective -------------------------------------------------------------------------------
    def ranking_loss(self, err: torch.Tensor, err_ref: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The hinge from per-sample errors ``[2B]`` (experts first, then policy states)."""
        b = err.shape[0] // 2
        rel_expert = err[:b] - err_ref[:b]
        rel_policy = err[b:] - err_ref[b:]
        diff = rel_expert - rel_policy
        loss = F.relu(diff + self.margin).mean()
        d, e = diff.detach(), err.detach()
        metrics = {
            "loss": loss.detach(),
            "implicit_acc": (d < 0).float().mean(),
            "margin_met": (d + self.margin <= 0).float().mean(),
            "rel_err_expert": rel_expert.detach().mean(),
            "rel_err_policy": rel_policy.detach().mean(),
            "model_mse_expert": e[:b].mean(),
            "model_mse_policy": e[b:].mean(),
        }
        return loss, metrics

    def loss(self, batch: dict, backbone: Backbone) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        t, x0_e, cond, xt_pi, out_pi = self.buffer.sample(backbone.device)
        noise = torch.randn(x0_e.shape, device=x0_e.device)
        xt_e = backbone.add_noise(x0_e, noise, t)
        target_e = backbone.target(x0_e, noise, t)

        xt = torch.cat([xt_e, xt_pi.to(xt_e.dtype)])
        tt = torch.cat([t, t])
        cond2: Cond = cond.repeat(2)
        target = torch.cat([target_e, out_pi.to(target_e.dtype)])
        err = per_sample_mse(backbone.predict(xt, tt, cond2), target)
        err_ref = per_sample_mse(backbone.predict(xt, tt, cond2, reference=True), target)
        loss, metrics = self.ranking_loss(err, err_ref)
        metrics["buffer"] = torch.tensor(float(len(self.buffer)))
        return loss, metrics
