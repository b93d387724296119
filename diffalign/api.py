"""``diffalign.sample(...)``: sampling with inference-time alignment, for scripts and notebooks.

    import diffalign
    out = diffalign.sample("models/sd15", ["a red circle"], lora="runs/dpo/final/lora",
                           guidance="rlg", rlg_scale=1.5, steps=30, guidance_scale=7.5, seed=0)
    out.images            # [N,3,H,W] in [0,1]
    out.save("samples/")  # one PNG per image, grid.png, settings.json

Guidance modes: ``"cfg"`` (plain classifier-free guidance), ``"rlg"`` (RL guidance between the model
with its LoRA disabled and enabled), ``"reward"`` (reward-gradient guidance), ``"rlg+reward"``.
``best_of=N`` keeps the best of N candidates per prompt by ``select_reward`` (default: ``reward``);
with ``reject_below=T`` it stops at the first candidate scoring at least T.

Seeds: image i starts from ``torch.Generator("cpu").manual_seed(seed + i)`` noise, drawn as the stock
pipeline draws a batch of one, so an image does not depend on the batch size; best-of candidate k of
image i uses ``seed + i + k * n_images`` (candidate 0 is the plain sample).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .backbones.base import Backbone
from .backbones.modules import unwrap

GUIDANCE_MODES = ("cfg", "rlg", "reward", "rlg+reward")


@dataclass
class Samples:
    """Images and everything needed to reproduce them."""

    images: torch.Tensor  # [N,3,H,W] float in [0,1], on the CPU
    prompts: list[str]
    seeds: list[int]
    settings: dict[str, Any]
    scores: torch.Tensor | None = None  # [N] selection reward of each kept image (best-of-N)
    tries: torch.Tensor | None = None  # [N] candidates drawn per image (best-of-N / rejection)
    extra: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.prompts)

    def pil(self) -> list[Any]:
        """The images as PIL images."""
        from torchvision.transforms.functional import to_pil_image

        return [to_pil_image(x) for x in self.images]

    def records(self) -> list[dict[str, Any]]:
        rows = []
        for i, (p, s) in enumerate(zip(self.prompts, self.seeds, strict=True)):
            row: dict[str, Any] = {"file": f"{i:05d}.png", "prompt": p, "seed": s}
            if self.scores is not None:
                row["score"] = float(self.scores[i])
            if self.tries is not None:
                row["tries"] = int(self.tries[i])
            rows.append(row)
        return rows

    def save(self, out_dir: str | Path, grid_upscale: int | None = None, extra_settings: dict | None = None) -> Path:
        """Write ``00000.png ...`` (one per image), ``grid.png`` and ``settings.json`` into ``out_dir``."""
        from torchvision.utils import save_image

        from .utils.images import save_grid

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        for row, img in zip(self.records(), self.images, strict=True):
            save_image(img, out / row["file"])
        side = self.images.shape[-1]
        save_grid(self.images, out / "grid.png", upscale=grid_upscale or max(1, 128 // max(side, 1)))
        settings = {**self.settings, **(extra_settings or {}), "images": self.records()}
        (out / "settings.json").write_text(json.dumps(settings, indent=2, default=str))
        return out


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("diffalign", "torch", "diffusers", "peft", "transformers"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "unknown"
    return out


def _as_reward(spec: Any, device: torch.device) -> Any:
    """A Reward/Ensemble, or a spec string ``NAME``, ``NAME=PATH`` or ``a:1,b=PATH:0.5`` (an Ensemble)."""
    if spec is None:
        return None
    if isinstance(spec, str):
        import rewards

        spec = rewards.from_spec(spec)
    if isinstance(spec, torch.nn.Module):
        spec.to(device)
    return spec


def _reward_name(spec: Any) -> str | None:
    return spec if isinstance(spec, str) or spec is None else getattr(spec, "name", type(spec).__name__)


def _dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if dtype not in names:
        raise ValueError(f"dtype must be one of {sorted(names)}, got {dtype!r}")
    return names[dtype]


def load_model(model: str | Path | Backbone, lora: str | Path | None = None, *, size: int | None = None,
               device: str | torch.device | None = None, dtype: str | torch.dtype | None = None) -> Backbone:
    """A backbone from a diffusers folder (or the given one), with the LoRA at ``lora`` loaded."""
    from .backbones import load_backbone
    from .backbones.lora import load_lora

    bb = model if isinstance(model, Backbone) else load_backbone(model, dtype=_dtype(dtype), resolution=size)
    if lora:
        load_lora(bb, lora)
    if device is None and not isinstance(model, Backbone):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device is not None and torch.device(device) != bb.device:
        bb.to(device)
    return bb


def _check_tuned(bb: Backbone, guidance: str, rlg_mode: str) -> None:
    from .backbones.lora import has_adapter

    adapter = has_adapter(unwrap(bb.denoiser))
    if not adapter and bb.ref_model is None:
        raise ValueError(
            f"guidance {guidance!r} needs a fine-tuned model to guide with: pass a LoRA (CLI: --lora DIR; Python: "
            "lora=DIR). RL guidance mixes the model with its LoRA disabled (base) and enabled (tuned)."
        )
    if rlg_mode == "approx" and not adapter:
        raise ValueError("approximate RLG scales a LoRA by w, but this model has no LoRA (use rlg_mode='exact')")


def sample(
    model: str | Path | Backbone,
    prompts: str | Sequence[str],
    *,
    lora: str | Path | None = None,
    steps: int = 30,
    guidance_scale: float = 7.5,
    negative_prompt: str = "",
    seed: int = 0,
    images_per_prompt: int = 1,
    size: int | None = None,
    batch_size: int = 4,
    scheduler: str | Any | None = None,
    guidance: str = "cfg",
    rlg_scale: float = 1.0,
    rlg_mode: str = "exact",
    zero_init_step: int = 0,
    rlg_batched: bool = True,
    reward: Any = None,
    reward_scale: float = 1.0,
    reward_schedule: str | Callable[[float], float] = "constant",
    reward_normalize: bool = False,
    best_of: int = 1,
    reject_below: float | None = None,
    select_reward: Any = None,
    latents: torch.Tensor | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    progress: bool = False,
) -> Samples:
    """Generate images for ``prompts`` (a prompt or a list) from ``model`` (a diffusers folder or a Backbone).

    Args:
        lora: a LoRA folder to load (needed by ``guidance="rlg"``: the base is the same network with it disabled).
        steps, guidance_scale, negative_prompt, seed, size, batch_size: the usual knobs; ``size`` is the
            square image side in pixels (default: the model's own).
        scheduler: None (the model's), an alias (``ddim``, ``dpm++``, ``euler``, ``euler_a``, ``unipc``,
            ``flow_euler``, ...) or a diffusers scheduler class name or object.
        guidance: ``"cfg"``, ``"rlg"``, ``"reward"`` or ``"rlg+reward"``.
        rlg_scale: the RLG weight w (0 = base, 1 = tuned, > 1 extrapolates); ``rlg_mode`` ``"exact"``
            (two models, mixed) or ``"approx"`` (the LoRA scaled by w); ``zero_init_step``: model calls
            that use the tuned model alone; ``rlg_batched``: base and tuned rows in one forward.
        reward: a Reward/Ensemble or spec string (``NAME``, ``NAME=PATH``, ``a:1,b=PATH:0.5``) for reward
            guidance (must be differentiable) and, by default, best-of-N selection.
        reward_scale, reward_schedule, reward_normalize: the step on the x0 prediction, its weight over
            the noise level (``constant``, ``increasing`` = 1 - sigma, ``decreasing`` = sigma, or a
            callable of sigma), and whether the gradient is scaled to unit RMS per image.
        best_of, reject_below, select_reward: best-of-N / rejection sampling.
        latents: initial noise ``[N,C,h,w]`` for the N images (instead of seeds; not with best-of-N).
    """
    from tqdm.auto import tqdm

    from .sampling.best_of import best_of_n
    from .sampling.guidance import GuidanceHooks
    from .sampling.solvers import resolve_scheduler, sample_images

    t_start = time.perf_counter()
    modes = _check_modes(guidance)
    prompt_list = [p for p in ([prompts] if isinstance(prompts, str) else list(prompts)) for _ in range(images_per_prompt)]
    n, selecting = len(prompt_list), best_of > 1 or reject_below is not None
    _check_counts(n, images_per_prompt, batch_size, steps, latents, selecting)
    bb = load_model(model, lora, size=size, device=device, dtype=dtype)
    _check_size(bb, size)
    if "rlg" in modes:
        _check_tuned(bb, guidance, rlg_mode)
    guide_reward = _as_reward(reward, bb.device)
    select = _as_reward(select_reward, bb.device) if select_reward is not None else guide_reward
    if "reward" in modes and guide_reward is None:
        raise ValueError("guidance 'reward' needs a differentiable reward (CLI: --reward NAME=PATH)")
    if selecting and select is None:
        raise ValueError("best-of-N / rejection sampling needs a reward to select by (CLI: --reward NAME=PATH)")
    sched = resolve_scheduler(bb, scheduler)
    seeds = [seed + i for i in range(n)]
    hooks = GuidanceHooks(modes, rlg_scale=rlg_scale, rlg_mode=rlg_mode, zero_init_step=zero_init_step,
                          rlg_batched=rlg_batched, reward=guide_reward, reward_scale=reward_scale,
                          reward_schedule=reward_schedule, reward_normalize=reward_normalize)
    bar = tqdm(total=n * (best_of if selecting else 1), desc=f"sampling ({guidance})", unit="img", disable=not progress)

    def sample_round(k: int, idx: list[int]) -> torch.Tensor:
        """Round k (candidate k of best-of-N) of the images ``idx``."""
        return sample_images(
            bb, [prompt_list[i] for i in idx], [seeds[i] + k * n for i in idx], steps=steps,
            guidance_scale=guidance_scale, negative_prompt=negative_prompt, scheduler=sched, height=size, width=size,
            latents=latents[idx] if latents is not None else None, batch_size=batch_size, model_output=hooks,
            on_batch=bar.update,
        )

    t_sample = time.perf_counter()
    scores = tries = None
    if selecting:
        sel = best_of_n(sample_round, prompt_list, select, best_of, threshold=reject_below)
        images, scores, tries, drawn = sel.images, sel.scores, sel.tries, int(sel.tries.sum())
    else:
        images, drawn = sample_round(0, list(range(n))), n
    bar.close()
    sample_seconds = time.perf_counter() - t_sample
    settings = _settings(
        model, bb, sched, images, lora=lora, steps=steps, guidance_scale=guidance_scale,
        negative_prompt=negative_prompt, seed=seed, batch_size=batch_size, images_per_prompt=images_per_prompt,
        guidance=guidance, modes=modes, rlg={"scale": rlg_scale, "mode": rlg_mode, "zero_init_step": zero_init_step,
                                             "batched": rlg_batched, "denoiser_forwards": hooks.forwards},
        reward_guidance={"reward": _reward_name(reward), "scale": reward_scale, "normalize": reward_normalize,
                         "schedule": reward_schedule if isinstance(reward_schedule, str) else repr(reward_schedule)},
        best_of=best_of if selecting else None, reject_below=reject_below,
        select_reward=_reward_name(select_reward if select_reward is not None else reward) if selecting else None,
        custom_latents=latents is not None,
    )
    settings.update(seconds=time.perf_counter() - t_start, sampling_seconds=sample_seconds,
                    seconds_per_image=sample_seconds / max(drawn, 1), candidates_drawn=drawn)
    return Samples(images, prompt_list, seeds, settings, scores=scores, tries=tries)


def _check_modes(guidance: str) -> set[str]:
    if guidance not in GUIDANCE_MODES:
        raise ValueError(f"guidance must be one of {', '.join(GUIDANCE_MODES)}, got {guidance!r}")
    return set(guidance.split("+"))


def pixel_multiple(bb: Backbone) -> int:
    """The image sides this model can sample: multiples of the VAE factor times the denoiser's own
    downsampling (UNet: 2 per down block after the first; SD3/FLUX: the 2x2 patches)."""
    from .backbones.modules import unwrap

    blocks = getattr(unwrap(bb.denoiser).config, "down_block_types", None)
    return bb.vae_scale_factor * (2 ** (len(blocks) - 1) if blocks else 2)


def _check_size(bb: Backbone, size: int | None) -> None:
    if size is None:
        return
    m = pixel_multiple(bb)
    if size <= 0 or size % m:
        raise ValueError(f"size (--size) {size}: must be a positive multiple of {m} pixels for this {bb.family} model "
                         f"(VAE factor {bb.vae_scale_factor} x {m // bb.vae_scale_factor}), e.g. {max(m, size // m * m)}")


def _check_counts(n: int, images_per_prompt: int, batch_size: int, steps: int, latents: torch.Tensor | None,
                  selecting: bool) -> None:
    if images_per_prompt < 1 or batch_size < 1 or steps < 1:
        raise ValueError("images_per_prompt, batch_size and steps must be >= 1")
    if not n:
        raise ValueError("no prompts")
    if latents is not None and selecting:
        raise ValueError("latents cannot be combined with best-of-N (each candidate needs its own noise)")
    if latents is not None and latents.shape[0] != n:
        raise ValueError(f"latents hold {latents.shape[0]} images but there are {n} prompts (x images_per_prompt)")


def _settings(model: Any, bb: Backbone, sched: Any, images: torch.Tensor, *, modes: set[str], rlg: dict[str, Any],
              reward_guidance: dict[str, Any], **given: Any) -> dict[str, Any]:
    """Everything needed to reproduce a ``sample`` call (written to settings.json)."""
    given["lora"] = str(given["lora"]) if given["lora"] else None
    return {
        "model": str(model) if not isinstance(model, Backbone) else type(bb.pipe).__name__,
        "lora": given.pop("lora"), "family": bb.family, "prediction_type": bb.prediction_type,
        "scheduler": type(sched).__name__, "scheduler_config": dict(sched.config),
        "steps": given.pop("steps"), "guidance_scale": given.pop("guidance_scale"),
        "embedded_guidance": bool(getattr(bb, "uses_embedded_guidance", False)),
        "negative_prompt": given.pop("negative_prompt"), "seed": given.pop("seed"),
        "seed_rule": "image i: seed + i; best-of candidate k: seed + i + k * n_images",
        "size": [int(images.shape[-2]), int(images.shape[-1])], "batch_size": given.pop("batch_size"),
        "images_per_prompt": given.pop("images_per_prompt"), "n_images": int(images.shape[0]),
        "guidance": given.pop("guidance"), "rlg": rlg if "rlg" in modes else None,
        "reward_guidance": reward_guidance if "reward" in modes else None,
        **{k: given[k] for k in ("best_of", "reject_below", "select_reward")},
        "device": str(bb.device), "dtype": str(next(bb.denoiser.parameters()).dtype).replace("torch.", ""),
        "versions": versions(), "custom_latents": given["custom_latents"],
    }
