"""Precise toy-world evaluation: per-sample scores on >= 1024 held-out samples, paired intervals.

The protocol (``Protocol``): ``prompts`` held-out captions (``eval_prompts(prompts, prompt_seed)``), each
sampled ``seeds`` times; sample ``i`` is prompt ``i // seeds`` from the starting noise seeded by
``(noise_seed, i)`` (``start_noise``), so every model compared on one protocol sees the same prompts and
the same noise, and its scores pair up sample by sample with every other model's.

``sample_scores`` keeps every sample's score (not only the mean), and the diversity of each prompt's
``seeds`` images, so a gain gets a paired bootstrap interval (``gain``): the per-sample differences
``after[i] - base[i]`` (averaged over training seeds when several runs share the protocol) are
resampled over samples. That interval is the evaluation's uncertainty for these trained models; the
spread between training seeds is reported beside it (``seed_std``), it is not folded in.

Curves (``curve_band``): every checkpoint scored on the same protocol, a point's band is the bootstrap
interval of its mean over samples; ``steps_to_reach`` bootstraps the samples to give the first step at
which a curve reaches a level with an interval.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from ..backbones.base import Backbone
from ..toyworld.pairs import TOY_GUIDANCE
from .stats import paired_bootstrap


@dataclass(frozen=True)
class Protocol:
    """Which held-out samples a model is scored on (defaults: 256 prompts x 4 seeds = 1024 samples)."""

    prompts: int = 256
    seeds: int = 4
    steps: int = 20
    guidance: float = TOY_GUIDANCE
    noise_seed: int = 1234
    prompt_seed: int = 0
    batch_size: int = 128
    prompt_list: tuple[str, ...] | None = None  # explicit held-out captions instead of eval_prompts(prompts, prompt_seed)

    @classmethod
    def of(cls, captions: Sequence[str], seeds: int, **kw: Any) -> Protocol:
        """A protocol over explicit captions (each sampled ``seeds`` times)."""
        return cls(prompts=len(captions), seeds=seeds, prompt_list=tuple(captions), **kw)

    @property
    def n(self) -> int:
        return self.prompts * self.seeds

    def captions(self) -> list[str]:
        """The held-out captions, each repeated ``seeds`` times (sample order)."""
        from ..toyworld.shapes import eval_prompts

        uniq = list(self.prompt_list) if self.prompt_list is not None else eval_prompts(self.prompts, seed=self.prompt_seed)
        if len(uniq) != self.prompts:
            raise ValueError(f"Protocol.prompts={self.prompts}: only {len(uniq)} held-out prompts exist")
        return [p for p in uniq for _ in range(self.seeds)]

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["prompt_list"] = None if self.prompt_list is None else list(self.prompt_list)
        return {**d, "samples": self.n}


def start_noise(backbone: Backbone, n: int, seed: int, offset: int = 0) -> torch.Tensor:
    """Starting latents of samples ``offset .. offset+n-1``: sample i from ``manual_seed(seed * 1_000_003 + i)``
    (the seeding of ``experiment.seeded_latents``, so a sample's noise does not depend on the batch)."""
    shape = backbone.latent_shape(1)[1:]
    return torch.stack([
        torch.randn(shape, generator=torch.Generator().manual_seed(seed * 1_000_003 + offset + i)) for i in range(n)
    ])


@torch.no_grad()
def sample_images(backbone: Backbone, protocol: Protocol, progress: bool = False, desc: str = "evaluating",
                  start: int = 0, stop: int | None = None) -> torch.Tensor:
    """Samples ``start .. stop-1`` (default: all) of ``protocol`` from ``backbone``, ``[N,3,H,W]`` in [0,1], in
    batches of ``batch_size``; a sample's image does not depend on ``start``/``stop`` (its noise is seeded by
    its index)."""
    from ..sampling.solvers import generate

    captions = protocol.captions()
    stop = len(captions) if stop is None else min(stop, len(captions))
    out = []
    for i in tqdm(range(start, stop, protocol.batch_size), desc=desc, disable=not progress, leave=False):
        chunk = captions[i : min(i + protocol.batch_size, stop)]
        out.append(generate(backbone, chunk, steps=protocol.steps, guidance_scale=protocol.guidance,
                            latents=start_noise(backbone, len(chunk), protocol.noise_seed, offset=i)).cpu())
    return torch.cat(out)


def per_prompt_diversity(images: torch.Tensor, seeds: int) -> torch.Tensor:
    """``[P]``: mean pairwise RMS pixel distance between the ``seeds`` images of each prompt."""
    x = images.reshape(-1, seeds, *images.shape[1:]).flatten(2)
    d = torch.cdist(x, x) / x.shape[-1] ** 0.5
    iu = torch.triu_indices(seeds, seeds, 1)
    return d[:, iu[0], iu[1]].mean(1)


@torch.no_grad()
def score_images(images: torch.Tensor, captions: list[str], rewards: dict[str, Callable[..., torch.Tensor]],
                 seeds: int, batch_size: int = 256) -> dict[str, torch.Tensor]:
    """Per-sample scores ``[N]`` of every reward, plus ``diversity`` per prompt ``[P]`` when ``seeds > 1``."""
    out = {}
    for name, r in rewards.items():
        out[name] = torch.cat([r(images[i : i + batch_size], captions[i : i + batch_size]).float().cpu()
                               for i in range(0, len(captions), batch_size)])
    if seeds > 1:
        out["diversity"] = per_prompt_diversity(images, seeds)
    return out


def sample_scores(backbone: Backbone, protocol: Protocol, rewards: dict[str, Any], progress: bool = False,
                  desc: str = "evaluating") -> dict[str, torch.Tensor]:
    """Per-sample scores of ``backbone`` on ``protocol`` (see ``score_images``)."""
    imgs = sample_images(backbone, protocol, progress=progress, desc=desc)
    return score_images(imgs, protocol.captions(), rewards, protocol.seeds)


# ------------------------------------------------------------------------------------------ intervals


def gain(base: torch.Tensor, runs: Sequence[torch.Tensor], n_boot: int = 2000, level: float = 0.95,
         seed: int = 0) -> dict[str, Any]:
    """The gain of one or more trained models (``runs``: per-sample scores of each training seed) over
    ``base`` on the same samples: mean, paired bootstrap interval of the seed-averaged per-sample
    differences, the per-seed gains and their std (training-seed spread, not part of the interval)."""
    if not runs:
        raise ValueError("gain: no runs")
    after = torch.stack([torch.as_tensor(r, dtype=torch.float64) for r in runs]).mean(0)
    iv = paired_bootstrap(base, after, n_boot=n_boot, level=level, seed=seed)
    per_seed = [float(torch.as_tensor(r, dtype=torch.float64).mean() - torch.as_tensor(base, dtype=torch.float64).mean())
                for r in runs]
    sd = float(torch.tensor(per_seed).std()) if len(per_seed) > 1 else 0.0
    return {"mean": iv.mean, "low": iv.low, "high": iv.high, "level": level, "n": iv.n, "per_seed": per_seed,
            "seed_std": sd}


def gains(base: dict[str, torch.Tensor], runs: Sequence[dict[str, torch.Tensor]], **kw: Any) -> dict[str, dict[str, Any]]:
    """``gain`` for every metric ``base`` and the runs share."""
    return {m: gain(base[m], [r[m] for r in runs], **kw) for m in base if all(m in r for r in runs)}


def gain_by_scene(base: torch.Tensor, runs: Sequence[torch.Tensor], protocol: Protocol,
                  n_boot: int = 2000) -> dict[str, dict[str, Any]]:
    """``gain`` on the protocol's one-object and two-object held-out prompts apart (``"1 object"``,
    ``"2 objects"``; the default protocol is 79% two-object scenes, where the toy bases are weakest)."""
    from ..toyworld.shapes import parse_caption

    n_obj = torch.tensor([len(parse_caption(c).objects) for c in protocol.captions()])
    return {f"{k} object{'s' * (k > 1)}": gain(base[n_obj == k], [r[n_obj == k] for r in runs], n_boot=n_boot)
            | {"n": int((n_obj == k).sum())} for k in (1, 2) if bool((n_obj == k).any())}


def fmt_gain(g: dict[str, Any]) -> str:
    """``+0.042 [+0.030, +0.055]`` (and ``± seed std`` when there were several seeds)."""
    s = f"{g['mean']:+.3f} [{g['low']:+.3f}, {g['high']:+.3f}]"
    return s + (f" ±{g['seed_std']:.3f}" if len(g["per_seed"]) > 1 else "")


def means(scores: dict[str, torch.Tensor]) -> dict[str, float]:
    return {k: float(v.double().mean()) for k, v in scores.items()}


def standard_error(scores: torch.Tensor) -> float:
    x = torch.as_tensor(scores, dtype=torch.float64)
    return float(x.std() / math.sqrt(x.numel()))


# ------------------------------------------------------------------------------------------ curves


def curve_band(points: Sequence[tuple[int, torch.Tensor]], n_boot: int = 1000, level: float = 0.95,
               seed: int = 0) -> list[dict[str, float]]:
    """``points``: (step, per-sample scores) of one curve, or of several seeds' curves averaged per sample.
    Returns per step the mean and the bootstrap interval of the mean over samples."""
    out = []
    for step, s in points:
        x = torch.as_tensor(s, dtype=torch.float64)
        idx = torch.randint(x.numel(), (n_boot, x.numel()), generator=torch.Generator().manual_seed(seed))
        m = x[idx].mean(1)
        lo, hi = torch.quantile(m, torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)).tolist()
        out.append({"step": int(step), "mean": float(x.mean()), "low": lo, "high": hi})
    return out


def steps_to_reach(steps: Sequence[int], scores: torch.Tensor, level: float | torch.Tensor) -> int | None:
    """First step (> 0) whose mean score reaches ``level``; ``scores`` is ``[len(steps), N]``."""
    m = scores.double().mean(1)
    for s, v in zip(steps, m.tolist(), strict=True):
        if s > 0 and v >= float(level):
            return int(s)
    return None


def reach_interval(steps: Sequence[int], curve: torch.Tensor, reference_final: torch.Tensor, n_boot: int = 1000,
                   level: float = 0.95, seed: int = 0) -> dict[str, Any]:
    """Steps for ``curve`` (``[S, N]`` per-sample scores at each step) to reach the mean of ``reference_final``
    (``[N]``: e.g. DPO's final checkpoint, same samples), with a bootstrap over samples: each resample
    recomputes both the level and the curve's means. ``never`` counts resamples where it is not reached."""
    point = steps_to_reach(steps, curve, reference_final.double().mean())
    g = torch.Generator().manual_seed(seed)
    n = curve.shape[1]
    found: list[int] = []
    never = 0
    for _ in range(n_boot):
        idx = torch.randint(n, (n,), generator=g)
        r = steps_to_reach(steps, curve[:, idx], reference_final[idx].double().mean())
        if r is None:
            never += 1
        else:
            found.append(r)
    if found:
        q = torch.quantile(torch.tensor(found, dtype=torch.float64),
                           torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)).tolist()
    else:
        q = [float("nan"), float("nan")]
    return {"steps": point, "low": q[0], "high": q[1], "never_fraction": never / n_boot, "level": level}


# ------------------------------------------------------------------------------------------ a model vs its base


def evaluate_lora(model_dir: str, lora: str | None, protocol: Protocol, rewards: dict[str, Any],
                  n_boot: int = 2000, progress: bool = True) -> dict[str, Any]:
    """``diffalign bench evaluate``: the base model and, with ``lora``, the tuned model on the same samples;
    means of each and the paired bootstrap interval of each gain."""
    from ..backbones import load_backbone
    from ..backbones.lora import load_lora

    bb = load_backbone(model_dir)
    base = sample_scores(bb, protocol, rewards, progress=progress, desc="base")
    out: dict[str, Any] = {"model": str(model_dir), "lora": lora, "protocol": protocol.as_dict(), "base": means(base)}
    if lora:
        load_lora(bb, lora)
        tuned = sample_scores(bb, protocol, rewards, progress=progress, desc="tuned")
        out["tuned"] = means(tuned)
        out["gains"] = gains(base, [tuned], n_boot=n_boot)
    return out


def evaluation_table(res: dict[str, Any]) -> str:
    metrics = list(res["base"])
    p = res["protocol"]
    lines = [f"{p['prompts']} held-out prompts x {p['seeds']} seeds = {p['samples']} samples, same noise for both; "
             "gain: mean [95% paired bootstrap interval]", "", "| | " + " | ".join(metrics) + " |",
             "|---" * (len(metrics) + 1) + "|", "| base | " + " | ".join(f"{res['base'][m]:.3f}" for m in metrics) + " |"]
    if "tuned" in res:
        lines.append("| tuned | " + " | ".join(f"{res['tuned'][m]:.3f}" for m in metrics) + " |")
        lines.append("| gain | " + " | ".join(fmt_gain(res["gains"][m]) for m in metrics) + " |")
    return "\n".join(lines) + "\n"
