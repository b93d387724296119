"""The backbone contract: what objectives, samplers and caches may ask of any model family.

A backbone wraps a diffusers denoiser (UNet or transformer), its VAE, text encoders and the facts
of its noise schedule. Objectives never branch on the family; they call these methods:

    cond   = bb.encode_prompts(prompts, dropout=0.2)     # Cond (batch-first tensors)
    x0     = bb.encode_images(images01)                  # VAE latents, scaled (and shifted)
    t      = bb.sample_timesteps(n)                      # training timesteps in model units
    xt     = bb.add_noise(x0, noise, t)
    target = bb.target(x0, noise, t)                     # eps, v or flow velocity
    out    = bb.predict(xt, t, cond)                     # trainable model
    out0   = bb.predict(xt, t, cond, reference=True)     # frozen reference, no grad
    x0_hat = bb.to_x0(out, xt, t)
    img    = bb.decode_latents(x0_hat)                   # [B,3,H,W] in [0,1]

Noise levels are exposed as ``alpha(t)`` and ``sigma(t)`` with ``x_t = alpha x0 + sigma noise`` so
that solvers can be written once (DDIM on (alpha, sigma) is Euler on the flow velocity).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .lora import adapters_disabled
from .modules import unwrap


@dataclass
class Cond:
    """Prompt conditioning: a dict of batch-first tensors (names are the denoiser's kwargs)."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return next(iter(self.tensors.values())).shape[0]

    def __getitem__(self, idx: slice | torch.Tensor | list[int]) -> Cond:
        return Cond({k: v[idx] for k, v in self.tensors.items()})

    def repeat(self, n: int) -> Cond:
        """Tile the batch n times: [c0..cB-1, c0..cB-1, ...] (winners then losers)."""
        return Cond({k: v.repeat(n, *([1] * (v.ndim - 1))) for k, v in self.tensors.items()})

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Cond:
        out = {}
        for k, v in self.tensors.items():
            out[k] = v.to(device=device, dtype=dtype if (dtype is not None and v.is_floating_point()) else None)
        return Cond(out)

    @staticmethod
    def cat(conds: list[Cond]) -> Cond:
        keys = conds[0].tensors.keys()
        return Cond({k: torch.cat([c.tensors[k] for c in conds]) for k in keys})


def per_sample_mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean of (a-b)^2 over every non-batch dim, in fp32: the reduction every objective uses."""
    return (a.float() - b.float()).pow(2).flatten(1).mean(1)


class Backbone:
    """Abstract backbone. Subclasses: UNetBackbone (SD1.5/2.x/SDXL), FlowBackbone (SD3/FLUX).

    It holds a diffusers pipeline (``self.pipe``) whose components it uses; the trainable denoiser is
    ``self.denoiser`` (the training loop may replace it by its accelerate-wrapped version).
    """

    family: str = "abstract"
    prediction_type: str = "epsilon"  # "epsilon" | "v_prediction" | "flow"
    num_train_timesteps: int = 1000

    denoiser_name: str = "unet"  # the pipeline attribute holding the denoiser: "unet" | "transformer"

    def __init__(self, pipe: Any) -> None:
        self.pipe = pipe
        self.denoiser: nn.Module = getattr(pipe, self.denoiser_name)
        self.vae: nn.Module = pipe.vae
        self.ref_model: nn.Module | None = None  # frozen copy for full fine-tuning; None with LoRA
        self.device = torch.device("cpu")
        self.vae_scale = float(self.vae.config.scaling_factor)
        self.vae_shift = float(getattr(self.vae.config, "shift_factor", None) or 0.0)
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self._resolution: int | None = None
        self.channels_last = False  # UNets: inputs in channels-last memory format (model.channels_last)

    @property
    def resolution(self) -> int:
        """Default image side in pixels: set explicitly, else the pipeline's native default."""
        if self._resolution:
            return self._resolution
        size = getattr(self.pipe, "default_sample_size", None) or self.denoiser_config.sample_size
        return int(size) * self.vae_scale_factor

    @resolution.setter
    def resolution(self, value: int | None) -> None:
        self._resolution = value

    @property
    def denoiser_config(self) -> Any:
        return unwrap(self.denoiser).config

    def to(self, device: torch.device | str, frozen_dtype: torch.dtype | None = None) -> Backbone:
        """Move every component to ``device``; frozen parts (VAE, text encoders) may take ``frozen_dtype``."""
        self.device = torch.device(device)
        for comp in self.pipe.components.values():
            if isinstance(comp, nn.Module):
                if comp is unwrap(self.denoiser):
                    comp.to(self.device)
                else:
                    comp.to(self.device, dtype=frozen_dtype)
        if self.ref_model is not None:
            self.ref_model.to(self.device, dtype=frozen_dtype)
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.denoiser.parameters() if p.requires_grad]

    def enable_full_finetune(self) -> None:
        """Train every denoiser weight; keep a frozen copy as the reference."""
        import copy

        self.ref_model = copy.deepcopy(unwrap(self.denoiser)).requires_grad_(False).eval()
        self.denoiser.requires_grad_(True)

    # --- schedule facts --------------------------------------------------------------------------
    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError  # abstract

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError  # abstract

    def sample_timesteps(
        self, n: int, generator: torch.Generator | None = None, device: torch.device | str | None = None
    ) -> torch.Tensor:
        raise NotImplementedError  # abstract

    def _bcast(self, v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return v.to(like.device, torch.float32).reshape(-1, *([1] * (like.ndim - 1)))

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a, s = self._bcast(self.alpha(t), x0), self._bcast(self.sigma(t), x0)
        return (a * x0.float() + s * noise.float()).to(x0.dtype)

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.prediction_type == "epsilon":
            return noise
        a, s = self._bcast(self.alpha(t), x0), self._bcast(self.sigma(t), x0)
        if self.prediction_type == "v_prediction":
            return (a * noise.float() - s * x0.float()).to(x0.dtype)
        if self.prediction_type == "flow":
            return noise - x0
        raise ValueError(f"unknown prediction_type {self.prediction_type!r}")

    def to_x0(self, output: torch.Tensor, xt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Clean-latent estimate from a model output at (xt, t)."""
        a, s = self._bcast(self.alpha(t), xt), self._bcast(self.sigma(t), xt)
        out, x = output.float(), xt.float()
        if self.prediction_type == "epsilon":
            return ((x - s * out) / a).to(xt.dtype)
        if self.prediction_type == "v_prediction":  # a^2 + s^2 = 1
            return (a * x - s * out).to(xt.dtype)
        if self.prediction_type == "flow":  # x = (1-s) x0 + s eps, v = eps - x0
            return (x - s * out).to(xt.dtype)
        raise ValueError(f"unknown prediction_type {self.prediction_type!r}")

    def to_eps(self, output: torch.Tensor, xt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Noise estimate from a model output at (xt, t)."""
        a, s = self._bcast(self.alpha(t), xt), self._bcast(self.sigma(t), xt)
        out, x = output.float(), xt.float()
        if self.prediction_type == "epsilon":
            return output
        if self.prediction_type == "v_prediction":
            return (s * x + a * out).to(xt.dtype)
        if self.prediction_type == "flow":  # eps = x + (1-s) v
            return (x + a * out).to(xt.dtype)
        raise ValueError(f"unknown prediction_type {self.prediction_type!r}")

    @property
    def max_timestep(self) -> float:
        """The noisiest level in model units: ``T - 1`` for discrete UNet timesteps, ``T`` for flows."""
        return self.num_train_timesteps - 1 if self.prediction_type != "flow" else self.num_train_timesteps

    def ddim_step(self, output: torch.Tensor, xt: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor) -> torch.Tensor:
        """Deterministic DDIM step from level ``t`` to ``t_next`` (either direction) with the model output
        at (xt, t): ``x_next = alpha(t_next) x0_hat + sigma(t_next) eps_hat``. On a flow this is the Euler
        step ``x + (s_next - s) v``; with ``t_next > t`` it is DDIM inversion. ``t``, ``t_next``: [B]."""
        x0_hat, eps_hat = self.to_x0(output, xt, t).float(), self.to_eps(output, xt, t).float()
        a, s = self._bcast(self.alpha(t_next), xt), self._bcast(self.sigma(t_next), xt)
        return (a * x0_hat + s * eps_hat).to(xt.dtype)

    # --- conditioning, model call, VAE ------------------------------------------------------------
    def encode_prompts(
        self, prompts: list[str], dropout: float = 0.0, generator: torch.Generator | None = None
    ) -> Cond:
        raise NotImplementedError  # abstract

    def _call(self, model: nn.Module, xt: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        raise NotImplementedError  # abstract: the family-specific forward

    def predict(self, xt: torch.Tensor, t: torch.Tensor, cond: Cond, *, reference: bool = False) -> torch.Tensor:
        """Model output at (xt, t). ``reference=True`` runs the frozen reference without grad."""
        if not reference:
            return self._call(self.denoiser, xt, t, cond)
        with torch.no_grad(), self.reference_context() as ref:
            return self._call(ref, xt, t, cond)

    @contextlib.contextmanager
    def reference_context(self) -> Iterator[nn.Module]:
        """Yield the reference network: the frozen full copy, or the denoiser with LoRA disabled."""
        if self.ref_model is not None:
            yield self.ref_model
            return
        with adapters_disabled(unwrap(self.denoiser)):
            yield self.denoiser

    @torch.no_grad()
    def encode_images_dist(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and std of the VAE posterior, in the scaled (and shifted) latent space."""
        x = images.to(self.device, self.vae.dtype) * 2 - 1
        dist = self.vae.encode(x).latent_dist
        mean = ((dist.mean.float() - self.vae_shift) * self.vae_scale).contiguous()
        return mean, (dist.std.float() * self.vae_scale).contiguous()

    def encode_images(
        self, images: torch.Tensor, generator: torch.Generator | None = None, sample: bool = True
    ) -> torch.Tensor:
        """Images ``[B,3,H,W]`` in [0,1] -> scaled latents (a posterior sample, or its mean)."""
        mean, std = self.encode_images_dist(images)
        if not sample:
            return mean
        noise = torch.randn(mean.shape, generator=generator, device=generator.device if generator else mean.device)
        return mean + std * noise.to(mean.device)

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> images ``[B,3,H,W]`` in [0,1] (differentiable)."""
        z = latents.to(self.vae.dtype) / self.vae_scale + self.vae_shift
        return (self.vae.decode(z).sample.float() / 2 + 0.5).clamp(0, 1)

    def latent_shape(self, batch: int, height: int | None = None, width: int | None = None) -> tuple[int, ...]:
        h, w = height or self.resolution, width or self.resolution
        c = self.vae.config.latent_channels
        return (batch, c, h // self.vae_scale_factor, w // self.vae_scale_factor)

    # --- sampling ---------------------------------------------------------------------------------
    uses_embedded_guidance: bool = False  # FLUX-dev: guidance is an input embedding, not CFG

    def negative_cond(self, negative_prompt: str, n: int) -> Cond:
        """Unconditional branch for classifier-free guidance, as the stock pipeline builds it."""
        return self.encode_prompts([negative_prompt] * n)

    def set_timesteps(self, scheduler: Any, steps: int, latent_shape: tuple[int, ...]) -> torch.Tensor:
        """Inference timesteps (model units), set as the family's stock pipeline sets them."""
        scheduler.set_timesteps(steps, device=self.device)
        return scheduler.timesteps


def apply_prompt_dropout(
    cond: Cond, empty: Cond, p: float, generator: torch.Generator | None = None
) -> Cond:
    """Replace each row of ``cond`` by the empty-prompt conditioning with probability ``p``."""
    if p <= 0:
        return cond
    drop = torch.rand(len(cond), generator=generator) < p
    out = {}
    for k, v in cond.tensors.items():
        e = empty.tensors[k].to(v.device, v.dtype).expand_as(v)
        m = drop.to(v.device).reshape(-1, *([1] * (v.ndim - 1)))
        out[k] = torch.where(m, e, v)
    return Cond(out)


def drop_prompts(prompts: list[str], p: float, generator: torch.Generator | None = None) -> list[str]:
    """Each prompt becomes "" with probability ``p`` (classifier-free-guidance training)."""
    if p <= 0:
        return list(prompts)
    drop = torch.rand(len(prompts), generator=generator) < p
    return ["" if d else s for s, d in zip(prompts, drop.tolist(), strict=True)]
