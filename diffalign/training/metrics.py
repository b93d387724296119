"""Metrics of the loop: decisions agreed by every process, the gradient norm, and a logging window
that keeps the objective's metrics as tensors until the logging step (no host sync per step)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch


def agreed_max(accelerator: Any, value: int) -> int:
    """The largest ``value`` over all processes (the same answer everywhere); no collective when alone."""
    if accelerator.num_processes == 1:
        return int(value)
    v = torch.tensor([int(value)], device=accelerator.device, dtype=torch.int64)
    return int(accelerator.gather(v).max().item())


def grad_norm(accelerator: Any, params: list[torch.nn.Parameter], max_norm: float | None) -> float | None:
    """The total gradient norm (before clipping, which it applies when ``max_norm`` is set); None
    where the engine keeps the gradients to itself (DeepSpeed)."""
    if max_norm:
        norm = accelerator.clip_grad_norm_(params, max_norm)
        return None if norm is None else float(norm)
    grads = [p.grad.detach() for p in params if p.grad is not None]
    if not grads:
        return None
    if accelerator.scaler is not None:
        return None
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])))


class MetricWindow:
    """The metrics of the micro-steps since the last log, kept as given (tensors or numbers)."""

    def __init__(self) -> None:
        self.items: list[dict[str, Any]] = []

    def add(self, metrics: dict[str, Any]) -> None:
        self.items.append(metrics)

    def means(self, accelerator: Any) -> dict[str, float]:
        """Mean of each metric over the window and, with several processes, over all of them; empties
        the window. This is where the tensors are read (one host sync per metric)."""
        sums: dict[str, list[float]] = {}
        for k in dict.fromkeys(k for m in self.items for k in m):
            vals = [m[k] for m in self.items if k in m]
            total = sum(torch.stack([torch.as_tensor(v, dtype=torch.float64).cpu() for v in vals]).tolist())
            sums[k] = [total, len(vals)]
        self.items = []
        if accelerator.num_processes > 1:
            from accelerate.utils import gather_object

            merged: dict[str, list[float]] = {}
            for part in gather_object([sums]):
                for k, (total, n) in part.items():
                    s = merged.setdefault(k, [0.0, 0])
                    s[0] += total
                    s[1] += n
            sums = merged
        return {k: total / n for k, (total, n) in sums.items() if n}


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")
