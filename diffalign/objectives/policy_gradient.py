"""Policy-gradient RL on the denoising chain: DDPO (Black et al., 2023; kvablack/ddpo-pytorch) and
Flow-GRPO (Liu et al., 2025; yifan123/flow_grpo), on every family.

A rollout samples ``group_size`` images per prompt with the policy as it is now (no grad), recording
each transition's log-probability ``log pi_old(x_{j+1} | x_j, c)`` (``sampling/logprob.py``), scores the
images with the reward and turns rewards into advantages A. The following ``loss`` calls each train every
sample on one of its steps j (PPO-clip, ratio per transition):

    ratio = exp(log pi_th(x_{j+1} | x_j, c) - log pi_old(x_{j+1} | x_j, c))
    L_pg  = mean( max(-A ratio, -A clip(ratio, 1 - eps, 1 + eps)) ),   A clipped to +-adv_clip_max
    KL_j  = mean_elements( (mu_th - mu_ref)^2 ) / (2 std_j^2)     (same-variance Gaussians; ref = adapter off)
    L     = L_pg + kl_beta * mean(KL_j)

* DDPO: DDIM with eta = 1 and CFG 5 in sampling and training; A from per-prompt statistics (each
  prompt's last 16 rewards, the batch's statistics until a prompt has 16); each sample trains on a random
  ``timestep_fraction`` of its steps; no KL. Official: 50 steps, clip 1e-4, adv clip 5, AdamW 3e-4.
* Flow-GRPO: the flow SDE step (eta = noise level 0.7), or CPS (0.8); A group-normalised over the
  ``group_size`` samples of a prompt (std over the whole batch with ``global_std``); trains the first
  ``int(steps * timestep_fraction)`` steps (9 of 10), or only an SDE window of ``sde_window`` steps placed
  at random in the first half (Flow-GRPO-Fast, ODE elsewhere); KL 0.04 (0.01 PickScore, 0 fast/CPS).
  ``guidance_scale = 1`` is the CFG-free recipe (CFG 1 in rollouts and training).

The training loop stays the same as for offline methods: the buffer is filled when empty (from the
batch's prompts) and each call drains one chunk, so ``train.grad_accum = `` the number of trained steps
gives the references' one optimizer update per rollout (on-policy: ratio == 1 exactly).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

import torch
from pydantic import Field

from ..backbones.base import Backbone, Cond
from ..sampling.logprob import rollout, transition_logprob
from .base import Objective, register
from .online import (
    PerPromptStats,
    TrajectoryBuffer,
    gather_objects,
    gather_rows,
    group_advantages,
    rank_world,
    repeat_group,
    row_noise,
    row_perms,
    row_seed,
    take,
)


@dataclass
class _PolicyGradient(Objective):
    group_size: Annotated[int, Field(ge=1)] = 4
    steps: Annotated[int, Field(ge=1)] = 10
    sampler: Literal["ddim_eta", "flow_sde", "cps"] = "ddim_eta"
    eta: Annotated[float, Field(gt=0)] = 1.0
    guidance_scale: Annotated[float, Field(ge=1)] = 5.0
    clip_range: Annotated[float, Field(gt=0)] = 1e-4
    adv_clip_max: Annotated[float, Field(gt=0)] = 5.0
    kl_beta: Annotated[float, Field(ge=0)] = 0.0
    timestep_fraction: Annotated[float, Field(gt=0, le=1)] = 1.0
    negative_prompt: str = ""

    data_kind = "prompts"
    needs_reward = True

    def __post_init__(self) -> None:
        super().__post_init__()
        self._pending: dict[str, torch.Tensor] = {}
        self.buffer = TrajectoryBuffer()
        self.rollouts = 0
        self.seed = 0
        self.reward: Any = None
        self._uncond: Cond | None = None

    # --- hooks -----------------------------------------------------------------------------------
    def setup(self, backbone: Backbone, reward: Any = None) -> None:
        if reward is None:
            raise ValueError(f"objective {type(self).__name__} needs a reward (set the config's reward section)")
        self.reward = reward
        self.seed = int(torch.randint(0, 2**62, ()))  # the run's seed (set_seed before), equal on all processes
        self._uncond = backbone.negative_cond(self.negative_prompt, 1) if self.guidance_scale != 1.0 else None

    def on_update(self, backbone: Backbone) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {"buffer": self.buffer.state_dict(), "rollouts": self.rollouts, "seed": self.seed, **self._extra_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.buffer.load_state_dict(state["buffer"])
        self.rollouts, self.seed = int(state["rollouts"]), int(state["seed"])
        self._load_extra_state(state)

    def _extra_state(self) -> dict[str, Any]:
        return {}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        pass

    # --- what DDPO and Flow-GRPO set differently ------------------------------------------------------
    def advantages(self, rewards: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        raise NotImplementedError

    def train_order(self, stochastic: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """``[N, K]``: the steps each sample trains on, in call order."""
        raise NotImplementedError

    def sde_steps(self) -> torch.Tensor | None:
        return None

    # --- rollout ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def collect(self, batch: dict, backbone: Backbone) -> None:
        """When the buffer is empty: roll out ``group_size`` samples per prompt with the policy as it is
        now, score them and fill the buffer (the loop calls this before every ``loss``)."""
        if not self.buffer.empty:
            return
        prompts, cond = repeat_group(batch["prompts"], batch["cond"], self.group_size)
        n = len(prompts)
        rank, _ = rank_world()
        rows = torch.arange(n) + rank * n
        key = (self.seed, self.rollouts)
        noise = row_noise((self.steps + 1, *backbone.latent_shape(1)[1:]), rows, *key, "noise").transpose(0, 1)
        uncond = self._uncond.repeat(n) if self._uncond is not None else None
        sde = self.sde_steps()
        traj = rollout(backbone, cond, uncond, noise, steps=self.steps, sampler=self.sampler, eta=self.eta,
                       guidance_scale=self.guidance_scale, sde_steps=sde)
        images = backbone.decode_latents(traj["xs"][-1])
        rewards = self.reward(images, prompts).detach().float().cpu()
        all_rewards, all_prompts = gather_rows(rewards), gather_objects(prompts)
        adv = self.advantages(all_rewards, all_prompts)[rank * n:(rank + 1) * n]
        stochastic = traj["std"][:, 0].cpu() > 0
        if sde is not None:
            stochastic &= sde
        order = self.train_order(stochastic, rows)
        self.buffer.fill({"xs": traj["xs"].transpose(0, 1), "levels": traj["levels"].transpose(0, 1),
                          "logprob": traj["logprob"].transpose(0, 1), "adv": adv, "order": order}, cond)
        self.rollouts += 1
        self._pending = {"reward_mean": all_rewards.mean(), "reward_std": all_rewards.std(unbiased=False),
                         "rollout": torch.tensor(float(self.rollouts))}

    # --- the loss --------------------------------------------------------------------------------------
    def loss(self, batch: dict, backbone: Backbone) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if self.buffer.empty:  # called without the loop's collect()
            self.collect(batch, backbone)
        metrics, self._pending = self._pending, {}
        j, rows, cond = self.buffer.next(backbone.device)
        x, x_next = take(rows["xs"], j), take(rows["xs"], j + 1)
        t, t_next = take(rows["levels"], j), take(rows["levels"], j + 1)
        uncond = self._uncond.repeat(len(cond)) if self._uncond is not None else None
        kw = {"sampler": self.sampler, "eta": self.eta, "guidance_scale": self.guidance_scale}
        cur = transition_logprob(backbone, x, t, t_next, x_next, cond, uncond, **kw)
        log_ratio = cur.logprob - take(rows["logprob"], j)
        ratio = torch.exp(log_ratio)
        adv = rows["adv"].clamp(-self.adv_clip_max, self.adv_clip_max)
        pg = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - self.clip_range, 1 + self.clip_range)).mean()
        loss = pg
        if self.kl_beta > 0:
            ref = transition_logprob(backbone, x, t, t_next, x_next, cond, uncond, reference=True, **kw)
            kl = (cur.mean - ref.mean).pow(2).flatten(1).mean(1) / (2 * cur.std.pow(2))
            loss = loss + self.kl_beta * kl.mean()
            metrics["kl"] = kl.mean().detach()
        metrics.update({
            "loss": loss.detach(), "policy_loss": pg.detach(), "ratio": ratio.mean().detach(),
            "ratio_dev": (ratio - 1).abs().max().detach(), "approx_kl": 0.5 * log_ratio.pow(2).mean().detach(),
            "clipfrac": ((ratio - 1).abs() > self.clip_range).float().mean().detach(),
        })
        return loss, metrics


@register("ddpo")
@dataclass
class DDPO(_PolicyGradient):
    """DDPO-clip (ddpo-pytorch defaults: DDIM eta 1, CFG 5, clip 1e-4, adv clip 5, per-prompt statistics
    with buffer 16 / min count 16, timestep_fraction 1.0). ``group_size`` 1 is the official setting
    (prompts repeat across epochs and the per-prompt buffers fill from them)."""

    group_size: Annotated[int, Field(ge=1)] = 1
    steps: Annotated[int, Field(ge=1)] = 50
    stat_buffer: Annotated[int, Field(ge=1)] = 16
    stat_min_count: Annotated[int, Field(ge=1)] = 16

    def __post_init__(self) -> None:
        super().__post_init__()
        self.stats = PerPromptStats(self.stat_buffer, self.stat_min_count)

    def advantages(self, rewards: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return self.stats.update(rewards, prompts)

    def train_order(self, stochastic: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        idx = torch.nonzero(stochastic).flatten()
        k = max(1, int(len(idx) * self.timestep_fraction))
        perms = row_perms(len(idx), rows, self.seed, self.rollouts, "steps")
        return idx[perms[:, :k]]

    def _extra_state(self) -> dict[str, Any]:
        return {"stats": self.stats.state_dict()}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self.stats.load_state_dict(state["stats"])


@register("grpo")
@dataclass
class FlowGRPO(_PolicyGradient):
    """Flow-GRPO (flow_grpo ``config/grpo.py``: 10 sampling steps, SDE a = 0.7, CFG 4.5, group 24,
    9 of 10 steps trained, clip 1e-4, KL 0.04, global std). ``sde_window`` > 0: Flow-GRPO-Fast (the
    stochastic window at a random place in the first half of the steps, the rest ODE; one window per
    rollout, shared by all processes)."""

    steps: Annotated[int, Field(ge=1)] = 10
    sampler: Literal["ddim_eta", "flow_sde", "cps"] = "flow_sde"
    eta: Annotated[float, Field(gt=0)] = 0.7
    guidance_scale: Annotated[float, Field(ge=1)] = 4.5
    kl_beta: Annotated[float, Field(ge=0)] = 0.04
    timestep_fraction: Annotated[float, Field(gt=0, le=1)] = 0.99
    global_std: bool = True
    sde_window: Annotated[int, Field(ge=0)] = 0

    def advantages(self, rewards: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return group_advantages(rewards, prompts, self.global_std)

    def sde_steps(self) -> torch.Tensor | None:
        if self.sde_window <= 0:
            return None
        hi = max(1, self.steps // 2 - self.sde_window + 1)
        g = torch.Generator().manual_seed(row_seed(self.seed, self.rollouts, "window"))
        start = int(torch.randint(0, hi, (), generator=g))
        mask = torch.zeros(self.steps, dtype=torch.bool)
        mask[start:start + self.sde_window] = True
        return mask

    def train_order(self, stochastic: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        idx = torch.nonzero(stochastic).flatten()
        k = len(idx) if self.sde_window > 0 else max(1, min(len(idx), int(self.steps * self.timestep_fraction)))
        return idx[:k].expand(len(rows), k).contiguous()
