"""SD1.5/2.x (epsilon or v-prediction) and SDXL UNet backbones.

x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps with abar from the pipeline scheduler's betas; timesteps
are integers in [0, num_train_timesteps). Prompt encoding is the stock pipeline's ``encode_prompt``;
SDXL adds the pooled TE2 embedding and the size/crop time ids ``[h, w, 0, 0, h, w]``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .base import Backbone, Cond, drop_prompts


class UNetBackbone(Backbone):
    denoiser_name = "unet"

    def __init__(self, pipe: Any) -> None:
        super().__init__(pipe)
        cfg = pipe.scheduler.config
        self.prediction_type = cfg.get("prediction_type", "epsilon")
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"unsupported UNet prediction_type {self.prediction_type!r} (epsilon or v_prediction)")
        self.num_train_timesteps = int(cfg.num_train_timesteps)
        self.alphas_cumprod = pipe.scheduler.alphas_cumprod.float().clone()
        self.is_sdxl = getattr(pipe, "text_encoder_2", None) is not None
        self.family = "sdxl" if self.is_sdxl else "sd"

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        return self.alphas_cumprod.to(t.device)[t.long()].sqrt()

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        return (1 - self.alphas_cumprod.to(t.device)[t.long()]).sqrt()

    def sample_timesteps(
        self, n: int, generator: torch.Generator | None = None, device: torch.device | str | None = None
    ) -> torch.Tensor:
        t = torch.randint(0, self.num_train_timesteps, (n,), generator=generator)
        return t.to(device or self.device)

    @torch.no_grad()
    def encode_prompts(
        self, prompts: list[str], dropout: float = 0.0, generator: torch.Generator | None = None
    ) -> Cond:
        prompts = drop_prompts(list(prompts), dropout, generator)
        if not self.is_sdxl:
            embeds, _ = self.pipe.encode_prompt(prompts, self.device, 1, do_classifier_free_guidance=False)
            return Cond({"encoder_hidden_states": embeds})
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            prompts, device=self.device, num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        r = self.resolution
        time_ids = torch.tensor([[r, r, 0, 0, r, r]], dtype=embeds.dtype, device=self.device)
        return Cond(
            {"encoder_hidden_states": embeds, "text_embeds": pooled, "time_ids": time_ids.repeat(len(prompts), 1)}
        )

    def negative_cond(self, negative_prompt: str, n: int) -> Cond:
        # SDXL with force_zeros_for_empty_prompt uses zeros for an empty negative prompt (stock pipeline).
        if self.is_sdxl and not negative_prompt and self.pipe.config.get("force_zeros_for_empty_prompt", False):
            c = self.encode_prompts([""] * n)
            c.tensors["encoder_hidden_states"] = torch.zeros_like(c.tensors["encoder_hidden_states"])
            c.tensors["text_embeds"] = torch.zeros_like(c.tensors["text_embeds"])
            return c
        return super().negative_cond(negative_prompt, n)

    def _call(self, model: nn.Module, xt: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        c = cond.tensors
        added = {"text_embeds": c["text_embeds"], "time_ids": c["time_ids"]} if "text_embeds" in c else None
        dtype = _unwrap_dtype(model)
        t = t.to(xt.device)
        if t.ndim == 0:
            t = t.expand(xt.shape[0])
        x = xt.to(dtype)
        if self.channels_last:  # model.channels_last: the input in the weights' memory format
            x = x.contiguous(memory_format=torch.channels_last)
        out = model(
            x,
            t,
            encoder_hidden_states=c["encoder_hidden_states"].to(dtype),
            added_cond_kwargs=added,
            cross_attention_kwargs=_attention_kwargs(c),
            return_dict=False,
        )[0]
        return out


def _attention_kwargs(c: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """Extra attention inputs carried by the conditioning: a user embedding for personalization's
    attention processors (diffalign.personalization.inject), else None."""
    return {"user_embedding": c["user_embedding"]} if "user_embedding" in c else None


def _unwrap_dtype(model: nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype
