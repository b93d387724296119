"""Inference-time alignment hooks for ``sample_latents(..., model_output=hook)``.

Each hook has the signature of ``guided_output(backbone, x, t, cond, uncond, scale)`` and returns the
model output the scheduler steps with, so every hook works with every family (epsilon, v, flow) and
every scheduler.

RL guidance, RLG (Jin et al. 2025, arXiv 2508.21016). The KL-regularised RL optimum is
p_RL ∝ p_ref exp(R/β); the geometric mixture p_w ∝ p_ref^(1-w) p_RL^w = p_ref exp(w R/β) is the model
trained with KL coefficient β/w. Its score is (1-w) s_ref + w s_RL, and since epsilon, v and velocity
are affine in the score with weights summing to one, the same mix applies to any parametrisation:

    out_base = CFG(base)   # the tuned network with its LoRA disabled
    out_RL   = CFG(tuned)  # classifier-free guidance inside each model, same scale and negative prompt
    out      = (1 - w) out_base + w out_RL

w = 0 is the base, w = 1 the tuned model, 0 < w < 1 interpolates and w > 1 extrapolates. For the first
``zero_init_step`` model calls only out_RL is used (the reference code's option). ``mode="approx"``
instead scales the LoRA by w (one model call per CFG branch, half the cost): exact at w = 0 and w = 1,
a linearisation of the mix in between.

Reward-gradient guidance steps each prediction of the clean latent up a differentiable reward:
x0' = x0 + λ_t ∇_x0 R(decode(x0)), re-expressed as the model output that predicts x0' at the same x_t.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from ..backbones.base import Backbone, Cond
from ..backbones.modules import unwrap
from .solvers import guided_output

RLG_MODES = ("exact", "approx")
REWARD_SCHEDULES = ("constant", "increasing", "decreasing")


def rlg_combine(out_base: torch.Tensor, out_tuned: torch.Tensor, w: float) -> torch.Tensor:
    """The RLG rule (1 - w) out_base + w out_RL (exactly out_base at w = 0 and out_RL at w = 1)."""
    return (1 - w) * out_base + w * out_tuned


# --- LoRA helpers: scaling, and base + tuned rows in one forward -----------------------------------


def lora_layers(model: nn.Module) -> list[nn.Module]:
    from peft.tuners.lora import LoraLayer

    return [m for m in unwrap(model).modules() if isinstance(m, LoraLayer)]


@contextlib.contextmanager
def lora_scaled(model: nn.Module, w: float) -> Iterator[nn.Module]:
    """Multiply every active LoRA's scaling by ``w`` inside the block (peft's ``scale_layer``); the
    previous scalings are restored exactly afterwards, also when the block raises."""
    layers = lora_layers(model)
    if not layers:
        raise RuntimeError("approximate RLG scales a LoRA, but the denoiser has none (load one with --lora)")
    saved = [dict(m.scaling) for m in layers]
    try:
        for m in layers:
            m.scale_layer(w)
        yield model
    finally:
        for m, s in zip(layers, saved, strict=True):
            m.scaling.clear()
            m.scaling.update(s)


def single_active_adapter(model: nn.Module) -> str | None:
    """The name of the one active LoRA adapter, or None (no LoRA, several adapters, or merged weights)."""
    layers = lora_layers(model)
    names = {n for m in layers for n in m.active_adapters}
    if len(names) != 1 or any(m.merged or m.disable_adapters for m in layers):
        return None
    return names.pop()


@contextlib.contextmanager
def adapters_per_row(model: nn.Module, names: list[str]) -> Iterator[None]:
    """Run row i of the next forwards with adapter ``names[i]`` ("__base__" = LoRA off): peft's
    mixed-adapter batches, injected by pre-forward hooks as ``PeftModel`` does."""

    def hook(_module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        kwargs["adapter_names"] = names
        return args, kwargs

    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in lora_layers(model)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


# --- RL guidance -----------------------------------------------------------------------------------


class RLGuidance:
    """RLG as a ``model_output`` hook. Use a fresh instance per sampling run (it counts model calls
    for ``zero_init_step``).

    ``batch_models``: exact mode runs base and tuned rows in one forward (4B rows with CFG) when the
    denoiser has a single unmerged LoRA; otherwise, or with ``batch_models=False`` (less memory), two.
    """

    def __init__(self, w: float, *, mode: str = "exact", zero_init_step: int = 0, batch_models: bool = True) -> None:
        if mode not in RLG_MODES:
            raise ValueError(f"RLG mode must be one of {RLG_MODES}, got {mode!r}")
        if zero_init_step < 0:
            raise ValueError(f"zero_init_step must be >= 0, got {zero_init_step}")
        self.w, self.mode, self.zero_init_step, self.batch_models = float(w), mode, zero_init_step, batch_models
        self.calls = 0
        self.forwards = 0  # denoiser forwards made (for cost accounting and tests)

    def __call__(
        self, backbone: Backbone, x: torch.Tensor, t: torch.Tensor, cond: Cond, uncond: Cond | None, scale: float
    ) -> torch.Tensor:
        w = 1.0 if self.calls < self.zero_init_step else self.w
        self.calls += 1
        if w == 0:  # the tuned term has weight 0: the base model alone
            return self._guided(backbone, x, t, cond, uncond, scale, reference=True)
        if w == 1:  # the base term has weight 0: the tuned model alone
            return self._guided(backbone, x, t, cond, uncond, scale)
        if self.mode == "approx":
            with lora_scaled(backbone.denoiser, w):
                return self._guided(backbone, x, t, cond, uncond, scale)
        adapter = single_active_adapter(backbone.denoiser) if backbone.ref_model is None else None
        if self.batch_models and adapter is not None:
            out_base, out_rl = self._both_batched(backbone, adapter, x, t, cond, uncond, scale)
        else:
            out_base = self._guided(backbone, x, t, cond, uncond, scale, reference=True)
            out_rl = self._guided(backbone, x, t, cond, uncond, scale)
        return rlg_combine(out_base, out_rl, w)

    def _guided(self, backbone: Backbone, x: torch.Tensor, t: torch.Tensor, cond: Cond, uncond: Cond | None,
                scale: float, reference: bool = False) -> torch.Tensor:
        self.forwards += 1
        return guided_output(backbone, x, t, cond, uncond, scale, reference=reference)

    def _both_batched(
        self, backbone: Backbone, adapter: str, x: torch.Tensor, t: torch.Tensor, cond: Cond, uncond: Cond | None,
        scale: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """CFG(base) and CFG(tuned) from one forward over [base rows | tuned rows]."""
        cfg = uncond is not None and scale != 1.0
        branch = Cond.cat([uncond, cond]) if cfg else cond  # type: ignore[list-item]
        reps = 4 if cfg else 2
        n = x.shape[0] * reps // 2
        tt = t.expand(x.shape[0]) if t.ndim == 0 else t
        with adapters_per_row(backbone.denoiser, ["__base__"] * n + [adapter] * n):
            out = backbone.predict(torch.cat([x] * reps), torch.cat([tt] * reps), Cond.cat([branch, branch]))
        self.forwards += 1
        base, tuned = out.chunk(2)
        if not cfg:
            return base, tuned
        (bu, bc), (tu, tc) = base.chunk(2), tuned.chunk(2)
        return bu + scale * (bc - bu), tu + scale * (tc - tu)


# --- reward-gradient guidance ------------------------------------------------------------------------


def schedule_weight(schedule: str | Callable[[float], float], sigma: float) -> float:
    """Weight of the reward step at noise level ``sigma`` in [0, 1]: "constant" 1, "increasing"
    1 - sigma (strongest near the end, where the x0 prediction is sharp), "decreasing" sigma, or a callable."""
    if callable(schedule):
        return float(schedule(sigma))
    if schedule == "constant":
        return 1.0
    if schedule == "increasing":
        return 1.0 - sigma
    if schedule == "decreasing":
        return sigma
    raise ValueError(f"reward schedule must be one of {REWARD_SCHEDULES} or a callable, got {schedule!r}")


def x0_shift_as_output(backbone: Backbone, t: torch.Tensor, dx0: torch.Tensor) -> torch.Tensor:
    """The change of model output that moves the x0 prediction by ``dx0`` at fixed x_t.
    epsilon: x0 = (x - s eps)/a, so d eps = -(a/s) dx0; v (x0 = a x - s v) and flow (x0 = x - s v): dv = -dx0/s."""
    a, s = backbone._bcast(backbone.alpha(t), dx0), backbone._bcast(backbone.sigma(t), dx0)
    if backbone.prediction_type == "epsilon":
        return -(a / s) * dx0
    return -dx0 / s


class RewardGuidance:
    """Reward-gradient guidance as a ``model_output`` hook for one batch of ``prompts``.

    At each call: out = inner(...) (CFG, or RLG), x0 = to_x0(out), g = ∇_x0 R(decode(x0), prompts)
    (through the VAE decoder, not through the denoiser), and the output is moved so that it predicts
    x0 + scale * schedule(sigma_t) * g (g scaled to unit RMS per image when ``normalize``).
    """

    def __init__(
        self, reward: Any, prompts: list[str], scale: float, *, schedule: str | Callable[[float], float] = "constant",
        normalize: bool = False, inner: Callable[..., torch.Tensor] | None = None,
    ) -> None:
        if not getattr(reward, "differentiable", False):
            raise ValueError(
                f"reward {getattr(reward, 'name', type(reward).__name__)!r} is not differentiable, so it cannot "
                "guide sampling by its gradient; use it for best-of-N selection instead"
            )
        schedule_weight(schedule, 0.5)  # validates the name
        self.reward, self.prompts, self.scale = reward, list(prompts), float(scale)
        self.schedule, self.normalize, self.inner = schedule, normalize, inner or guided_output
        self.last_reward: torch.Tensor | None = None  # reward of the last x0 prediction (diagnostics)

    def __call__(
        self, backbone: Backbone, x: torch.Tensor, t: torch.Tensor, cond: Cond, uncond: Cond | None, scale: float
    ) -> torch.Tensor:
        out = self.inner(backbone, x, t, cond, uncond, scale)
        lam = self.scale * schedule_weight(self.schedule, float(backbone.sigma(t.reshape(-1)[:1])))
        if lam == 0:
            return out
        with torch.enable_grad():
            x0 = backbone.to_x0(out, x, t).detach().float().requires_grad_(True)
            r = self.reward(backbone.decode_latents(x0), self.prompts)
            (g,) = torch.autograd.grad(r.float().sum(), x0)
        self.last_reward = r.detach()
        if self.normalize:
            g = g / g.flatten(1).pow(2).mean(1).sqrt().clamp_min(1e-12).reshape(-1, *[1] * (g.ndim - 1))
        return out + x0_shift_as_output(backbone, t, lam * g).to(out.dtype)


class GuidanceHooks:
    """Builds the guided model call for each batch of prompts: RL guidance, reward guidance, or both
    (reward guidance wrapping RLG), as ``sample_images(model_output=...)`` takes it. ``forwards`` counts
    the denoiser calls of every RLG hook built."""

    def __init__(self, modes: set[str], *, rlg_scale: float = 1.0, rlg_mode: str = "exact", zero_init_step: int = 0,
                 rlg_batched: bool = True, reward: Any = None, reward_scale: float = 1.0,
                 reward_schedule: str | Callable[[float], float] = "constant", reward_normalize: bool = False) -> None:
        self.modes, self.rlg_hooks = modes, []
        self.rlg = {"w": rlg_scale, "mode": rlg_mode, "zero_init_step": zero_init_step, "batch_models": rlg_batched}
        self.reward = {"reward": reward, "scale": reward_scale, "schedule": reward_schedule, "normalize": reward_normalize}

    def __call__(self, prompts: list[str]) -> Callable[..., torch.Tensor] | None:
        hook: Any = None
        if "rlg" in self.modes:
            hook = RLGuidance(**self.rlg)
            self.rlg_hooks.append(hook)
        if "reward" in self.modes:
            r = self.reward
            hook = RewardGuidance(r["reward"], prompts, r["scale"], schedule=r["schedule"], normalize=r["normalize"],
                                  inner=hook)
        return hook

    @property
    def forwards(self) -> int:
        return sum(h.forwards for h in self.rlg_hooks)
