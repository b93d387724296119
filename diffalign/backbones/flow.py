"""SD3/3.5 and FLUX flow-matching transformer backbones.

x_sigma = (1 - sigma) x0 + sigma eps, the model predicts the velocity eps - x0. Timesteps are in model
units t = 1000 sigma (the stock schedulers' convention). SD3's transformer takes t; FLUX's takes
t / 1000, packed 2x2 latent patches, position ids, and (FLUX-dev) a guidance embedding.
Training timesteps are logit-normal (mean 0, std 1) as in SD3 and Flow-DPO, shifted by the
scheduler's static ``shift`` (3.0 for SD3) unless it uses dynamic shifting.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from .base import Backbone, Cond, drop_prompts
from .modules import unwrap


class FlowBackbone(Backbone):
    denoiser_name = "transformer"
    prediction_type = "flow"

    def __init__(self, pipe: Any, max_sequence_length: int | None = None, embedded_guidance: float = 3.5) -> None:
        super().__init__(pipe)
        self.is_flux = type(pipe).__name__.startswith("Flux")
        self.family = "flux" if self.is_flux else "sd3"
        t5 = getattr(pipe, "tokenizer_2" if self.is_flux else "tokenizer_3", None)
        default = 512 if self.is_flux else 256  # the stock pipelines' defaults
        limit = int(getattr(t5, "model_max_length", default) or default) if t5 is not None else default
        self.max_sequence_length = max_sequence_length or min(default, limit)
        self.embedded_guidance = embedded_guidance
        cfg = pipe.scheduler.config
        self.num_train_timesteps = int(cfg.get("num_train_timesteps", 1000))
        self.uses_embedded_guidance = bool(self.is_flux and self.denoiser_config.guidance_embeds)
        self.shift = 1.0 if cfg.get("use_dynamic_shifting", False) else float(cfg.get("shift", 1.0))

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        return 1 - t.float() / self.num_train_timesteps

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        return t.float() / self.num_train_timesteps

    def sample_timesteps(
        self, n: int, generator: torch.Generator | None = None, device: torch.device | str | None = None
    ) -> torch.Tensor:
        u = torch.sigmoid(torch.randn(n, generator=generator))
        s = self.shift * u / (1 + (self.shift - 1) * u)
        return (s * self.num_train_timesteps).to(device or self.device)

    @torch.no_grad()
    def encode_prompts(
        self, prompts: list[str], dropout: float = 0.0, generator: torch.Generator | None = None
    ) -> Cond:
        prompts = drop_prompts(list(prompts), dropout, generator)
        if self.is_flux:
            embeds, pooled, _ = self.pipe.encode_prompt(
                prompts, prompt_2=None, device=self.device, max_sequence_length=self.max_sequence_length
            )
        else:
            embeds, _, pooled, _ = self.pipe.encode_prompt(
                prompts, None, None, device=self.device, do_classifier_free_guidance=False,
                max_sequence_length=self.max_sequence_length,
            )
        return Cond({"encoder_hidden_states": embeds, "pooled_projections": pooled})

    def _call(self, model: nn.Module, xt: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        c = cond.tensors
        dtype = next(model.parameters()).dtype
        b = xt.shape[0]
        t = t.to(xt.device, torch.float32)
        if t.ndim == 0:
            t = t.expand(b)
        if not self.is_flux:
            return model(
                hidden_states=xt.to(dtype), timestep=t, encoder_hidden_states=c["encoder_hidden_states"].to(dtype),
                pooled_projections=c["pooled_projections"].to(dtype), return_dict=False,
                joint_attention_kwargs=_attention_kwargs(c),
            )[0]
        _, ch, h, w = xt.shape
        packed = self.pipe._pack_latents(xt.to(dtype), b, ch, h, w)
        img_ids = self.pipe._prepare_latent_image_ids(b, h // 2, w // 2, xt.device, dtype)
        txt_ids = torch.zeros(c["encoder_hidden_states"].shape[1], 3, device=xt.device, dtype=dtype)
        guidance = None
        if unwrap(model).config.guidance_embeds:
            guidance = torch.full((b,), self.embedded_guidance, device=xt.device, dtype=torch.float32)
        out = model(
            hidden_states=packed, timestep=(t / 1000).to(dtype), guidance=guidance,
            pooled_projections=c["pooled_projections"].to(dtype), encoder_hidden_states=c["encoder_hidden_states"].to(dtype),
            txt_ids=txt_ids, img_ids=img_ids, return_dict=False, joint_attention_kwargs=_attention_kwargs(c),
        )[0]
        return _unpack(out, h, w)

    def latent_shape(self, batch: int, height: int | None = None, width: int | None = None) -> tuple[int, ...]:
        h, w = height or self.resolution, width or self.resolution
        c = self.vae.config.latent_channels
        if self.is_flux:  # packing needs an even latent grid
            return (batch, c, 2 * (h // (self.vae_scale_factor * 2)), 2 * (w // (self.vae_scale_factor * 2)))
        return (batch, c, h // self.vae_scale_factor, w // self.vae_scale_factor)

    def set_timesteps(self, scheduler: Any, steps: int, latent_shape: tuple[int, ...]) -> torch.Tensor:
        """As the stock SD3/FLUX pipelines: sigmas linspace(1, 1/n) for FLUX with the resolution shift mu."""
        kwargs: dict[str, Any] = {}
        if self.is_flux:
            from diffusers.pipelines.flux.pipeline_flux import calculate_shift

            kwargs["sigmas"] = np.linspace(1.0, 1 / steps, steps)
            seq = (latent_shape[2] // 2) * (latent_shape[3] // 2)
            c = scheduler.config
            kwargs["mu"] = calculate_shift(
                seq, c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096),
                c.get("base_shift", 0.5), c.get("max_shift", 1.15),
            )
            scheduler.set_timesteps(device=self.device, **kwargs)
        else:
            scheduler.set_timesteps(steps, device=self.device)
        return scheduler.timesteps


def _attention_kwargs(c: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """Extra attention inputs carried by the conditioning: a user embedding for personalization's
    attention processors (diffalign.personalization.inject), else None."""
    return {"user_embedding": c["user_embedding"]} if "user_embedding" in c else None


def _unpack(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Packed FLUX tokens [B, (h/2)(w/2), 4C] -> latents [B, C, h, w]."""
    b, _, c4 = x.shape
    x = x.view(b, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c4 // 4, h, w)
