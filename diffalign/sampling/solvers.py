"""Sampling on any backbone with the family's stock diffusers scheduler and classifier-free guidance.

The loop is the stock pipelines' loop made family-agnostic: initial noise drawn as the pipelines draw
it (``randn_tensor`` on the generator's device, times ``init_noise_sigma``), then per step
``out = uncond + s (cond - uncond)`` and ``x = scheduler.step(out, t, x)``. With the same scheduler,
seed and prompts it reproduces the stock pipeline's images. FLUX-dev takes its guidance as an
embedding (one model call per step) instead of CFG.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from tqdm.auto import tqdm

from ..backbones.base import Backbone, Cond

StepCallback = Callable[[int, torch.Tensor, torch.Tensor], None]


def fresh_scheduler(backbone: Backbone, scheduler: Any | None = None) -> Any:
    src = scheduler if scheduler is not None else backbone.pipe.scheduler
    return type(src).from_config(src.config)


SCHEDULER_ALIASES = {
    "ddim": "DDIMScheduler", "ddpm": "DDPMScheduler", "pndm": "PNDMScheduler", "lms": "LMSDiscreteScheduler",
    "euler": "EulerDiscreteScheduler", "euler_a": "EulerAncestralDiscreteScheduler", "heun": "HeunDiscreteScheduler",
    "dpm++": "DPMSolverMultistepScheduler", "dpm": "DPMSolverSinglestepScheduler", "unipc": "UniPCMultistepScheduler",
    "deis": "DEISMultistepScheduler", "flow_euler": "FlowMatchEulerDiscreteScheduler",
    "flow_heun": "FlowMatchHeunDiscreteScheduler",
}


def resolve_scheduler(backbone: Backbone, name: str | Any | None) -> Any:
    """A scheduler for ``backbone`` from its pipeline's config: None (the pipeline's own), a scheduler
    object, an alias (``ddim``, ``dpm++``, ``euler_a``, ``flow_euler``, ...) or a diffusers class name."""
    if name is None or not isinstance(name, str):
        return fresh_scheduler(backbone, name)
    import diffusers

    own = backbone.pipe.scheduler
    cls_name = SCHEDULER_ALIASES.get(name.lower(), name)
    cls = getattr(diffusers, cls_name, None)
    allowed = {type(own), *own.compatibles}
    if backbone.prediction_type == "flow":
        allowed.add(diffusers.FlowMatchHeunDiscreteScheduler)
    if cls is None or cls not in allowed:
        names = sorted({a for a, c in SCHEDULER_ALIASES.items() if getattr(diffusers, c, None) in allowed}
                       | {c.__name__ for c in allowed})
        raise ValueError(f"scheduler {name!r} does not fit this {backbone.family} model "
                         f"({type(own).__name__}); choose one of: {', '.join(names)}")
    return cls.from_config(own.config)


def noise_for_seeds(
    backbone: Backbone, seeds: list[int], height: int | None = None, width: int | None = None,
) -> torch.Tensor:
    """Initial noise, one image per seed, each drawn as the stock pipeline draws a batch of one with
    ``torch.Generator("cpu").manual_seed(seed)``: image i does not depend on the batch it is in."""
    from diffusers.utils.torch_utils import randn_tensor

    shape = (1, *backbone.latent_shape(1, height, width)[1:])
    dtype = next(backbone.denoiser.parameters()).dtype
    return torch.cat([randn_tensor(shape, generator=torch.Generator("cpu").manual_seed(int(s)),
                                   device=backbone.device, dtype=dtype) for s in seeds])


def guided_output(
    backbone: Backbone, x: torch.Tensor, t: torch.Tensor, cond: Cond, uncond: Cond | None, scale: float,
    reference: bool = False,
) -> torch.Tensor:
    """The model output with classifier-free guidance (cond and uncond in one batched call)."""
    tt = t.expand(x.shape[0]) if t.ndim == 0 else t
    if uncond is None or scale == 1.0:
        return backbone.predict(x, tt, cond, reference=reference)
    both = backbone.predict(torch.cat([x, x]), torch.cat([tt, tt]), Cond.cat([uncond, cond]), reference=reference)
    out_u, out_c = both.chunk(2)
    return out_u + scale * (out_c - out_u)


@torch.no_grad()
def sample_latents(
    backbone: Backbone,
    cond: Cond,
    uncond: Cond | None,
    *,
    steps: int = 30,
    guidance_scale: float = 7.5,
    generator: torch.Generator | None = None,
    latents: torch.Tensor | None = None,
    height: int | None = None,
    width: int | None = None,
    scheduler: Any | None = None,
    progress: bool = False,
    model_output: Callable[..., torch.Tensor] | None = None,
) -> torch.Tensor:
    """Denoise from noise to clean latents ``[B,C,h,w]``. ``model_output`` may replace the guided
    model call (signature of ``guided_output``), e.g. for RL guidance."""
    from diffusers.utils.torch_utils import randn_tensor

    sched = fresh_scheduler(backbone, scheduler)
    shape = backbone.latent_shape(len(cond), height, width)
    dtype = next(backbone.denoiser.parameters()).dtype
    if latents is None:
        latents = randn_tensor(shape, generator=generator, device=backbone.device, dtype=dtype)
    timesteps = backbone.set_timesteps(sched, steps, shape)  # before init_noise_sigma (Euler sets it here)
    x = latents.to(backbone.device) * getattr(sched, "init_noise_sigma", 1.0)
    embedded = getattr(backbone, "uses_embedded_guidance", False)
    scale = 1.0 if embedded else guidance_scale
    if embedded:
        backbone.embedded_guidance = guidance_scale
    call = model_output or guided_output
    # stochastic schedulers (DDPM, Euler ancestral) draw their step noise from the generator, as the pipelines do
    step_kw = {"generator": generator} if generator is not None and "generator" in _step_params(sched) else {}
    for t in tqdm(timesteps, desc="sampling", disable=not progress, leave=False):
        xin = sched.scale_model_input(x, t) if hasattr(sched, "scale_model_input") else x
        out = call(backbone, xin, t, cond, None if embedded else uncond, scale)
        x = sched.step(out, t, x, return_dict=False, **step_kw)[0]
    return x


def _step_params(sched: Any) -> set[str]:
    import inspect

    return set(inspect.signature(sched.step).parameters)


@torch.no_grad()
def generate(
    backbone: Backbone,
    prompts: list[str],
    *,
    negative_prompt: str = "",
    steps: int = 30,
    guidance_scale: float = 7.5,
    seed: int | None = 0,
    generator: torch.Generator | None = None,
    height: int | None = None,
    width: int | None = None,
    scheduler: Any | None = None,
    progress: bool = False,
    latents: torch.Tensor | None = None,
) -> torch.Tensor:
    """Images ``[B,3,H,W]`` in [0,1] for ``prompts`` (from ``latents`` when given, else seeded noise)."""
    if generator is None and seed is not None:
        generator = torch.Generator("cpu").manual_seed(seed)
    cond = backbone.encode_prompts(list(prompts))
    uncond = backbone.negative_cond(negative_prompt, len(prompts)) if guidance_scale != 1.0 else None
    lat = sample_latents(
        backbone, cond, uncond, steps=steps, guidance_scale=guidance_scale, generator=generator,
        height=height, width=width, scheduler=scheduler, progress=progress, latents=latents,
    )
    return backbone.decode_latents(lat)


def sample_images(
    backbone: Backbone, prompts: list[str], seeds: list[int], *, steps: int, guidance_scale: float,
    negative_prompt: str = "", scheduler: Any | None = None, height: int | None = None, width: int | None = None,
    latents: torch.Tensor | None = None, batch_size: int = 4,
    model_output: Callable[[list[str]], Callable[..., torch.Tensor] | None] | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Images ``[N,3,H,W]`` in [0,1] on the CPU, one per prompt, in batches of ``batch_size``: image i
    starts from ``noise_for_seeds([seeds[i]])`` (or ``latents[i]``), so it does not depend on the batch.
    ``model_output(batch_prompts)`` may return a guided model call for that batch (RLG, reward guidance);
    a stochastic scheduler's step noise comes from the batch's first seed. ``on_batch(n)`` reports progress."""
    out = []
    for j in range(0, len(prompts), batch_size):
        ps, ss = prompts[j : j + batch_size], seeds[j : j + batch_size]
        noise = latents[j : j + batch_size] if latents is not None else noise_for_seeds(backbone, ss, height, width)
        cond = backbone.encode_prompts(ps)
        uncond = backbone.negative_cond(negative_prompt, len(ps)) if guidance_scale != 1.0 else None
        lat = sample_latents(
            backbone, cond, uncond, steps=steps, guidance_scale=guidance_scale, latents=noise, scheduler=scheduler,
            generator=torch.Generator("cpu").manual_seed(ss[0]), height=height, width=width,
            model_output=model_output(ps) if model_output else None,
        )
        with torch.no_grad():
            out.append(backbone.decode_latents(lat).float().cpu())
        if on_batch:
            on_batch(len(ps))
    return torch.cat(out)
