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
from typing import Any, ClassVar

import torch

from ..backbones.base import Backbone, per_sample_mse
from .dpo import DiffusionDPO, noised_pairs


@dataclass
class PersonalizedDPO(DiffusionDPO):
    data_kind: ClassVar[str] = "user_pairs"
    encoder: str = ""  # user encoder spec (personalization.encoder.load_encoder): clip=DIR, vlm=DIR, ...
    k: int = 4  # pairs pooled into each user embedding
    embedding_dropout: float = 0.1  # probability of a zero embedding (the "any user" condition)
    tokens: int = 4  # user tokens per embedding
    scale: float = 1.0  # weight of the user branch
    train_lora: bool = False  # also train the LoRA (when the model has one); PPD trains only the injection
    embed_dim: int = 0  # the encoder's output size; 0: read from the encoder in setup()

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.k < 1 or self.tokens < 1:
            raise ValueError(f"ppd: k and tokens must be >= 1, got k={self.k}, tokens={self.tokens}")
        if not 0.0 <= self.embedding_dropout < 1.0:
            raise ValueError(f"ppd: embedding_dropout must be in [0, 1), got {self.embedding_dropout}")

    def setup(self, backbone: Backbone, reward: Any = None) -> None:
        """Freeze the LoRA unless ``train_lora``, then add the (trainable) user injection."""
        from ..personalization.inject import install_injection

        dim = self.embed_dim
        if dim <= 0:
            if not self.encoder:
                raise ValueError("ppd: set objective.encoder (a user encoder spec such as clip=DIR) or embed_dim")
            from ..personalization.encoder import load_encoder

            dim = load_encoder(self.encoder).dim
            self.embed_dim = dim
        if not self.train_lora:
            for p in backbone.trainable_parameters():
                p.requires_grad_(False)
        install_injection(backbone, embed_dim=dim, tokens=self.tokens, scale=self.scale)

    def loss(self, batch: dict, backbone: Backbone) -> tuple[torch.Tensor, dict[str, Any]]:
        from ..personalization.inject import USER_KEY, without_user

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

    model = backbone.denoiser
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return backbone.ref_model is not None or has_adapter(model)
