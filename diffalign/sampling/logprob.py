"""Stochastic sampling steps with log-probabilities, for policy-gradient RL (DDPO, Flow-GRPO).

Every step is written once on the backbone's noise contract ``x_t = a_t x0 + s_t eps`` (``Backbone.alpha``,
``Backbone.sigma``) and the model's clean/noise estimates ``x0_hat = to_x0(out)``, ``eps_hat = to_eps(out)``,
so each runs on every family: on a flow (a = 1 - s, out = eps - x0) and on an eps or v UNet. A step goes
from level ``t`` to ``t_next < t`` (per-sample levels ``[B]``) and returns ``Step(x_next, mean, std,
logprob)`` where the transition is Gaussian ``x_next ~ N(mean, std^2 I)`` and

    logprob = mean over latent elements of  -(x_next - mean)^2 / (2 std^2) - log std - log sqrt(2 pi)

(a per-element MEAN, as both reference codes take it: ddpo-pytorch ``ddim_step_with_logprob`` and
flow_grpo ``sde_step_with_logprob``; it is why their PPO clip ranges are 1e-4). With ``x_next`` given the
step scores that transition instead of drawing one (recomputing the log-probability under the current
policy, with grad). ``std = 0`` (a deterministic step) gives ``logprob = 0``: such a step has no density
and the objectives never train on it.

Steps (a, s at t; a', s' at t_next; the deterministic DDIM step is ``a' x0_hat + s' eps_hat``):

* ``ddim_eta`` (DDIM, Song et al. 2021, eta > 0; DDPO's step). The posterior variance of the forward
  process between the two levels, scaled by eta^2:
      std^2 = eta^2 (s'^2 / s^2) (s^2 - a^2 s'^2 / a'^2)      (= eta^2 (1-abar')/(1-abar) (1 - abar/abar') on a VP UNet)
      mean  = a' x0_hat + sqrt(s'^2 - std^2) eps_hat
* ``flow_sde`` (Flow-GRPO, Liu et al. 2025, Euler-Maruyama of the marginal-preserving reverse SDE): the
  deterministic step plus a Langevin correction with the score ``-eps_hat / s``:
      std   = eta sqrt(s / a) sqrt(s - s')                      (Flow-GRPO: sigma_t sqrt(-dt), sigma_t = a_n sqrt(s/(1-s)))
      mean  = a' x0_hat + s' eps_hat - std^2 / (2 s) eps_hat
  On a flow this is exactly flow_grpo's ``mu = x (1 + sigma_t^2 dt / (2 s)) + v (1 + sigma_t^2 (1-s) / (2 s)) dt``;
  at s = 1 (a = 0) the ``a`` in the denominator is replaced by the next level's, as flow_grpo replaces
  ``1 - sigma`` by ``1 - sigmas[1]``.
* ``cps`` (Coefficients-Preserving Sampling, Wang & Yu 2025; Flow-GRPO's ``sde_type='cps'``):
      std   = s' sin(eta pi / 2)
      mean  = a' x0_hat + sqrt(s'^2 - std^2) eps_hat
* ``ode``: the deterministic DDIM step (Euler on a flow), std = 0.

``rollout`` samples a batch with classifier-free guidance as ``sampling.solvers.guided_output`` (no grad)
and returns every state, level and transition log-probability; ``transition_logprob`` recomputes one
transition under the current policy (with grad) or the reference (adapter disabled).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..backbones.base import Backbone, Cond
from .solvers import fresh_scheduler, guided_output

SAMPLERS = ("ddim_eta", "flow_sde", "cps", "ode")


@dataclass
class Step:
    x_next: torch.Tensor  # [B, ...]
    mean: torch.Tensor  # [B, ...] fp32
    std: torch.Tensor  # [B] fp32
    logprob: torch.Tensor  # [B] fp32, per-element mean


def _levels(backbone: Backbone, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, s) at levels ``t`` [B] broadcast to ``like``; a negative level is the clean end (a=1, s=0)."""
    clean = t < 0
    tt = t.clamp_min(0)
    a = torch.where(clean, torch.ones_like(tt, dtype=torch.float32), backbone.alpha(tt).float())
    s = torch.where(clean, torch.zeros_like(tt, dtype=torch.float32), backbone.sigma(tt).float())
    return backbone._bcast(a, like), backbone._bcast(s, like)


def gaussian_logprob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Per-element mean of log N(x; mean, std^2) ``[B]``; 0 where std = 0 (no density)."""
    std_b = std.reshape(-1, *([1] * (mean.ndim - 1)))
    safe = torch.where(std_b > 0, std_b, torch.ones_like(std_b))
    lp = -((x.float() - mean) ** 2) / (2 * safe**2) - torch.log(safe) - 0.5 * math.log(2 * math.pi)
    return torch.where(std > 0, lp.flatten(1).mean(1), torch.zeros_like(std))


def _finish(mean: torch.Tensor, std: torch.Tensor, x: torch.Tensor, x_next: torch.Tensor | None,
            noise: torch.Tensor | None) -> Step:
    if x_next is None:
        z = noise if noise is not None else torch.randn_like(mean)
        x_next = (mean + std.reshape(-1, *([1] * (mean.ndim - 1))) * z.float()).to(x.dtype)
    return Step(x_next, mean, std, gaussian_logprob(x_next, mean, std))


def ddim_eta_step(backbone: Backbone, out: torch.Tensor, x: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor,
                  eta: float = 1.0, x_next: torch.Tensor | None = None, noise: torch.Tensor | None = None) -> Step:
    """DDIM with eta: std^2 = eta^2 (s'^2/s^2)(s^2 - a^2 s'^2/a'^2), mean = a' x0_hat + sqrt(s'^2 - std^2) eps_hat."""
    a, s = _levels(backbone, t, x)
    a2, s2 = _levels(backbone, t_next, x)
    x0, eps = backbone.to_x0(out, x, t).float(), backbone.to_eps(out, x, t).float()
    var = (eta**2 * (s2**2 / s**2) * (s**2 - a**2 * s2**2 / a2**2)).clamp_min(0)
    mean = a2 * x0 + (s2**2 - var).clamp_min(0).sqrt() * eps
    return _finish(mean, var.sqrt().flatten(1)[:, 0], x, x_next, noise)


def flow_sde_step(backbone: Backbone, out: torch.Tensor, x: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor,
                  eta: float = 0.7, x_next: torch.Tensor | None = None, noise: torch.Tensor | None = None) -> Step:
    """Flow-GRPO's SDE: std = eta sqrt(s/a) sqrt(s - s'), mean = a' x0_hat + s' eps_hat - std^2/(2 s) eps_hat."""
    a, s = _levels(backbone, t, x)
    a2, s2 = _levels(backbone, t_next, x)
    x0, eps = backbone.to_x0(out, x, t).float(), backbone.to_eps(out, x, t).float()
    a_safe = torch.where(a > 0, a, a2)  # s = 1: flow_grpo divides by 1 - sigmas[1]
    std = eta * (s / a_safe).sqrt() * (s - s2).clamp_min(0).sqrt()
    mean = a2 * x0 + s2 * eps - std**2 / (2 * s) * eps
    return _finish(mean, std.flatten(1)[:, 0], x, x_next, noise)


def cps_step(backbone: Backbone, out: torch.Tensor, x: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor,
             eta: float = 0.8, x_next: torch.Tensor | None = None, noise: torch.Tensor | None = None) -> Step:
    """Coefficients-preserving: std = s' sin(eta pi/2), mean = a' x0_hat + sqrt(s'^2 - std^2) eps_hat."""
    a2, s2 = _levels(backbone, t_next, x)
    x0, eps = backbone.to_x0(out, x, t).float(), backbone.to_eps(out, x, t).float()
    std = s2 * math.sin(eta * math.pi / 2)
    mean = a2 * x0 + (s2**2 - std**2).clamp_min(0).sqrt() * eps
    return _finish(mean, std.flatten(1)[:, 0], x, x_next, noise)


def ode_step(backbone: Backbone, out: torch.Tensor, x: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor,
             eta: float = 0.0, x_next: torch.Tensor | None = None, noise: torch.Tensor | None = None) -> Step:
    """Deterministic DDIM (Euler on a flow): mean = a' x0_hat + s' eps_hat, std = 0, logprob = 0."""
    a2, s2 = _levels(backbone, t_next, x)
    mean = a2 * backbone.to_x0(out, x, t).float() + s2 * backbone.to_eps(out, x, t).float()
    std = torch.zeros(x.shape[0], device=x.device)
    return Step(mean.to(x.dtype) if x_next is None else x_next, mean, std, torch.zeros_like(std))


STEPS = {"ddim_eta": ddim_eta_step, "flow_sde": flow_sde_step, "cps": cps_step, "ode": ode_step}


def step_fn(name: str):
    if name not in STEPS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
    return STEPS[name]


def level_grid(backbone: Backbone, steps: int) -> torch.Tensor:
    """The ``steps + 1`` levels of a sampling run, noisiest first, in model units. Flows: the stock
    pipeline's sigmas (with its shift) times T, ending at 0. UNets: DDIM's grid from the model's
    scheduler config (``timestep_spacing``, ``steps_offset``), ending where DDIM ends: the clean level
    (-1 here) with ``set_alpha_to_one``, else level 0 (abar_0 < 1, as DDIM's final alpha)."""
    if backbone.prediction_type == "flow":
        sched = fresh_scheduler(backbone)
        ts = backbone.set_timesteps(sched, steps, backbone.latent_shape(1)).float().cpu()
        return torch.cat([ts, ts.new_zeros(1)])
    from diffusers import DDIMScheduler

    sched = DDIMScheduler.from_config(backbone.pipe.scheduler.config)
    sched.set_timesteps(steps)
    ts = sched.timesteps.long()
    final = -1 if sched.config.get("set_alpha_to_one", True) else 0
    return torch.cat([ts, ts.new_full((1,), final)])


def _scale(backbone: Backbone, guidance_scale: float, uncond: Cond | None) -> tuple[float, Cond | None]:
    """FLUX-dev takes guidance as an embedding (one call); others run CFG when scale != 1."""
    if getattr(backbone, "uses_embedded_guidance", False):
        backbone.embedded_guidance = guidance_scale
        return 1.0, None
    return guidance_scale, (uncond if guidance_scale != 1.0 else None)


@torch.no_grad()
def rollout(backbone: Backbone, cond: Cond, uncond: Cond | None, noise: torch.Tensor, *, steps: int,
            sampler: str = "ddim_eta", eta: float = 1.0, guidance_scale: float = 1.0,
            sde_steps: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Sample ``B = len(cond)`` latents; ``noise [steps + 1, B, ...]`` holds the start (``noise[0]``) and
    each step's Gaussian draw, so a sample's trajectory depends on its own noise only. ``sde_steps``
    (bool ``[steps]``) runs the stochastic ``sampler`` only there and the ODE elsewhere (Flow-GRPO-Fast's
    window). Returns ``{"xs": [steps+1, B, ...], "levels": [steps+1, B], "logprob": [steps, B],
    "std": [steps, B]}`` (``xs[-1]`` is the clean sample)."""
    scale, unc = _scale(backbone, guidance_scale, uncond)
    b = len(cond)
    grid = level_grid(backbone, steps).to(backbone.device)
    dtype = next(backbone.denoiser.parameters()).dtype
    x = noise[0].to(backbone.device, dtype)
    xs, lps, stds = [x], [], []
    for i in range(steps):
        t, t_next = grid[i].expand(b), grid[i + 1].expand(b)
        out = guided_output(backbone, x, t, cond, unc, scale)
        name = sampler if sde_steps is None or bool(sde_steps[i]) else "ode"
        st = step_fn(name)(backbone, out, x, t, t_next, eta, noise=noise[i + 1].to(backbone.device))
        x = st.x_next
        xs.append(x)
        lps.append(st.logprob)
        stds.append(st.std)
    return {"xs": torch.stack(xs), "levels": grid[:, None].expand(-1, b).contiguous(),
            "logprob": torch.stack(lps), "std": torch.stack(stds)}


def transition_logprob(backbone: Backbone, x: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor,
                       x_next: torch.Tensor, cond: Cond, uncond: Cond | None, *, sampler: str, eta: float,
                       guidance_scale: float = 1.0, reference: bool = False) -> Step:
    """Score the stored transition ``x -> x_next`` (levels ``t``, ``t_next``: [B]) under the current policy
    (with grad), or under the reference (``reference=True``: adapter disabled, no grad)."""
    scale, unc = _scale(backbone, guidance_scale, uncond)
    out = guided_output(backbone, x, t, cond, unc, scale, reference=reference)
    return step_fn(sampler)(backbone, out, x, t, t_next, eta, x_next=x_next)
