"""DiffusionNFT (Zheng et al., ICLR 2026, arXiv 2509.16117; NVlabs/DiffusionNFT ``scripts/train_nft_sd3.py``
L906-966): online RL on the forward process, likelihood-free, on every family.

The old policy v_old is a second LoRA adapter ("old") on the same denoiser. It samples ``group_size``
images per prompt with a deterministic ODE (no log-probabilities; official: CFG 1), which are scored and
turned into group-normalised advantages A (as Flow-GRPO) and mapped to an optimality probability

    r = clip(A / adv_clip_max, -1, 1) / 2 + 1/2   in [0, 1].

Training noises each clean sample x0 afresh at the sampler's levels t (the first 9 of 10), x_t = a_t x0 + s_t eps,
and fits implicit positive and negative policies that mix the current and the old prediction,

    v+ = beta v_th + (1 - beta) sg(v_old),        v- = (1 + beta) sg(v_old) - beta v_th
    x0+- = to_x0(v+-, x_t, t)                      (flow: x_t - t v+-; eps/v UNets: their x0 formula)
    w+-  = sg(mean |x0+- - x0|).clamp(1e-5)        (adaptive weighting, per sample)
    L    = adv_clip_max * mean[ r ||x0+ - x0||^2 / w+ + (1 - r) ||x0- - x0||^2 / w- ] / beta
           + kl_beta ||v_th - v_ref||^2             (norms are per-element means; ref = adapter disabled)

``to_x0`` is affine in the model output, so mixing outputs equals mixing x0 estimates: the loss is the
same in x0 space on eps, v and flow models. After each rollout's training the old adapter moves toward
the current one, ``old <- d old + (1 - d) current`` with ``d = min(decay_rate * updates, decay_max)``
(official decay_type 1: 0.001 per optimizer step, at most 0.5). At initialisation old == current, so
x0+ = x0- = x0_th and L = adv_clip_max * mean(mse / mean|x0_th - x0|) / beta.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated, Any

import torch
from pydantic import Field
from torch import nn

from ..backbones.base import Backbone, Cond
from ..backbones.modules import unwrap
from ..sampling.logprob import rollout
from .base import Objective, register
from .online import TrajectoryBuffer, gather_objects, gather_rows, group_advantages, rank_world, repeat_group, row_noise

OLD = "old"


@contextlib.contextmanager
def adapter(model: nn.Module, name: str) -> Iterator[None]:
    """Run the denoiser with LoRA adapter ``name`` active (peft's set_adapter also flips requires_grad:
    the flags are restored on exit, so the optimizer's parameters stay the trainable ones)."""
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    model.set_adapter(name)
    try:
        yield
    finally:
        model.set_adapter("default")
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])


@register("nft")
@dataclass
class DiffusionNFT(Objective):
    beta: Annotated[float, Field(gt=0)] = 1.0
    kl_beta: Annotated[float, Field(ge=0)] = 1e-4
    group_size: Annotated[int, Field(ge=1)] = 4
    steps: Annotated[int, Field(ge=1)] = 10
    guidance_scale: Annotated[float, Field(ge=1)] = 1.0
    timestep_fraction: Annotated[float, Field(gt=0, le=1)] = 0.99
    adv_clip_max: Annotated[float, Field(gt=0)] = 5.0
    global_std: bool = True
    decay_rate: Annotated[float, Field(ge=0)] = 0.001
    decay_max: Annotated[float, Field(ge=0, le=1)] = 0.5
    negative_prompt: str = ""

    data_kind = "prompts"
    needs_reward = True

    def __post_init__(self) -> None:
        super().__post_init__()
        self._pending: dict[str, torch.Tensor] = {}
        self.buffer = TrajectoryBuffer()
        self.rollouts = 0
        self.updates = 0
        self.seed = 0
        self.reward: Any = None
        self._uncond: Cond | None = None

    # --- the old adapter -----------------------------------------------------------------------------
    @staticmethod
    def _pairs(backbone: Backbone) -> list[tuple[nn.Parameter, nn.Parameter]]:
        params = dict(unwrap(backbone.denoiser).named_parameters())
        return [(p, params[n.replace(".default.", f".{OLD}.")]) for n, p in params.items() if ".default." in n]

    def old_state(self, backbone: Backbone) -> dict[str, torch.Tensor]:
        return {n: p.detach().cpu().clone() for n, p in unwrap(backbone.denoiser).named_parameters() if f".{OLD}." in n}

    # --- hooks ---------------------------------------------------------------------------------------
    def setup(self, backbone: Backbone, reward: Any = None) -> None:
        from ..backbones.lora import has_adapter

        if reward is None:
            raise ValueError("objective nft needs a reward (set the config's reward section)")
        model = unwrap(backbone.denoiser)
        if not has_adapter(model):
            raise ValueError("objective nft keeps its old policy as a second LoRA adapter: set model.lora: true")
        self.reward = reward
        self.seed = int(torch.randint(0, 2**62, ()))
        self._uncond = backbone.negative_cond(self.negative_prompt, 1) if self.guidance_scale != 1.0 else None
        self._backbone = backbone
        if OLD not in model.peft_config:
            flags = {n: p.requires_grad for n, p in model.named_parameters()}
            model.add_adapter(model.peft_config["default"], adapter_name=OLD)
            model.set_adapter("default")
            for n, p in model.named_parameters():
                p.requires_grad_(flags.get(n, False))
            with torch.no_grad():
                for cur, old in self._pairs(backbone):
                    old.copy_(cur)

    def on_update(self, backbone: Backbone) -> None:
        self.updates += 1

    def state_dict(self) -> dict[str, Any]:
        return {"buffer": self.buffer.state_dict(), "rollouts": self.rollouts, "updates": self.updates,
                "seed": self.seed, "old": self.old_state(self._backbone)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.buffer.load_state_dict(state["buffer"])
        self.rollouts, self.updates, self.seed = int(state["rollouts"]), int(state["updates"]), int(state["seed"])
        params = dict(unwrap(self._backbone.denoiser).named_parameters())
        with torch.no_grad():
            for n, v in state["old"].items():
                params[n].copy_(v.to(params[n].device, params[n].dtype))

    @torch.no_grad()
    def update_old(self) -> float:
        d = min(self.decay_rate * self.updates, self.decay_max)
        for cur, old in self._pairs(self._backbone):
            old.copy_(old * d + cur.detach() * (1 - d))
        return d

    # --- rollout -------------------------------------------------------------------------------------
    @torch.no_grad()
    def collect(self, batch: dict, backbone: Backbone) -> None:
        """When the buffer is empty: move the old adapter toward the current one (after the first
        rollout), roll out the old policy, score, fill the buffer (the loop calls this before every loss)."""
        if not self.buffer.empty:
            return
        metrics: dict[str, torch.Tensor] = {}
        if self.rollouts > 0:
            metrics["old_decay"] = torch.tensor(self.update_old())
        prompts, cond = repeat_group(batch["prompts"], batch["cond"], self.group_size)
        n = len(prompts)
        rank, _ = rank_world()
        rows = torch.arange(n) + rank * n
        noise = row_noise((self.steps + 1, *backbone.latent_shape(1)[1:]), rows, self.seed, self.rollouts,
                          "noise").transpose(0, 1)
        uncond = self._uncond.repeat(n) if self._uncond is not None else None
        with adapter(unwrap(backbone.denoiser), OLD):
            traj = rollout(backbone, cond, uncond, noise, steps=self.steps, sampler="ode",
                           guidance_scale=self.guidance_scale)
        x0 = traj["xs"][-1]
        rewards = self.reward(backbone.decode_latents(x0), prompts).detach().float().cpu()
        all_rewards = gather_rows(rewards)
        adv = group_advantages(all_rewards, gather_objects(prompts), self.global_std)[rank * n:(rank + 1) * n]
        k = max(1, int(self.steps * self.timestep_fraction))
        order = torch.arange(k).expand(n, k).contiguous()
        self.buffer.fill({"x0": x0, "levels": traj["levels"].transpose(0, 1), "adv": adv, "rows": rows,
                          "order": order}, cond)
        self.rollouts += 1
        metrics.update({"reward_mean": all_rewards.mean(), "reward_std": all_rewards.std(unbiased=False)})
        self._pending = metrics

    # --- the loss ------------------------------------------------------------------------------------
    def loss(self, batch: dict, backbone: Backbone) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if self.buffer.empty:  # called without the loop's collect()
            self.collect(batch, backbone)
        metrics, self._pending = self._pending, {}
        call = self.buffer.cursor
        j, rows, cond = self.buffer.next(backbone.device)
        x0 = rows["x0"].float()
        t = rows["levels"][torch.arange(len(j)), j]
        eps = row_noise(tuple(x0.shape[1:]), rows["rows"].cpu(), self.seed, self.rollouts - 1, call, "train")
        xt = backbone.add_noise(x0, eps.to(x0.device), t)
        out = backbone.predict(xt, t, cond)
        with torch.no_grad(), adapter(unwrap(backbone.denoiser), OLD):
            out_old = backbone.predict(xt, t, cond)
        r = (rows["adv"].clamp(-self.adv_clip_max, self.adv_clip_max) / self.adv_clip_max / 2 + 0.5).clamp(0, 1)
        loss, terms = self.nft_loss(backbone, out, out_old.detach(), xt, t, x0, r)
        if self.kl_beta > 0:
            out_ref = backbone.predict(xt, t, cond, reference=True)
            kl = (out.float() - out_ref.float()).pow(2).flatten(1).mean(1)
            loss = loss + self.kl_beta * kl.mean()
            metrics["kl"] = kl.mean().detach()
        metrics.update({"loss": loss.detach(), **terms})
        return loss, metrics

    def nft_loss(self, backbone: Backbone, out: torch.Tensor, out_old: torch.Tensor, xt: torch.Tensor,
                 t: torch.Tensor, x0: torch.Tensor, r: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The NFT policy loss (module docstring) from current/old outputs at (x_t, t) and r in [0, 1]."""
        pos = self.beta * out.float() + (1 - self.beta) * out_old.float()
        neg = (1 + self.beta) * out_old.float() - self.beta * out.float()
        x0_pos, x0_neg = backbone.to_x0(pos, xt, t).float(), backbone.to_x0(neg, xt, t).float()
        with torch.no_grad():
            w_pos = (x0_pos.double() - x0.double()).abs().flatten(1).mean(1).clamp_min(1e-5)
            w_neg = (x0_neg.double() - x0.double()).abs().flatten(1).mean(1).clamp_min(1e-5)
        l_pos = (x0_pos - x0).pow(2).flatten(1).mean(1) / w_pos
        l_neg = (x0_neg - x0).pow(2).flatten(1).mean(1) / w_neg
        per = r * l_pos / self.beta + (1 - r) * l_neg / self.beta
        loss = (per * self.adv_clip_max).mean().float()
        return loss, {"policy_loss": loss.detach(), "r_mean": r.mean().detach(),
                      "old_deviate": (out.detach().float() - out_old.float()).pow(2).mean()}
