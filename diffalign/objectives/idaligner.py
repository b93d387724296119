"""ID-Aligner (Chen et al., arXiv 2404.15449; no code released): identity-preserving generation tuned by
reward feedback with an identity reward plus an aesthetic reward. The math is ReFL's (``reward_feedback.py``):
no-grad denoising to a random late step k, the one-step x0 prediction decoded and scored::

    x_{t_k} = sg(chain(x_T -> t_k));  x0 = to_x0(f_theta(x_{t_k}, t_k, c [, e_ref]))
    R_id_sim = cos(E(FaceDet(decode(x0))), E(FaceDet(x_ref)))          identity reward (rewards: identity,
                                                                         toy_identity), references from the batch
    L = -reward_scale * mean_b [ w_id R_id_sim + w_aes R_aes ]  (+ lora_weight * L_id_lora in the LoRA form)

The reward is the config's ``reward.train``, an Ensemble such as ``identity=arcface.pth:1,imagereward=...:1``
(``toy_identity:1,toy_aesthetic:1`` in the toy world); the weights w are its member weights. The reference
images travel in the batch (``batch["references"]``: a prompt .jsonl row's ``"reference"`` or the config's
``reward.reference_faces``) and reach the reward as ``context["reference_faces"]``. The paper's two forms:

* ``form: lora`` -- a LoRA (``model.lora: true``) per identity; the identity is named by the prompt's subject
  ("a portrait of Ada"). The paper adds ``L_id_lora``, the usual denoising loss on the reference images
  (``lora_weight``; here ReFL's pretraining term on the encoded references, one drawn per row).
* ``form: adapter`` -- an IP-Adapter: the reference's image embedding e_ref (``encoder``; the face encoder's,
  computed by the data side, see ``personalization.encoder.load_image_encoder``) enters every text-attention
  layer through decoupled cross-attention (``backbones.user_attention``: where personalization's user
  embedding goes). ``setup`` installs it; only its new projections (W_p, W'_k, W'_v) train. The CFG's
  unconditional branch gets a zero reference embedding (IP-Adapter's convention), so guidance amplifies the
  identity; sample the same way (``personalization.inject.generate_personalized(..., negative="zero")``).

Defaults are the toy recipe; the paper's values (rewards.md section 7.1): SD1.5 and SDXL, ReFL-style late
step, loss ``L_id_sim + L_id_aes`` (equal weights) -- learning rate, steps and k range are not published.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

import torch
from pydantic import Field

from ..backbones.base import Backbone, Cond
from ..backbones.user_attention import USER_KEY, install_injection, with_user
from .base import register
from .reward_feedback import ReFL


@register("idaligner")
@dataclass
class IDAligner(ReFL):
    form: Literal["lora", "adapter"] = "lora"  # the paper's two variants (see the module docstring)
    lora_weight: Annotated[float, Field(ge=0)] = 0.0  # L_id_lora: denoising loss on the references (LoRA form; 0 = off)
    encoder: str = "toy_identity"  # adapter form: reference-image encoder spec (toy_identity[=DIR], arcface=FILE, clip=DIR)
    embed_dim: Annotated[int, Field(ge=0)] = 32  # its output size (toy_identity: 32; ArcFace: 512)
    tokens: Annotated[int, Field(ge=1)] = 4  # image tokens per reference embedding (IP-Adapter: 4)
    scale: float = 1.0  # weight of the decoupled cross-attention (0: the base model exactly)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.form not in ("lora", "adapter"):
            raise ValueError(f"idaligner form must be 'lora' or 'adapter', got {self.form!r}")
        if self.form == "adapter" and self.embed_dim <= 0:
            raise ValueError("idaligner form adapter: set embed_dim to the reference encoder's output size")
        if self.form == "adapter" and self.beta_kl > 0:
            raise ValueError("idaligner form adapter: beta_kl is not supported (the reference would keep the adapter)")

    def setup(self, backbone: Backbone, reward: Any = None) -> None:
        super().setup(backbone, reward)
        if self.form == "adapter":  # only the adapter trains: freeze a LoRA (or the full model) if any
            for p in backbone.trainable_parameters():
                p.requires_grad_(False)
            install_injection(backbone, embed_dim=self.embed_dim, tokens=self.tokens, scale=self.scale)

    def loss(self, batch: dict, backbone: Backbone) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if "references" not in batch:
            raise ValueError("idaligner: the batch has no reference images (give each prompt .jsonl row a "
                             "\"reference\", or set reward.reference_faces)")
        if self.form == "adapter" and USER_KEY not in batch["cond"].tensors:
            raise ValueError("idaligner form adapter: the conditioning has no reference embedding (objective.encoder "
                             "embeds the batch's references; train through diffalign.training)")
        if self.form == "lora" and self.lora_weight > 0:
            batch = {**batch, "latents": self._reference_latents(batch, backbone)}
        self.pretrain_weight = self.lora_weight if self.form == "lora" else 0.0
        return super().loss(batch, backbone)

    def _start(self, batch: dict, backbone: Backbone) -> tuple[Cond, Cond | None, torch.Tensor, torch.Tensor]:
        cond, uncond, noise, ts = super()._start(batch, backbone)
        if self.form == "adapter" and uncond is not None:  # zero reference embedding in the CFG branch
            uncond = with_user(uncond, torch.zeros_like(cond.tensors[USER_KEY]))
        return cond, uncond, noise, ts

    @staticmethod
    def _reference_latents(batch: dict, backbone: Backbone) -> torch.Tensor:
        """One reference per row (drawn from its K), encoded: the targets of L_id_lora."""
        refs = batch["references"]  # [B or 1, K, 3, H, W]
        b = len(batch["prompts"])
        refs = refs.expand(b, *refs.shape[1:]) if refs.shape[0] == 1 else refs
        pick = torch.randint(refs.shape[1], (b,))
        images = refs[torch.arange(b), pick].to(backbone.device)
        with torch.no_grad():
            return backbone.encode_images(images)
