"""PPD, personalized preference fine-tuning (Dang, Singh, Zhou, Ermon, Song; CVPR 2025): Diffusion-DPO
over many users at once, the policy conditioned on the pair's user embedding e_u, the reference not::

    D_w = mse(f_th(x_t^w, t, c, e_u), target^w) - mse(f_ref(x_t^w, t, c), target^w)      (likewise D_l)
    L   = -log sigmoid(-(beta / 2) (D_w - D_l))                                          (as dpo.py)

e_u comes with the batch (``cond.tensors["user_embedding"]``: k other pairs of the same user, pooled,
zeroed at random: embedding dropout; see ``diffalign.data.users``) and reaches the denoiser through the
decoupled cross-attention of ``diffalign.personalization.inject``. The reference is the base network:
no user branch (the embedding is removed from its conditioning: the injection is then exactly off)
and, when a LoRA is attached, the LoRA disabled. ``setup`` installs the injection; only its new
projections train unless ``train_lora``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

import torch
from pydantic import Field

from ..backbones.base import Backbone, per_sample_mse
from ..backbones.modules import unwrap
from ..backbones.user_attention import USER_KEY, install_injection, without_user
from .base import register
from .dpo import DiffusionDPO, noised_pairs


@register("ppd")
@dataclass
class PersonalizedDPO(DiffusionDPO):
    data_kind = "user_pairs"  # multi-user pairs: diffalign.data.users.UserPairs (user_id column)
    encoder: str = ""  # user encoder spec (personalization.encoder.load_encoder): clip=DIR, vlm=DIR, ...
    embed_dim: Annotated[int, Field(ge=0)] = 0  # its output size (the toy CLIP: 64); required for training
    k: Annotated[int, Field(ge=1)] = 4  # other pairs of the same user pooled into each pair's embedding
    embedding_dropout: Annotated[float, Field(ge=0, lt=1)] = 0.1  # probability of a zero embedding
    tokens: Annotated[int, Field(ge=1)] = 4  # user tokens per embedding
    scale: float = 1.0  # weight of the user branch
    train_lora: bool = False  # also train the LoRA (when the model has one); PPD trains only the injection

    def setup(self, backbone: Backbone, reward: Any = None) -> None:
        """Freeze the LoRA unless ``train_lora``, then add the (trainable) user injection."""
        if self.embed_dim <= 0:
            raise ValueError("objective.embed_dim: set it to the user encoder's output size (`diffalign profile "
                             "create` prints it; the toy CLIP's is 64)")
        if not self.train_lora:
            for p in backbone.trainable_parameters():
                p.requires_grad_(False)
        install_injection(backbone, embed_dim=self.embed_dim, tokens=self.tokens, scale=self.scale)

    def loss(self, batch: dict, backbone: Backbone) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        xt, t, cond2, target = noised_pairs(batch, backbone)
        if USER_KEY not in cond2.tensors:
            raise ValueError("ppd: the batch conditioning has no user embedding (train on multi-user pairs)")
        err = per_sample_mse(backbone.predict(xt, t, cond2), target)
        base = without_user(cond2)
        if _has_reference(backbone):
            err_ref = per_sample_mse(backbone.predict(xt, t, base, reference=True), target)
        else:  # no LoRA and no frozen copy: the denoiser without the user branch IS the base
            with torch.no_grad():
                err_ref = per_sample_mse(backbone.predict(xt, t, base), target)
        return self.preference_loss(err, err_ref, batch.get("weight"))


def _has_reference(backbone: Backbone) -> bool:
    from ..backbones.lora import has_adapter

    return backbone.ref_model is not None or has_adapter(unwrap(backbone.denoiser))
