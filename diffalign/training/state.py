"""What a checkpoint holds beside accelerate's own state: the objective's state and the EMA (one
file per process, read back with ``torch.load(weights_only=True)``), and accelerate hooks that keep
only the trainable tensors (the LoRA) of the denoiser in every checkpoint."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from . import checkpoints as ckpt

logger = logging.getLogger(__name__)

STATE_FILE = "diffalign_state_{rank}.pt"  # per process, inside checkpoints/step_N/state/


def keep_trainable_only(models: list[Any], weights: list[dict[str, torch.Tensor]], output_dir: str) -> None:
    """accelerate's save hook: keep only the trainable tensors of each model (LoRA: a few MB instead
    of the whole frozen denoiser, 3.4 GB for SD1.5 and 24 GB for FLUX, in every checkpoint). The
    frozen base is rebuilt from ``model.path`` on resume."""
    for i, (model, sd) in enumerate(zip(models, weights, strict=False)):
        names = {n for n, p in model.named_parameters() if p.requires_grad}
        if names:
            weights[i] = {k: v for k, v in sd.items() if k in names}


def load_trainable_only(models: list[Any], input_dir: str) -> None:
    """accelerate's load hook for :func:`keep_trainable_only` checkpoints: load the trainable tensors
    (all of them, exactly) and leave the rest of the model as built. A checkpoint with the full state
    dict is left to accelerate."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    f = Path(input_dir) / "model.safetensors"
    if not models or not f.is_file():
        return
    model = models[0]
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    with safe_open(str(f), "pt") as fh:
        keys = set(fh.keys())
    if len(keys) > len(trainable) and keys >= set(trainable):
        return  # a full state dict
    if keys != set(trainable):
        missing, extra = sorted(set(trainable) - keys), sorted(keys - set(trainable))
        raise ckpt.CheckpointError(f"{f}: its tensors do not match the trainable parameters (missing "
                                   f"{missing[:3]}{'...' if len(missing) > 3 else ''}, unexpected {extra[:3]})")
    sd = load_file(str(f))
    with torch.no_grad():
        for n, p in trainable.items():
            if sd[n].shape != p.shape:
                raise ckpt.CheckpointError(f"{f}: {n} has shape {tuple(sd[n].shape)}, the model {tuple(p.shape)}")
            p.copy_(sd[n].to(device=p.device, dtype=p.dtype))
    models.remove(model)


def check_rng_file(state: Path, rank: int, num_processes: int) -> None:
    """accelerate logs and ignores an unreadable RNG file, which would make a resume silently inexact."""
    from accelerate.utils.other import load

    f = state / f"random_states_{rank}.pkl"
    if not f.is_file():
        if rank == 0 or num_processes == 1:
            raise ckpt.CheckpointError(f"{f}: missing")
        logger.warning("%s: missing (the checkpoint was written by fewer processes); this process starts a "
                       "fresh random stream", f)
        return
    try:
        load(f)  # weights_only=True with accelerate's allow-list (numpy RNG state)
    except Exception as e:
        raise ckpt.CheckpointError(f"{f}: unreadable ({type(e).__name__}: {e})") from e


def save_extra_state(state: Path, rank: int, ema: Any, stateful: Any) -> None:
    payload: dict[str, Any] = {}
    if stateful is not None:
        payload["objective"] = stateful.state_dict()
    if ema is not None:
        payload["ema"] = ema.state_dict()
    if payload:
        torch.save(payload, state / STATE_FILE.format(rank=rank))


def load_extra_state(state: Path, rank: int, ema: Any, stateful: Any) -> None:
    """The objective's state from this process's file, the EMA from the main process's file."""
    if stateful is not None:
        f = state / STATE_FILE.format(rank=rank)
        if f.is_file():
            stateful.load_state_dict(torch.load(f, map_location="cpu", weights_only=True)["objective"])
        elif rank == 0:
            raise ckpt.CheckpointError(f"{f}: missing (the objective's state)")
        else:
            logger.warning("%s: missing (the checkpoint was written by fewer processes); this process's objective "
                           "state starts fresh", f)
    if ema is not None:
        f = state / STATE_FILE.format(rank=0)
        payload = torch.load(f, map_location="cpu", weights_only=True) if f.is_file() else {}
        if "ema" not in payload:
            raise ckpt.CheckpointError(f"{f}: no EMA state (was the run started without train.ema?)")
        ema.load_state_dict(payload["ema"])
