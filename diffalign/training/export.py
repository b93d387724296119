"""The trained weights in diffusers' formats (a LoRA folder, or the full denoiser, EMA if kept) and
the sample grids the loop draws."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from ..backbones.lora import has_adapter, save_lora
from ..backbones.modules import unwrap
from ..backbones.user_attention import has_injection, save_injection
from ..config import RunConfig

ONE_AT_A_TIME_PX = 256
"""Sample grids at this size and above are drawn one image at a time (peak memory)."""


def save_weights(backbone: Any, out_dir: Path, ema: Any = None, state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write the LoRA (``out_dir/lora``) or the full denoiser (``out_dir/unet|transformer``); the EMA
    weights when ``ema`` is given; from ``state`` (a full state dict gathered by FSDP) when given."""
    model = unwrap(backbone.denoiser)
    if has_injection(model):  # personalization's user branch: its own small file, beside the weights
        target = out_dir / "user_injection.safetensors"
        target.unlink(missing_ok=True)
        save_injection(backbone, target)
    if has_adapter(model):
        return save_lora(backbone, out_dir / "lora", state_dict=state)
    target = out_dir / backbone.denoiser_name
    if state is not None:
        from safetensors.torch import save_file

        target.mkdir(parents=True, exist_ok=True)
        model.save_config(str(target))
        save_file({k: v.detach().cpu().contiguous() for k, v in state.items()},
                  str(target / "diffusion_pytorch_model.safetensors"))
    elif ema is not None:
        m = copy.deepcopy(model)
        ema.copy_to([p for p in m.parameters() if p.requires_grad])
        m.save_pretrained(str(target))
    else:
        model.save_pretrained(str(target))
    return target


@contextlib.contextmanager
def unwrapped(backbone: Any) -> Iterator[Any]:
    """Use the bare denoiser (not the DDP wrapper) inside the block, e.g. to sample on one process."""
    wrapped = backbone.denoiser
    backbone.denoiser = unwrap(wrapped)
    try:
        yield backbone
    finally:
        backbone.denoiser = wrapped


def sample_grid(backbone: Any, cfg: RunConfig, path: Path, seed: int = 0) -> Path:
    """A grid of the config's sample prompts (two seeds each: ``seed`` + 2i and + 2i + 1), written as PNG.

    From ``ONE_AT_A_TIME_PX`` on, one image at a time with the freed heap handed back between them: at 512 px
    with the SD1.5 architecture a batch of the grid (CFG doubles it) and its VAE decode grew the resident set
    beyond the training steps' own peak (docs/BENCHMARKS.md, "Speed, part 4")."""
    from ..sampling.solvers import sample_images
    from ..utils.images import save_grid
    from ..utils.memory import release_free_memory

    t = cfg.train
    prompts = [p for p in t.sample_prompts for _ in range(2)]
    large = backbone.resolution >= ONE_AT_A_TIME_PX
    with unwrapped(backbone):
        imgs = sample_images(backbone, prompts, [seed + i for i in range(len(prompts))], steps=t.sample_steps,
                             guidance_scale=t.sample_guidance, batch_size=1 if large else len(prompts),
                             on_batch=(lambda _: release_free_memory(collect=False)) if large else None)
    return save_grid(imgs, path, nrow=len(prompts) // 2 if len(prompts) > 2 else 2, upscale=4 if imgs.shape[-1] <= 64 else 1)
