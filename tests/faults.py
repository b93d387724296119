"""Fault injection for the reliability tests and drill: run ``diffalign`` with faults at chosen steps.

    DIFFALIGN_FAULTS='[{"call": 3, "fault": "nan_loss"}, {"call": 5, "fault": "sigterm", "rank": 1}]' \\
        python tests/faults.py train CONFIG [--resume latest] [--section.key VALUE ...]

(also under ``accelerate launch ... tests/faults.py train CONFIG``). ``call`` counts the
objective's ``loss`` calls in this process from 1: the optimizer step when ``grad_accum`` is 1 and
the run starts from scratch (a resumed process counts from 1 again). ``rank`` (optional) limits a
fault to one process. Faults, applied right after ``loss`` returns:

    nan_loss, inf_loss   the loss becomes NaN / inf (its gradients too)
    nan_grad             the loss stays finite, its gradient is NaN
    sleep                sleep ``seconds`` (default 3600: a hang to be killed from outside)
    sigterm, sigint      the process signals itself
    sigkill              the process kills itself (kill -9: no handler, no cleanup)

It lives with the tests, outside the package: nothing here is imported by a normal run.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from typing import Any

import torch


class _NaNGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:
        return g * float("nan")


class FaultyObjective:
    """Wraps an objective; every other attribute (hooks, state, data_kind) is the wrapped one's."""

    def __init__(self, inner: Any, faults: list[dict[str, Any]], rank: int = 0) -> None:
        self._inner, self._faults, self._rank, self.calls = inner, faults, rank, 0

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._inner, name)

    def loss(self, batch: dict, backbone: Any) -> tuple[torch.Tensor, dict[str, float]]:
        self.calls += 1
        loss, metrics = self._inner.loss(batch, backbone)
        for f in self._faults:
            if f["call"] != self.calls or f.get("rank", self._rank) != self._rank:
                continue
            kind = f["fault"]
            if kind == "nan_loss":
                loss = loss * float("nan")
            elif kind == "inf_loss":
                loss = loss * float("inf")
            elif kind == "nan_grad":
                loss = _NaNGrad.apply(loss)
            elif kind == "sleep":
                time.sleep(float(f.get("seconds", 3600)))
            elif kind in ("sigterm", "sigint", "sigkill"):
                os.kill(os.getpid(), {"sigterm": signal.SIGTERM, "sigint": signal.SIGINT, "sigkill": signal.SIGKILL}[kind])
            else:
                raise ValueError(f"DIFFALIGN_FAULTS: unknown fault {kind!r}")
        return loss, metrics


def faulty_builder(build: Any, faults: list[dict[str, Any]], rank: int | None = None) -> Any:
    """``build_objective`` that wraps what ``build`` returns in :class:`FaultyObjective`."""
    rank = int(os.environ.get("RANK", "0")) if rank is None else rank

    def build_faulty(name: str, **kwargs: Any) -> FaultyObjective:
        return FaultyObjective(build(name, **kwargs), faults, rank)

    return build_faulty


def install(faults: list[dict[str, Any]], rank: int | None = None) -> None:
    """Make the training loop wrap its objective in :class:`FaultyObjective` (for this process)."""
    from diffalign.training import loop

    loop.build_objective = faulty_builder(loop.build_objective, faults, rank)  # type: ignore[assignment]


def main(argv: list[str] | None = None) -> int:
    from diffalign.cli import main as cli_main

    install(json.loads(os.environ.get("DIFFALIGN_FAULTS", "[]")))
    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
