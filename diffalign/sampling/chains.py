"""Differentiable sampling chains for reward feedback (ReFL, DRaFT-K, DRaFT-LV, AlignProp).

Written once on the backbone's alpha/sigma contract, so one chain serves UNets (eps or v) and flows:
one step from level t to the next level s is

    out     = u + w (c - u)                         # CFG: u, c the model outputs without/with the prompt
    x0_hat  = to_x0(out, x_t, t)     eps_hat = to_eps(out, x_t, t)
    x_s     = alpha(s) x0_hat + sigma(s) eps_hat    # DDIM (eta = 0); on a flow, the Euler step x + (s - t) v

over the family's stock inference grid ``t_0 > t_1 > ... > t_{N-1}``, and the last step goes to level 0
(for a flow sigma = 0, i.e. x0_hat; for a UNet alphas_cumprod[0], the stock DDIM's last step with
``set_alpha_to_one=False``). With no gradient anywhere, ``ddim_chain`` is the stock DDIM / flow-Euler
sampler step for step (tests compare them).

What differs between the methods is only where the gradient flows:

* ``ddim_chain(..., grad_steps=K)``: the first N - K steps under ``torch.no_grad`` (the state entering
  step N - K is a detached tensor), the last K with gradient (DRaFT-K; AlignProp with K drawn by
  ``draw_truncation``); ``checkpoint=True`` recomputes every grad step in the backward pass
  (``torch.utils.checkpoint``), so memory holds one step's activations instead of K.
* ``refl_x0``: no gradient until step k, then ONE model call with gradient at t_k and its one-step
  estimate x0_hat(x_{t_k}) (ReFL: "jump straight to the x0 prediction").
* ``renoised_x0``: DRaFT-LV's n re-noised copies of a detached x0 at the last level, one grad step each.

Every grad step is recorded (``GradStep``: its input state, level and guided output), so an objective
can add a KL-to-reference term along exactly the steps that carry gradient.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.utils.checkpoint import checkpoint as torch_checkpoint

from ..backbones.base import Backbone, Cond
from .solvers import fresh_scheduler, guided_output


@dataclass
class GradStep:
    """One model call that carries gradient: the state it saw, its level and the (guided) output."""

    x: torch.Tensor
    t: torch.Tensor
    out: torch.Tensor


@dataclass
class Chain:
    """The end of a chain: ``x0`` (clean latents, with gradient through the grad steps) and the grad steps."""

    x0: torch.Tensor
    grad_steps: list[GradStep] = field(default_factory=list)


def chain_timesteps(backbone: Backbone, steps: int, latent_shape: tuple[int, ...]) -> torch.Tensor:
    """The family's stock inference levels (model units, noisiest first), as its pipeline sets them."""
    return backbone.set_timesteps(fresh_scheduler(backbone), steps, latent_shape).to(backbone.device)


def cfg_inputs(backbone: Backbone, cond: Cond, uncond: Cond | None, guidance_scale: float) -> tuple[Cond | None, float]:
    """The (uncond, scale) that ``guided_output`` takes: FLUX-dev guidance is an embedding, not CFG
    (one call per step, as ``sample_latents`` does)."""
    if getattr(backbone, "uses_embedded_guidance", False):
        backbone.embedded_guidance = guidance_scale
        return None, 1.0
    return (uncond if guidance_scale != 1.0 else None), guidance_scale


def _model(backbone: Backbone, x: torch.Tensor, t: torch.Tensor, cond: Cond, uncond: Cond | None, scale: float,
           checkpoint: bool) -> torch.Tensor:
    if not checkpoint:
        return guided_output(backbone, x, t, cond, uncond, scale)
    return torch_checkpoint(lambda xx: guided_output(backbone, xx, t, cond, uncond, scale), x, use_reentrant=False)


def _next_level(timesteps: torch.Tensor, i: int) -> torch.Tensor:
    return timesteps[i + 1] if i + 1 < len(timesteps) else torch.zeros_like(timesteps[i])


def _step(backbone: Backbone, out: torch.Tensor, x: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor) -> torch.Tensor:
    b = x.shape[0]
    return backbone.ddim_step(out, x, t.expand(b), t_next.expand(b))


@torch.no_grad()
def _steps_without_grad(backbone: Backbone, x: torch.Tensor, cond: Cond, uncond: Cond | None, scale: float,
                        timesteps: torch.Tensor, stop: int) -> torch.Tensor:
    """Steps 0 .. stop-1 under ``torch.no_grad``: the state at level ``timesteps[stop]`` (level 0 at the end)."""
    for i in range(stop):
        x = _step(backbone, guided_output(backbone, x, timesteps[i], cond, uncond, scale), x, timesteps[i],
                  _next_level(timesteps, i))
    return x


def ddim_chain(
    backbone: Backbone, noise: torch.Tensor, cond: Cond, uncond: Cond | None, timesteps: torch.Tensor, *,
    guidance_scale: float, grad_steps: int, checkpoint: bool = False,
) -> Chain:
    """DDIM / flow-Euler from ``noise`` over ``timesteps``; only the last ``grad_steps`` steps carry gradient.

        x_{t_0} = noise
        for i < N - K:  x_{t_{i+1}} = sg(step(x_{t_i}))            (no graph is built)
        for i >= N - K: x_{t_{i+1}} = step(x_{t_i})                (gradient; checkpointed if asked)
    """
    n = len(timesteps)
    if not 0 <= grad_steps <= n:
        raise ValueError(f"grad_steps must be in [0, {n}] (the chain has {n} steps), got {grad_steps}")
    uncond, scale = cfg_inputs(backbone, cond, uncond, guidance_scale)
    x = _steps_without_grad(backbone, noise, cond, uncond, scale, timesteps, n - grad_steps).detach()
    record = []
    for i in range(n - grad_steps, n):
        out = _model(backbone, x, timesteps[i], cond, uncond, scale, checkpoint)
        record.append(GradStep(x, timesteps[i], out))
        x = _step(backbone, out, x, timesteps[i], _next_level(timesteps, i))
    return Chain(x, record)


def refl_x0(
    backbone: Backbone, noise: torch.Tensor, cond: Cond, uncond: Cond | None, timesteps: torch.Tensor, *,
    guidance_scale: float, index: int, checkpoint: bool = False,
) -> Chain:
    """ReFL: no gradient down to step ``index`` (level t_k), then ONE grad call there and its x0 estimate.

        x_{t_k} = sg(chain from noise to t_k)      x0_hat = to_x0(f_theta(x_{t_k}, t_k, c), x_{t_k}, t_k)
    """
    if not 0 <= index < len(timesteps):
        raise ValueError(f"ReFL step index must be in [0, {len(timesteps) - 1}], got {index}")
    uncond, scale = cfg_inputs(backbone, cond, uncond, guidance_scale)
    x = _steps_without_grad(backbone, noise, cond, uncond, scale, timesteps, index).detach()
    t = timesteps[index]
    out = _model(backbone, x, t, cond, uncond, scale, checkpoint)
    return Chain(backbone.to_x0(out, x, t.expand(x.shape[0])), [GradStep(x, t, out)])


def renoised_x0(
    backbone: Backbone, x0: torch.Tensor, cond: Cond, uncond: Cond | None, t_last: torch.Tensor, *,
    guidance_scale: float, n: int, generator: torch.Generator | None = None,
) -> Chain:
    """DRaFT-LV: n noisy copies of ``sg(x0)`` at the last level, each denoised by one grad step.

        eps_i ~ N(0, I),  x^i = alpha(t_1) sg(x0) + sigma(t_1) eps_i,  x0^i = step(x^i, t_1 -> 0)   (i = 1..n)
    Returns the ``n * B`` estimates ``[x0^1 (all B) ... x0^n]``.
    """
    if n < 1:
        raise ValueError(f"DRaFT-LV needs n >= 1 re-noised copies, got {n}")
    uncond, scale = cfg_inputs(backbone, cond, uncond, guidance_scale)
    x0 = x0.detach().repeat(n, *([1] * (x0.ndim - 1)))
    b = x0.shape[0]
    eps = torch.randn(x0.shape, generator=generator, device=generator.device if generator else x0.device).to(x0)
    tt = t_last.expand(b)
    x = backbone.add_noise(x0, eps, tt)
    cond_n = cond.repeat(n)
    uncond_n = uncond.repeat(n) if uncond is not None else None
    out = guided_output(backbone, x, t_last, cond_n, uncond_n, scale)
    return Chain(_step(backbone, out, x, t_last, torch.zeros_like(t_last)), [GradStep(x, t_last, out)])


def draw_truncation(steps: int, mode: str = "gaussian", mean: float = 8.0, std: float = 5.0,
                    generator: torch.Generator | None = None) -> int:
    """AlignProp's random truncation: how many final steps K carry gradient.

    AlignProp draws the first grad step k ~ int(N(42, 5)) of 50 (resampled until 1 <= k < 50), i.e.
    K = 50 - k, about 8. Here ``mean`` / ``std`` are K's, in steps: k ~ int(N(steps - mean, std)),
    resampled until 1 <= k < steps. ``uniform``: k uniform in [1, steps - 1]; ``fixed``: K = round(mean)
    (AlignProp's "fixed 49" with 50 steps is K = 1).
    """
    if steps < 2:
        raise ValueError(f"random truncation needs a chain of at least 2 steps, got {steps}")
    if mode == "fixed":
        k_grad = round(mean)
        if not 1 <= k_grad <= steps:
            raise ValueError(f"fixed truncation K={k_grad} must be in [1, {steps}]")
        return k_grad
    for _ in range(10_000):
        if mode == "gaussian":
            k = int(steps - mean + std * float(torch.randn((), generator=generator)))
        elif mode == "uniform":
            k = int(torch.randint(1, steps, (), generator=generator))
        else:
            raise ValueError(f"truncation mode must be gaussian, uniform or fixed, got {mode!r}")
        if 1 <= k < steps:
            return steps - k
    raise RuntimeError(f"could not draw a truncation in [1, {steps - 1}] from N({steps - mean}, {std})")
