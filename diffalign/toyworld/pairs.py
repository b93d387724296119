"""Preference labels from reward scores, and pairs written in the Pick-a-Pic schema.

``write_pairs`` writes ``out_dir/images/{i:06d}_0.png``, ``..._1.png`` and ``out_dir/pairs.jsonl``
with one row per pair::

    {"caption": str, "jpg_0": "images/000000_0.png", "jpg_1": "images/000000_1.png", "label_0": 1.0}

``jpg_0``/``jpg_1`` are paths relative to ``out_dir`` (Pick-a-Pic stores the image bytes in those
columns; the names are kept so one loader reads both); ``label_0`` is 1 when image 0 is
preferred, 0 when image 1 is, 0.5 for a tie (``label_1 = 1 - label_0``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from ..backbones.base import Backbone

ImageBatch = torch.Tensor | np.ndarray | Sequence[Any]


def _to_uint8_hwc(img: Any, where: str) -> np.ndarray:
    if isinstance(img, Image.Image):
        return np.asarray(img.convert("RGB"))
    arr = img.detach().cpu().numpy() if isinstance(img, torch.Tensor) else np.asarray(img)
    if arr.ndim != 3:
        raise ValueError(f"{where}: an image must be [3,H,W] or [H,W,3], got shape {arr.shape}")
    if arr.shape[0] == 3 and arr.shape[-1] != 3:
        arr = arr.transpose(1, 2, 0)
    if arr.shape[-1] != 3:
        raise ValueError(f"{where}: an image must have 3 channels, got shape {arr.shape}")
    if arr.dtype == np.uint8:
        return arr
    if not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(f"{where}: images must be uint8 or float in [0,1], got {arr.dtype}")
    if arr.min() < -1e-3 or arr.max() > 1 + 1e-3:
        raise ValueError(f"{where}: float images must lie in [0,1], got [{arr.min():.3f}, {arr.max():.3f}]")
    return (np.clip(arr, 0, 1) * 255).round().astype(np.uint8)


def write_pairs(
    out_dir: str | os.PathLike[str],
    captions: Sequence[str],
    images_0: ImageBatch,
    images_1: ImageBatch,
    label_0: torch.Tensor | np.ndarray | Sequence[float],
) -> Path:
    """Write preference pairs (PNG images and ``pairs.jsonl``) to ``out_dir``; returns the jsonl path.

    ``images_0``/``images_1``: ``[N,3,H,W]`` float in [0,1] or uint8 tensors/arrays, or lists of
    images (PIL, or arrays ``[3,H,W]``/``[H,W,3]``). ``label_0`` values must be 0, 0.5 or 1.
    Appends to an existing ``pairs.jsonl`` (image names continue after the last row).
    """
    out = Path(out_dir)
    labels = [float(v) for v in (label_0.tolist() if hasattr(label_0, "tolist") else label_0)]  # type: ignore[union-attr]
    n = len(captions)
    for name, seq in (("images_0", images_0), ("images_1", images_1), ("label_0", labels)):
        if len(seq) != n:
            raise ValueError(f"write_pairs: {len(captions)} captions but {len(seq)} {name}")
    bad = [i for i, v in enumerate(labels) if v not in (0.0, 0.5, 1.0)]
    if bad:
        raise ValueError(f"write_pairs: label_0 must be 0, 0.5 or 1; row {bad[0]} has {labels[bad[0]]}")
    (out / "images").mkdir(parents=True, exist_ok=True)
    jsonl = out / "pairs.jsonl"
    start = sum(1 for _ in open(jsonl, encoding="utf-8")) if jsonl.exists() else 0
    with open(jsonl, "a", encoding="utf-8") as f:
        for i in range(n):
            row: dict[str, Any] = {"caption": str(captions[i])}
            for side, imgs in (("0", images_0), ("1", images_1)):
                rel = f"images/{start + i:06d}_{side}.png"
                Image.fromarray(_to_uint8_hwc(imgs[i], f"write_pairs images_{side}[{i}]")).save(out / rel)
                row[f"jpg_{side}"] = rel
            row["label_0"] = labels[i]
            f.write(json.dumps(row) + "\n")
    return jsonl


def read_pairs(out_dir: str | os.PathLike[str], load_images: bool = False) -> list[dict[str, Any]]:
    """Read ``pairs.jsonl`` back; with ``load_images``, ``image_0``/``image_1`` hold ``[3,H,W]`` floats in [0,1]."""
    out = Path(out_dir)
    jsonl = out / "pairs.jsonl" if out.is_dir() else out
    rows = []
    with open(jsonl, encoding="utf-8") as f:
        for ln, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{jsonl}:{ln}: not valid JSON ({e.msg})") from None
            missing = {"caption", "jpg_0", "jpg_1", "label_0"} - set(row)
            if missing:
                raise ValueError(f"{jsonl}:{ln}: missing keys {sorted(missing)}")
            if load_images:
                for side in ("0", "1"):
                    arr = np.array(Image.open(jsonl.parent / row[f"jpg_{side}"]).convert("RGB"))
                    row[f"image_{side}"] = torch.from_numpy(arr).permute(2, 0, 1).float() / 255
            rows.append(row)
    return rows


def label_pairs(
    scores_0: torch.Tensor | Sequence[float],
    scores_1: torch.Tensor | Sequence[float],
    tie_margin: float = 0.0,
    noise: float = 0.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``label_0`` per pair from two score vectors: 1 if ``s0 - s1 > tie_margin``, 0 if
    ``s1 - s0 > tie_margin``, else 0.5 (a tie). With ``noise`` > 0 each decided label is flipped
    (1 <-> 0) with that probability (drawn from ``generator``); ties stay ties. Returns float ``[N]``."""
    s0 = torch.as_tensor(scores_0, dtype=torch.float64).detach().cpu().flatten()
    s1 = torch.as_tensor(scores_1, dtype=torch.float64).detach().cpu().flatten()
    if s0.shape != s1.shape:
        raise ValueError(f"label_pairs: scores_0 has {s0.numel()} values, scores_1 has {s1.numel()}")
    if not 0.0 <= noise <= 1.0:
        raise ValueError(f"label_pairs: noise is a flip probability in [0,1], got {noise}")
    if tie_margin < 0:
        raise ValueError(f"label_pairs: tie_margin must be >= 0, got {tie_margin}")
    d = s0 - s1
    label = torch.full_like(d, 0.5)
    label[d > tie_margin] = 1.0
    label[d < -tie_margin] = 0.0
    if noise > 0:
        flip = (torch.rand(d.shape, generator=generator, dtype=torch.float64) < noise) & (label != 0.5)
        label = torch.where(flip, 1.0 - label, label)
    return label.float()


def rank_labels(
    scores: torch.Tensor | Sequence[float] | Sequence[Sequence[float]],
    noise: float = 0.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Rankings from scores: indices best first, ``[K]`` for ``K`` scores or ``[N,K]`` for ``N`` groups.

    With ``noise`` > 0 the ranking is a Plackett-Luce sample: scores plus Gumbel noise of scale
    ``noise`` (0 gives the exact ordering; ties keep the lower index first).
    """
    s = torch.as_tensor(scores, dtype=torch.float64).detach().cpu()
    if s.ndim not in (1, 2):
        raise ValueError(f"rank_labels: scores must be [K] or [N,K], got shape {tuple(s.shape)}")
    if noise < 0:
        raise ValueError(f"rank_labels: noise must be >= 0, got {noise}")
    if noise > 0:
        u = torch.rand(s.shape, generator=generator, dtype=torch.float64).clamp(1e-12, 1 - 1e-12)
        s = s - noise * torch.log(-torch.log(u))
    return torch.argsort(-s, dim=-1, stable=True)


TOY_GUIDANCE = 5.0  # the CFG scale the toy SD base samples best at (base_report.json)


def seeded_latents(backbone: Backbone, n: int, seed: int, offset: int = 0) -> torch.Tensor:
    shape = backbone.latent_shape(1)[1:]
    return torch.stack([
        torch.randn(shape, generator=torch.Generator().manual_seed(seed * 1_000_003 + offset + i)) for i in range(n)
    ])


@torch.no_grad()
def sample_images(
    backbone: Backbone, prompts: list[str], seed: int = 0, steps: int = 20, guidance_scale: float = TOY_GUIDANCE,
    batch_size: int = 64, progress: bool = False, desc: str = "sampling",
) -> torch.Tensor:
    """One image per prompt, ``[N,3,H,W]`` in [0,1]; image i starts from noise seeded by (seed, i)."""
    from ..sampling.solvers import generate

    out = []
    for i in tqdm(range(0, len(prompts), batch_size), desc=desc, disable=not progress, leave=False):
        chunk = prompts[i : i + batch_size]
        out.append(generate(backbone, chunk, steps=steps, guidance_scale=guidance_scale,
                            latents=seeded_latents(backbone, len(chunk), seed, offset=i)).cpu())
    return torch.cat(out)


def make_pairs(
    backbone: Backbone, prompts: list[str], reward: Any, out_dir: str | Path, k: int = 4, seed: int = 0,
    steps: int = 20, guidance_scale: float = TOY_GUIDANCE, tie_margin: float = 0.0, noise: float = 0.0,
    progress: bool = True,
) -> dict[str, Any]:
    """For each prompt sample ``k`` images, score them with ``reward`` (any Reward or Ensemble) and write
    the best-vs-worst pair (Pick-a-Pic schema, ``pairs.jsonl``) and the full k-way ranking
    (``rankings.jsonl``). Pairs whose scores differ by at most ``tie_margin`` are written as ties;
    ``noise`` flips each decided label with that probability."""
    out = Path(out_dir)
    if (out / "pairs.jsonl").exists():
        raise FileExistsError(f"{out / 'pairs.jsonl'} exists; choose a new folder")
    expanded = [p for p in prompts for _ in range(k)]
    imgs = sample_images(backbone, expanded, seed=seed, steps=steps, guidance_scale=guidance_scale,
                         progress=progress, desc="sampling pairs")
    with torch.no_grad():
        scores = torch.cat([reward(imgs[i : i + 256], expanded[i : i + 256]).float().cpu()
                            for i in range(0, len(expanded), 256)]).view(len(prompts), k)
    imgs = imgs.view(len(prompts), k, *imgs.shape[1:])
    rank = rank_labels(scores)
    best, worst = rank[:, 0], rank[:, -1]
    ar = torch.arange(len(prompts))
    g = torch.Generator().manual_seed(seed)
    swap = torch.rand(len(prompts), generator=g) < 0.5  # the winner is jpg_0 or jpg_1 at random
    i0 = torch.where(swap, worst, best)
    i1 = torch.where(swap, best, worst)
    labels = label_pairs(scores[ar, i0], scores[ar, i1], tie_margin=tie_margin, noise=noise, generator=g)
    write_pairs(out, prompts, imgs[ar, i0], imgs[ar, i1], labels)
    (out / "images_k").mkdir(exist_ok=True)
    with open(out / "rankings.jsonl", "w") as f:
        from torchvision.utils import save_image

        for j, p in enumerate(prompts):
            names = []
            for m in range(k):
                name = f"images_k/{j:06d}_{m}.png"
                save_image(imgs[j, m], out / name)
                names.append(name)
            f.write(json.dumps({"caption": p, "images": names, "scores": scores[j].tolist(),
                                "ranking": rank[j].tolist()}) + "\n")
    stats = {"pairs": len(prompts), "ties": int((labels == 0.5).sum()), "k": k,
             "mean_score": float(scores.mean()), "best_minus_worst": float((scores.max(1).values - scores.min(1).values).mean())}
    (out / "pairs_meta.json").write_text(json.dumps(stats, indent=2))
    return stats
