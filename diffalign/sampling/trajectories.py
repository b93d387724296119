"""Trajectories that objectives run: DDIM inversion (InPO) and deterministic rollouts from noise (DRO's
online negatives). One short function per trajectory, on the backbone's alpha/sigma contract
(``Backbone.ddim_step`` is DDIM on eps/v models and the Euler step of the ODE on flows).

``rollout``: deterministic DDIM without CFG (the official DRO sampler runs at guidance 1.0) on a
per-sample jittered grid: the first state is pure noise at the noisiest level, the following levels are
``T - i T/n - o`` with one offset ``o ~ U[0, jitter T)`` per sample (the official code perturbs
DPM-Solver++'s 20-step grid by U{0..49}). First-order DDIM instead of DPM-Solver++ so that per-sample
grids need no patched scheduler.
"""

from __future__ import annotations

import torch

from ..backbones.base import Backbone, Cond
from ..backbones.modules import unwrap


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



def rollout_levels(backbone: Backbone, batch: int, steps: int, jitter: float, device: torch.device) -> torch.Tensor:
    """Per-sample levels ``[steps + 1, B]`` from the noisiest level down to 0 (clean)."""
    big_t = backbone.num_train_timesteps
    stride = big_t / steps
    if backbone.prediction_type != "flow":  # whole timesteps, below one stride (official: randint(0, 50))
        offset = torch.randint(0, int(min(jitter * big_t, stride - 1)) + 1, (batch,)).float()
    else:
        offset = torch.rand(batch) * min(jitter * big_t, stride * 0.999)
    i = torch.arange(steps + 1, dtype=torch.float32)[:, None]
    levels = (big_t - i * stride - offset[None]).clamp(0, backbone.max_timestep)
    levels[0] = backbone.max_timestep
    levels[-1] = 0
    if backbone.prediction_type != "flow":
        levels = levels.floor().clamp_min(0)
        levels[1:-1] = levels[1:-1].clamp_min(1)
    return levels.to(device)


@torch.no_grad()
def rollout(backbone: Backbone, cond: Cond, steps: int, jitter: float) -> dict[str, torch.Tensor]:
    """Sample from noise with the model as it is now; returns the trajectory ``{"t": [S,B], "xt": [S,B,...],
    "pred": [S,B,...], "x0": [B,...]}``, where ``pred[i]`` is the model output the sampler used at
    state ``xt[i]`` (the state before step i) and level ``t[i]``."""
    b = len(cond)
    shape = backbone.latent_shape(b)
    dtype = next(unwrap(backbone.denoiser).parameters()).dtype
    x = torch.randn(shape, device=backbone.device).to(dtype)
    levels = rollout_levels(backbone, b, steps, jitter, backbone.device)
    if backbone.prediction_type != "flow":
        levels = levels.long()  # UNet timesteps are integers
    ts, xs, preds = [], [], []
    for i in range(steps):
        t, t_next = levels[i], levels[i + 1]
        out = backbone.predict(x, t, cond)
        ts.append(t)
        xs.append(x)
        preds.append(out)
        x = backbone.ddim_step(out, x, t, t_next)
    return {"t": torch.stack(ts), "xt": torch.stack(xs), "pred": torch.stack(preds), "x0": x}
