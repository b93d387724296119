"""Toy-world rewards: analytic pixel oracles, a differentiable aesthetic proxy and a tiny learned CLIP.

Registered names (all take images ``[B,3,H,W]`` in [0,1] and toy-grammar prompts):

* ``toy_color``, ``toy_shape``, ``toy_position``, ``toy_count``: analytic oracles, fraction of the
  caption's constraints the image satisfies, in [0,1] (not differentiable). See
  ``diffalign.toyworld.oracles`` for the exact checks; they work on VAE-decoded images.
* ``toy_oracle``: mean of color, shape and position: the held-out truth for reward hacking.
* ``toy_aesthetic``: differentiable "aesthetic" proxy in [0,1], prompt-independent
  (``diffalign.toyworld.aesthetic``).
* ``toy_identity``: cosine of toy identity embeddings, generated vs the reference images in ``context``
  (``diffalign.toyworld.identity``; ID-Aligner's identity reward in the toy world); differentiable.
* ``toy_clip``: ``logit_scale * cos(image, text)`` of the tiny CLIP trained on toy data
  (``diffalign.toyworld.clip.train_toy_clip``), loaded from its directory; differentiable.

Prompts outside the toy grammar raise a ``RewardInputError`` for the oracles (the learned CLIP
accepts any text).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from diffalign.toyworld.aesthetic import aesthetic_score
from diffalign.toyworld.clip import encode_images, encode_texts, load_toy_clip
from diffalign.toyworld.oracles import evaluate

from .base import Reward, RewardInputError
from .registry import register


class ToyOracleReward(Reward):
    """One analytic oracle part (``color``, ``shape``, ``position``, ``count``) or ``oracle`` (their mean)."""

    differentiable = False

    def __init__(self, part: str) -> None:
        super().__init__()
        parts = {
            "color": ("color",),
            "shape": ("shape",),
            "position": ("position",),
            "count": ("count",),
            "oracle": ("color", "shape", "position"),
        }
        if part not in parts:
            raise ValueError(f"unknown toy oracle {part!r}; expected one of {sorted(parts)}")
        self.part = part
        self.name = f"toy_{part}"
        self._parts = parts[part]

    @torch.no_grad()
    def score(self, images: torch.Tensor, prompts: list[str], context: dict[str, Any] | None = None) -> torch.Tensor:
        try:
            return evaluate(images, prompts, self._parts)[self.part]
        except ValueError as e:
            raise RewardInputError(f"{self.name}: {e}") from None

    def details(self, images: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
        """All oracle parts at once (one segmentation): color, shape, position, count, oracle."""
        return evaluate(images, prompts)


class ToyAestheticReward(Reward):
    """The differentiable toy aesthetic proxy (prompt-independent), in [0,1]."""

    name = "toy_aesthetic"
    differentiable = True

    def score(self, images: torch.Tensor, prompts: list[str], context: dict[str, Any] | None = None) -> torch.Tensor:
        return aesthetic_score(images)


class ToyCLIPReward(Reward):
    """PickScore-style reward from a toy CLIP directory: ``logit_scale * cos(image, prompt)``."""

    name = "toy_clip"
    differentiable = True

    def __init__(self, path: str | Path, device: str | torch.device = "cpu") -> None:
        super().__init__()
        self.model, self.tokenizer = load_toy_clip(path, device=device)
        self.model.requires_grad_(False)
        self.path = str(path)

    def score(self, images: torch.Tensor, prompts: list[str], context: dict[str, Any] | None = None) -> torch.Tensor:
        img = encode_images(self.model, images.float())
        with torch.no_grad():
            txt = encode_texts(self.model, self.tokenizer, prompts)
        return self.model.logit_scale.exp() * (img * txt).sum(-1)


def _no_path(name: str, path: str | None, kwargs: dict[str, Any]) -> None:
    if path is not None:
        raise ValueError(f"{name} is an analytic reward and loads no weights; got path={path!r}")
    if kwargs:
        raise TypeError(f"{name} takes no options; got {sorted(kwargs)}")


@register("toy_color")
def _toy_color(path: str | None = None, **kwargs: Any) -> Reward:
    _no_path("toy_color", path, kwargs)
    return ToyOracleReward("color")


@register("toy_shape")
def _toy_shape(path: str | None = None, **kwargs: Any) -> Reward:
    _no_path("toy_shape", path, kwargs)
    return ToyOracleReward("shape")


@register("toy_position")
def _toy_position(path: str | None = None, **kwargs: Any) -> Reward:
    _no_path("toy_position", path, kwargs)
    return ToyOracleReward("position")


@register("toy_count")
def _toy_count(path: str | None = None, **kwargs: Any) -> Reward:
    _no_path("toy_count", path, kwargs)
    return ToyOracleReward("count")


@register("toy_oracle")
def _toy_oracle(path: str | None = None, **kwargs: Any) -> Reward:
    _no_path("toy_oracle", path, kwargs)
    return ToyOracleReward("oracle")


@register("toy_aesthetic")
def _toy_aesthetic(path: str | None = None, **kwargs: Any) -> Reward:
    _no_path("toy_aesthetic", path, kwargs)
    return ToyAestheticReward()


@register("toy_clip")
def _toy_clip(path: str | None = None, device: str | torch.device = "cpu", **kwargs: Any) -> Reward:
    if kwargs:
        raise TypeError(f"toy_clip takes path and device; got unknown options {sorted(kwargs)}")
    if path is None:
        raise ValueError(
            "toy_clip needs path= a directory written by diffalign.toyworld.clip.train_toy_clip "
            "(config.json, model.safetensors, vocab.json, merges.txt)"
        )
    return ToyCLIPReward(path, device=device)


class ToySoftShapeReward(Reward):
    """The differentiable relaxation of ``toy_shape`` (``diffalign.toyworld.soft_shape``), in [0,1]."""

    name = "toy_shape_soft"
    differentiable = True

    def score(self, images: torch.Tensor, prompts: list[str], context: dict[str, Any] | None = None) -> torch.Tensor:
        from diffalign.toyworld.oracles import soft_shape_score

        try:
            return soft_shape_score(images, prompts)
        except ValueError as e:
            raise RewardInputError(f"{self.name}: {e}") from None


@register("toy_shape_soft")
def _toy_shape_soft(path: str | None = None, **kwargs: Any) -> Reward:
    _no_path("toy_shape_soft", path, kwargs)
    return ToySoftShapeReward()


class ToyIdentityReward(Reward):
    """Toy identity reward (ID-Aligner's face-identity reward in the toy world): ``cos(E(image), E(ref))``
    with ``E`` the toy identity network (``diffalign.toyworld.identity``), in [-1, 1]; differentiable.

    The references come through ``context`` as for ``identity`` (``rewards/identity.py``):
    ``context["reference_faces"]`` ``[1 or B,3,H,W]`` (one reference per image, or one for all) or
    ``[1 or B,K,3,H,W]`` (K references, their embeddings averaged), images in [0,1]; or
    ``context["reference_embeddings"]`` ``[1 or B,D]``. The toy world has no face detector: every image
    is scored (no masking)."""

    name = "toy_identity"
    differentiable = True

    def __init__(self, path: str | Path | None = None, device: str | torch.device = "cpu") -> None:
        super().__init__()
        from diffalign.toyworld.identity import load_identity_net

        self.net = load_identity_net(path, device=device)
        self.path = str(path) if path is not None else "(shipped)"

    def reference_embeddings(self, context: dict[str, Any] | None, batch: int) -> torch.Tensor:
        import torch.nn.functional as F

        ctx = context or {}
        dev = next(self.net.parameters()).device
        if "reference_embeddings" in ctx:
            ref = F.normalize(torch.as_tensor(ctx["reference_embeddings"], dtype=torch.float32, device=dev), dim=-1)
            ref = ref.reshape(-1, ref.shape[-1])
        elif "reference_faces" in ctx:
            r = torch.as_tensor(ctx["reference_faces"]).to(dev, torch.float32)
            if r.ndim == 3:
                r = r[None]
            if r.ndim == 4:
                r = r[:, None]
            if r.ndim != 5 or r.shape[2] != 3:
                raise RewardInputError(f"toy_identity: reference_faces must be [N,3,H,W] or [N,K,3,H,W], got "
                                       f"{tuple(r.shape)}")
            n, k = r.shape[:2]
            with torch.no_grad():
                ref = F.normalize(self.net(r.flatten(0, 1)).reshape(n, k, -1).mean(1), dim=-1)
        else:
            raise RewardInputError("toy_identity: context needs 'reference_faces' ([1 or B,(K,)3,H,W] in [0,1]) or "
                                   "'reference_embeddings' ([1 or B,D]); with a config, set reward.reference_faces "
                                   "or give each prompt a reference")
        if ref.shape[0] not in (1, batch):
            raise RewardInputError(f"toy_identity: {ref.shape[0]} references for {batch} images (need 1 or {batch})")
        return ref.expand(batch, -1)

    def score(self, images: torch.Tensor, prompts: list[str], context: dict[str, Any] | None = None) -> torch.Tensor:
        ref = self.reference_embeddings(context, images.shape[0])
        return (self.net(images.float()) * ref).sum(-1)


@register("toy_identity")
def _toy_identity(path: str | None = None, device: str | torch.device = "cpu", **kwargs: Any) -> Reward:
    """``path``: a folder written by ``diffalign.toyworld.identity.train_identity_net`` (default: the shipped one)."""
    if kwargs:
        raise TypeError(f"toy_identity takes path and device; got unknown options {sorted(kwargs)}")
    return ToyIdentityReward(path, device=device)
