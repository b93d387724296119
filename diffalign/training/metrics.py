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


def grad_norm(accelerator: Any, params: list[torch.nn.Parameter], max_norm: float | None,
              as_tensor: bool = False) -> Any:
    """The total gradient norm (before clipping, which it applies when ``max_norm`` is set); None
    where the engine keeps the gradients to itself (DeepSpeed). ``as_tensor``: a 0-dim tensor on the
    device, not read on the host (no sync)."""
    if max_norm:
        norm = accelerator.clip_grad_norm_(params, max_norm)
        if norm is None:
            return None
        return torch.as_tensor(norm) if as_tensor else float(norm)
    grads = [p.grad.detach() for p in params if p.grad is not None]
    if not grads:
        return None
    if accelerator.scaler is not None:
        return None
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
    return norm if as_tensor else float(norm)


class MetricWindow:
    """The metrics of the micro-steps since the last log, kept as given (tensors or numbers), each with
    a ``keep`` flag (a bool or a 0-dim bool tensor: the micro-step's loss was finite)."""

    def __init__(self) -> None:
        self.items: list[tuple[dict[str, Any], Any]] = []

    def add(self, metrics: dict[str, Any], keep: Any = True) -> None:
        self.items.append((metrics, keep))

    def means(self, accelerator: Any) -> dict[str, float]:
        """Mean of each metric over the kept micro-steps whose value is finite and, with several processes,
        over all of them; empties the window. This is where the tensors are read: one host sync in all."""
        keys = list(dict.fromkeys(k for m, _ in self.items for k in m))
        sums: dict[str, list[float]] = {}
        if keys:
            rows = []  # per key: [sum of kept finite values, their count]
            for k in keys:
                vals, keeps = zip(*[(m[k], keep) for m, keep in self.items if k in m], strict=True)
                v = torch.stack([torch.as_tensor(x, dtype=torch.float64).detach().cpu().reshape(()) for x in vals])
                ok = torch.stack([torch.as_tensor(x, dtype=torch.bool).cpu().reshape(()) for x in keeps]) & v.isfinite()
                rows.append(torch.stack([torch.where(ok, v, 0.0).sum(), ok.sum().to(torch.float64)]))
            table = torch.stack(rows).tolist()
            sums = {k: [total, int(n)] for k, (total, n) in zip(keys, table, strict=True)}
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
