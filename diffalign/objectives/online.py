"""What the online objectives (DDPO, Flow-GRPO, DiffusionNFT) share: a trajectory buffer filled by a
rollout when it is empty and drained one chunk per ``loss`` call, per-sample seeded noise, advantages
(group-normalised, or DDPO's per-prompt statistics) and the few collectives a multi-process run needs.

Exactness across processes and resumes: every random draw of a sample (its starting noise, its step
noises, which timesteps it trains on, the noise NFT adds) comes from a generator seeded by
``(run seed, rollout index, global sample row, purpose)``, where the global row is
``rank * local_rows + i``; so process r of P computes what rows ``[r n, (r+1) n)`` of one process with
a P times larger batch would, and a resumed run redraws what the killed one drew. Rewards (and
prompts) are gathered so that advantages see the global batch, as the reference codes do.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch

from ..backbones.base import Cond


# ------------------------------------------------------------------------------------------------
# processes
# ------------------------------------------------------------------------------------------------
def rank_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` ``[n, ...]`` of every process in rank order (the same result everywhere)."""
    import torch.distributed as dist

    rank, world = rank_world()
    if world == 1:
        return x
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    parts = [torch.empty_like(x, device=device) for _ in range(world)]
    dist.all_gather(parts, x.to(device).contiguous())
    return torch.cat([p.to(x.device) for p in parts])


def gather_objects(items: list[Any]) -> list[Any]:
    import torch.distributed as dist

    rank, world = rank_world()
    if world == 1:
        return list(items)
    out: list[Any] = [None] * world
    dist.all_gather_object(out, list(items))
    return [x for part in out for x in part]


# ------------------------------------------------------------------------------------------------
# seeded randomness
# ------------------------------------------------------------------------------------------------
def row_seed(*parts: int | str) -> int:
    h = hashlib.blake2b(":".join(str(p) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") >> 1


def row_noise(shape: tuple[int, ...], rows: torch.Tensor, *key: int | str) -> torch.Tensor:
    """``[B, *shape]`` standard normal noise, row i drawn from a generator seeded by ``(*key, rows[i])``."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(row_seed(*key, int(r))))
                        for r in rows])


def row_perms(n: int, rows: torch.Tensor, *key: int | str) -> torch.Tensor:
    """``[B, n]``: a random permutation of ``range(n)`` per row, seeded by ``(*key, row)``."""
    return torch.stack([torch.randperm(n, generator=torch.Generator().manual_seed(row_seed(*key, int(r))))
                        for r in rows])


# ------------------------------------------------------------------------------------------------
# advantages
# ------------------------------------------------------------------------------------------------
def group_advantages(rewards: torch.Tensor, prompts: list[str], global_std: bool = True,
                     eps: float = 1e-4) -> torch.Tensor:
    """Flow-GRPO / DiffusionNFT (flow_grpo ``PerPromptStatTracker``, cleared every epoch):
    ``A_i = (R_i - mean_{j: p_j = p_i} R_j) / (std + eps)``, std (population) over the prompt's group, or
    over all rewards of the batch with ``global_std``."""
    r = rewards.double()
    adv = torch.empty_like(r)
    for p in dict.fromkeys(prompts):
        m = torch.tensor([q == p for q in prompts])
        std = r.std(unbiased=False) if global_std else r[m].std(unbiased=False)
        adv[m] = (r[m] - r[m].mean()) / (std + eps)
    return adv.float()


class PerPromptStats:
    """DDPO's per-prompt reward statistics (ddpo-pytorch ``PerPromptStatTracker``): each prompt keeps its
    last ``buffer_size`` rewards; a prompt with fewer than ``min_count`` is normalised by the batch's
    mean and std instead. ``A = (R - mean) / (std + 1e-6)``. State: prompt -> float64 tensor."""

    def __init__(self, buffer_size: int = 16, min_count: int = 16) -> None:
        self.buffer_size, self.min_count = buffer_size, min_count
        self.stats: dict[str, torch.Tensor] = {}

    def update(self, rewards: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        r = rewards.double().cpu()
        adv = torch.empty_like(r)
        for p in dict.fromkeys(prompts):
            m = torch.tensor([q == p for q in prompts])
            hist = torch.cat([self.stats.get(p, r.new_zeros(0)), r[m]])[-self.buffer_size:]
            self.stats[p] = hist
            ref = r if len(hist) < self.min_count else hist
            adv[m] = (r[m] - ref.mean()) / (ref.std(unbiased=False) + 1e-6)
        return adv.float()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.stats)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.stats = {k: v.double() for k, v in state.items()}


# ------------------------------------------------------------------------------------------------
# the buffer
# ------------------------------------------------------------------------------------------------
class TrajectoryBuffer:
    """One rollout's samples (row-aligned tensors, on the CPU) and ``order [N, K]``: at the k-th ``loss``
    call after the rollout, sample i trains on its step ``order[i, k]``. Empty once all K calls are made."""

    def __init__(self) -> None:
        self.data: dict[str, torch.Tensor] = {}
        self.cursor = 0

    def __len__(self) -> int:
        return 0 if not self.data else int(self.data["order"].shape[1]) - self.cursor

    @property
    def empty(self) -> bool:
        return len(self) <= 0

    def fill(self, data: dict[str, torch.Tensor], cond: Cond) -> None:
        self.data = {k: v.detach().cpu() for k, v in data.items()}
        self.data.update({f"cond.{k}": v.detach().cpu() for k, v in cond.tensors.items()})
        self.cursor = 0

    def next(self, device: torch.device) -> tuple[torch.Tensor, dict[str, torch.Tensor], Cond]:
        """``(steps [N], rows {name: [N, ...]}, cond)`` for the next call; advances the cursor."""
        steps = self.data["order"][:, self.cursor]
        self.cursor += 1
        rows = {k: v.to(device) for k, v in self.data.items() if not k.startswith("cond.")}
        cond = Cond({k[5:]: v.to(device) for k, v in self.data.items() if k.startswith("cond.")})
        return steps.to(device), rows, cond

    def state_dict(self) -> dict[str, Any]:
        return {"data": dict(self.data), "cursor": self.cursor}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.data, self.cursor = dict(state["data"]), int(state["cursor"])


def repeat_group(prompts: list[str], cond: Cond, k: int) -> tuple[list[str], Cond]:
    """Each prompt k times in a row (a group), with its conditioning."""
    idx = torch.arange(len(prompts)).repeat_interleave(k)
    return [p for p in prompts for _ in range(k)], cond[idx.to(next(iter(cond.tensors.values())).device)]


def take(x: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """``x [N, S, ...]`` at per-row step ``steps [N]`` -> ``[N, ...]``."""
    return x[torch.arange(x.shape[0], device=x.device), steps]
