"""Reward feedback: backpropagate a differentiable reward through the sampling chain and the VAE decoder.

ReFL (Xu et al., NeurIPS 2023; THUDM/ImageReward ReFL.py), DRaFT-K and DRaFT-LV (Clark et al., ICLR 2024)
and AlignProp (Prabhudesai et al., 2023; mihirp1998/AlignProp) differ only in which steps of the chain
carry gradient (the chains are in ``diffalign.sampling.chains``). For prompts c and noise x_T ~ N(0, I):

    ReFL       k ~ U{k_lo .. k_hi};  x_{t_k} = sg(chain(x_T -> t_k));  x0 = to_x0(f_theta(x_{t_k}, t_k, c))
    DRaFT-K    x0 = chain(x_T -> 0) with gradient through the last K steps only (K = 1 in the paper)
    DRaFT-LV   x0' = sg(chain(x_T -> 0));  x0^i = step(alpha_1 x0' + sigma_1 eps_i, t_1 -> 0),  i = 1..n
    AlignProp  K ~ truncation (AlignProp: K = 50 - k, k ~ N(42, 5));  DRaFT-K with that K, every grad
               step gradient-checkpointed

and the loss is, with the KL-to-reference term of DRaFT+ (mean over the grad steps of the squared
difference between the policy's and the reference's outputs at the same state):

    L = -reward_scale * mean_b min(r(decode(x0_b), c_b), reward_cap)
        + beta_kl * mean_{grad steps j} mean_b ||f_theta(x_j, t_j, c) - f_ref(x_j, t_j, c)||^2

(the reference f_ref is the denoiser with its adapter disabled: ``backbone.predict(..., reference=True)``;
the outputs are the CFG-guided ones the chain uses, so the term is exactly 0 while the policy equals the
reference). ``reward_cap`` (None: none) stops the gradient of samples above it: ReFL's official loss
relu(2 - r) * 1e-3 is the cap 2 up to a constant, AlignProp's |aes - 10| the cap 10 while aes < 10.
DRaFT-LV's paper sums r over the n copies; here it is averaged, so ``reward_scale`` means the same for
every method. ReFL may add a pretraining loss ``pretrain_weight * mse(f_theta(x_t), target)`` on clean
latents ``batch["latents"]`` (ReFL_SDXL's ``--apply_pre_loss``, which alternates it with the reward step;
here it is summed into the same step; the prompt data kind carries no latents yet, so it is for callers
that add them).

The reward arrives through ``setup(backbone, reward=...)`` (objectives never import ``rewards``); it must
be differentiable (the analytic toy oracles are not: train on them with a policy-gradient method).
The batch is ``{"prompts": list[str], "cond": Cond}`` (plus ``"references"``, reference images the reward
gets as ``context["reference_faces"]``: ID-Aligner's identity reward, ``objectives/idaligner.py``); the CFG's unconditional branch comes from the
backbone (``negative_cond("")``). Defaults are the toy-world recipe; the official values are in the
field comments and in configs/*_{refl,draft,alignprop}.yaml.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

import torch
from pydantic import Field

from ..backbones.base import Backbone, Cond, per_sample_mse
from ..sampling.chains import Chain, cfg_inputs, chain_timesteps, ddim_chain, draw_truncation, refl_x0, renoised_x0
from ..sampling.solvers import guided_output
from .base import Objective, register


@dataclass
class _RewardFeedback(Objective):
    """What every reward-feedback method shares: the chain's grid and CFG, the reward scale, the KL."""

    data_kind = "prompts"
    needs_reward = True

    steps: Annotated[int, Field(ge=1)] = 20  # sampling steps of the chain (ReFL 40 DDPM; DRaFT, AlignProp 50 DDIM)
    guidance_scale: Annotated[float, Field(ge=0)] = 5.0  # CFG in the chain (ReFL 1 = none; DRaFT 7.5; AlignProp 5)
    reward_scale: Annotated[float, Field(gt=0)] = 1.0  # loss = -reward_scale * r (ReFL 1e-3, AlignProp 0.01, DRaFT 1)
    beta_kl: Annotated[float, Field(ge=0)] = 0.0  # KL to the reference along the grad steps (DRaFT+ 1.0; 0 = off)
    reward_cap: float | None = None  # r -> min(r, cap): no gradient above it (ReFL relu(2 - r): cap 2; AlignProp |aes - 10|: 10)

    # --- the objective protocol (the other hooks keep Objective's defaults) -------------------------
    def setup(self, backbone: Backbone, reward: Any = None) -> None:
        if reward is None:
            raise ValueError(f"{type(self).__name__} needs a reward: set the config's reward.train")
        if not getattr(reward, "differentiable", True):
            raise ValueError(
                f"{type(self).__name__} backpropagates the reward, but {getattr(reward, 'name', reward)!r} is not "
                "differentiable (e.g. the analytic toy oracles); use a differentiable reward or a policy-gradient method"
            )
        self.reward = reward
        self._uncond: Cond | None = None

    # --- shared pieces ---------------------------------------------------------------------------
    def _start(self, batch: dict, backbone: Backbone) -> tuple[Cond, Cond | None, torch.Tensor, torch.Tensor]:
        """cond, uncond (CFG), the starting noise x_T and the chain's levels."""
        cond = batch["cond"]
        b = len(cond)
        uncond = None
        if self.guidance_scale != 1.0:
            if getattr(self, "_uncond", None) is None:
                self._uncond = backbone.negative_cond("", 1)
            uncond = self._uncond.repeat(b).to(backbone.device)
        uncond, _ = cfg_inputs(backbone, cond, uncond, self.guidance_scale)  # FLUX-dev: embedded, no uncond
        shape = backbone.latent_shape(b)
        dtype = next(backbone.denoiser.parameters()).dtype
        noise = torch.randn(shape, device=backbone.device, dtype=dtype)
        return cond, uncond, noise, chain_timesteps(backbone, self.steps, shape)

    def _kl(self, chain: Chain, backbone: Backbone, cond: Cond, uncond: Cond | None, n_rep: int = 1) -> torch.Tensor:
        """mean over grad steps of mean_b ||f_theta - f_ref||^2 at the same states (0 when beta_kl = 0)."""
        if self.beta_kl == 0:
            return torch.zeros((), device=chain.x0.device)
        if n_rep > 1:
            cond, uncond = cond.repeat(n_rep), (uncond.repeat(n_rep) if uncond is not None else None)
        scale = 1.0 if uncond is None else self.guidance_scale
        terms = []
        for s in chain.grad_steps:
            ref = guided_output(backbone, s.x, s.t, cond, uncond, scale, reference=True)
            terms.append(per_sample_mse(s.out, ref).mean())
        return torch.stack(terms).mean()

    def _reward_loss(self, x0: torch.Tensor, prompts: list[str], backbone: Backbone, kl: torch.Tensor,
                     extra: dict[str, torch.Tensor], context: dict | None = None,
                     ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        r, members = self._score(backbone.decode_latents(x0), prompts, context)
        r_used = r if self.reward_cap is None else r.clamp(max=self.reward_cap)
        loss = -self.reward_scale * r_used.mean() + self.beta_kl * kl
        metrics = {"loss": loss.detach(), "reward": r.detach().mean(), "reward_std": r.detach().std(unbiased=False),
                   "kl": kl.detach(), **{k: v.detach() for k, v in extra.items()}}
        metrics.update({f"reward/{n}": v.detach().mean() for n, v in members.items()})
        return loss, metrics

    def _score(self, images: torch.Tensor, prompts: list[str],
               context: dict | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The reward ``[B]``; for an ensemble (``member_scores`` + ``combine``) also each member's scores."""
        if hasattr(self.reward, "member_scores") and hasattr(self.reward, "combine"):
            members = self.reward.member_scores(images, prompts, context)
            return self.reward.combine(members).float(), members
        return self.reward(images, prompts, context).float(), {}

    @staticmethod
    def _context(batch: dict, n_rep: int = 1) -> dict | None:
        """The reward's context from the batch: its reference images (``[B or 1,K,3,H,W]``; identity rewards),
        tiled like the prompts when the chain makes ``n_rep`` copies of each row."""
        refs = batch.get("references")
        if refs is None:
            return None
        if n_rep > 1 and refs.shape[0] > 1:
            refs = refs.repeat(n_rep, *([1] * (refs.ndim - 1)))
        return {"reference_faces": refs}


@register("refl")
@dataclass
class ReFL(_RewardFeedback):
    """ReFL: one grad step at a random late step, its one-step x0 (see the module docstring)."""

    guidance_scale: Annotated[float, Field(ge=0)] = 5.0  # official: 1 (no CFG)
    k_lo: Annotated[int, Field(ge=0)] = 15               # first step index that may carry gradient (official 30 of 40 steps)
    k_hi: Annotated[int, Field(ge=0)] = 19               # last one, inclusive (official 39 of 40)
    checkpoint: bool = False     # gradient checkpointing of the grad step (official: UNet checkpointing on)
    pretrain_weight: Annotated[float, Field(ge=0)] = 0.0  # ReFL_SDXL's pretraining denoising loss on batch["latents"] (0 = off)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.k_lo <= self.k_hi < self.steps:
            raise ValueError(f"ReFL needs 0 <= k_lo <= k_hi < steps, got k_lo={self.k_lo}, k_hi={self.k_hi}, "
                             f"steps={self.steps}")

    def loss(self, batch: dict, backbone: Backbone) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        cond, uncond, noise, ts = self._start(batch, backbone)
        k = int(torch.randint(self.k_lo, self.k_hi + 1, ()))
        chain = refl_x0(backbone, noise, cond, uncond, ts, guidance_scale=self.guidance_scale, index=k,
                        checkpoint=self.checkpoint)
        extra = {"grad_step": torch.tensor(float(k))}
        loss, metrics = self._reward_loss(chain.x0, batch["prompts"], backbone, self._kl(chain, backbone, cond, uncond),
                                          extra, self._context(batch))
        if self.pretrain_weight > 0:
            pre = self.pretrain_loss(batch, backbone)
            loss = loss + self.pretrain_weight * pre
            metrics["pretrain_mse"], metrics["loss"] = pre.detach(), loss.detach()
        return loss, metrics

    def pretrain_loss(self, batch: dict, backbone: Backbone) -> torch.Tensor:
        """mean_b mse(f_theta(x_t, t, c), target(x0, eps, t)) on the batch's clean latents."""
        if "latents" not in batch:
            raise ValueError("ReFL pretrain_weight > 0 needs clean latents in the batch (batch['latents'])")
        x0 = batch["latents"].to(backbone.device)
        eps = torch.randn_like(x0)
        t = backbone.sample_timesteps(x0.shape[0], device=x0.device)
        pred = backbone.predict(backbone.add_noise(x0, eps, t), t, batch["cond"])
        return per_sample_mse(pred, backbone.target(x0, eps, t)).mean()


@register("draft")
@dataclass
class DRaFT(_RewardFeedback):
    """DRaFT-K (``lv_copies = 0``) or DRaFT-LV (``lv_copies = n >= 1``; K is then 1 by construction)."""

    guidance_scale: Annotated[float, Field(ge=0)] = 5.0  # official (paper): 7.5
    k: Annotated[int, Field(ge=1)] = 1                   # grad steps at the end of the chain (official K = 1)
    lv_copies: Annotated[int, Field(ge=0)] = 0           # DRaFT-LV: re-noised copies of the last step (official n = 2); 0 = DRaFT-K
    checkpoint: bool = False     # gradient checkpointing of every grad step

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 1 <= self.k <= self.steps:
            raise ValueError(f"DRaFT k must be in [1, steps={self.steps}], got {self.k}")
        if self.lv_copies < 0:
            raise ValueError(f"DRaFT lv_copies must be >= 0, got {self.lv_copies}")

    def loss(self, batch: dict, backbone: Backbone) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        cond, uncond, noise, ts = self._start(batch, backbone)
        prompts = list(batch["prompts"])
        if self.lv_copies == 0:
            chain = ddim_chain(backbone, noise, cond, uncond, ts, guidance_scale=self.guidance_scale,
                               grad_steps=self.k, checkpoint=self.checkpoint)
            kl = self._kl(chain, backbone, cond, uncond)
            return self._reward_loss(chain.x0, prompts, backbone, kl, {"grad_steps": torch.tensor(float(self.k))},
                                     self._context(batch))
        x0 = ddim_chain(backbone, noise, cond, uncond, ts, guidance_scale=self.guidance_scale, grad_steps=0).x0
        chain = renoised_x0(backbone, x0, cond, uncond, ts[-1], guidance_scale=self.guidance_scale, n=self.lv_copies)
        kl = self._kl(chain, backbone, cond, uncond, n_rep=self.lv_copies)
        return self._reward_loss(chain.x0, prompts * self.lv_copies, backbone, kl, {"grad_steps": torch.tensor(1.0)},
                                 self._context(batch, self.lv_copies))


@register("alignprop")
@dataclass
class AlignProp(_RewardFeedback):
    """AlignProp: DRaFT-K with K drawn at random each step and every grad step checkpointed."""

    guidance_scale: Annotated[float, Field(ge=0)] = 5.0  # official 5.0
    reward_scale: Annotated[float, Field(gt=0)] = 1.0  # official 0.01 (on |aes - 10|)
    truncation: Literal["gaussian", "uniform", "fixed"] = "gaussian"  # "gaussian" (official), "uniform", "fixed" (K = k_mean; official "fixed 49" = K1)
    k_mean: Annotated[float, Field(gt=0)] = 4.0              # mean K (official: 50 - 42 = 8 of 50 steps)
    k_std: Annotated[float, Field(ge=0)] = 2.0               # official 5 (in steps)
    checkpoint: bool = True          # official: torch.utils.checkpoint on every step

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.truncation not in ("gaussian", "uniform", "fixed"):
            raise ValueError(f"AlignProp truncation must be gaussian, uniform or fixed, got {self.truncation!r}")
        if self.steps < 2:
            raise ValueError("AlignProp's random truncation needs steps >= 2")

    def loss(self, batch: dict, backbone: Backbone) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        cond, uncond, noise, ts = self._start(batch, backbone)
        k = draw_truncation(self.steps, self.truncation, self.k_mean, self.k_std)
        chain = ddim_chain(backbone, noise, cond, uncond, ts, guidance_scale=self.guidance_scale, grad_steps=k,
                           checkpoint=self.checkpoint)
        kl = self._kl(chain, backbone, cond, uncond)
        return self._reward_loss(chain.x0, list(batch["prompts"]), backbone, kl, {"grad_steps": torch.tensor(float(k))},
                                 self._context(batch))

