"""Online negatives for Diffusion-DRO: a lagged copy of the policy samples trajectories into a replay
buffer of states (timestep, noisy latent, the sampler's own model output).

``LaggedSampler``: the policy as of its last refresh. The official code refreshes a full frozen copy
every optimizer update; weights only change at updates, so with ``refresh_every=1`` the lagged policy
IS the current weights at every rollout and no copy is kept at all. With ``refresh_every=k > 1`` it
keeps a snapshot of the trainable tensors only (the LoRA factors under LoRA: no second model in
memory) and swaps it in for the rollout.

The rollout itself is ``sampling.trajectories.rollout`` (deterministic DDIM without CFG on a
per-sample jittered grid).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from ..backbones.base import Cond
from ..backbones.modules import trainable


def snapshot_trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    """A CPU copy of the trainable tensors (under LoRA: the adapter factors only)."""
    return {n: p.detach().to("cpu", copy=True) for n, p in trainable(model).items()}


@contextlib.contextmanager
def swapped(model: nn.Module, snapshot: dict[str, torch.Tensor]) -> Iterator[None]:
    """Within the block the model's trainable tensors hold ``snapshot`` (an empty one: no change); the
    current values are restored after. Use it for no-grad forwards only."""
    if not snapshot:
        yield
        return
    params = trainable(model)
    current = {n: p.detach().clone() for n, p in params.items()}
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(snapshot[n])
    try:
        yield
    finally:
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(current[n])


class LaggedSampler:
    def __init__(self, refresh_every: int = 1) -> None:
        if refresh_every < 1:
            raise ValueError(f"objective.refresh_every must be >= 1, got {refresh_every}")
        self.refresh_every = refresh_every
        self.updates = 0
        self.snapshot: dict[str, torch.Tensor] = {}

    def refresh(self, model: nn.Module) -> None:
        if self.refresh_every > 1:
            self.snapshot = snapshot_trainable(model)

    def on_update(self, model: nn.Module) -> None:
        self.updates += 1
        if self.updates % self.refresh_every == 0:
            self.refresh(model)

    def active(self, model: nn.Module) -> contextlib.AbstractContextManager[None]:
        """Within the block the model runs with the lagged weights (a no-op when they are current)."""
        return swapped(model, self.snapshot)

    def state_dict(self) -> dict[str, Any]:
        return {"updates": self.updates, "snapshot": dict(self.snapshot)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.updates, self.snapshot = int(state["updates"]), dict(state["snapshot"])


class ReplayBuffer:
    """The last ``size`` trajectories, each with the expert latents and conditioning it was rolled out
    for; kept on the CPU. ``sample`` draws one trajectory and one step per sample."""

    def __init__(self, size: int = 4) -> None:
        if size < 1:
            raise ValueError(f"objective.buffer_size must be >= 1, got {size}")
        self.size = size
        self.items: list[dict[str, torch.Tensor]] = []

    def __len__(self) -> int:
        return len(self.items)

    def add(self, traj: dict[str, torch.Tensor], expert: torch.Tensor, cond: Cond) -> None:
        item = {k: traj[k].detach().cpu() for k in ("t", "xt", "pred")}
        item["expert"] = expert.detach().cpu()
        item.update({f"cond.{k}": v.detach().cpu() for k, v in cond.tensors.items()})
        self.items.append(item)
        del self.items[: -self.size]

    def sample(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, Cond, torch.Tensor, torch.Tensor]:
        """``(t, expert x0, cond, x_t, pred)`` for one random trajectory, a random step per sample."""
        item = self.items[int(torch.randint(len(self.items), ()))]
        steps, b = item["t"].shape[:2]
        step = torch.randint(steps, (b,))
        rows = torch.arange(b)
        cond = Cond({k[5:]: v.to(device) for k, v in item.items() if k.startswith("cond.")})
        return (item["t"][step, rows].to(device), item["expert"].to(device), cond,
                item["xt"][step, rows].to(device), item["pred"][step, rows].to(device))

    def state_dict(self) -> dict[str, Any]:
        return {"size": self.size, "items": list(self.items)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.size, self.items = int(state["size"]), list(state["items"])
