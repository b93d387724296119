"""A population of synthetic users for personalization in the toy world.

Each user likes what prompts leave open and the base model varies: how big the shapes are, where they
sit left-right and top-bottom, and whether they sit in the middle or near an edge. The prompts used
for personalization name colours and shapes (and relations) but no size or position word, so the
base draws those attributes at random and users can disagree about them.

Pixel features of an image (foreground = chroma after white balance, as the oracles segment)::

    size   = (area_fraction - 0.10) / 0.05          bigger shapes      (small single ~ -0.8, large ~ +0.9)
    right  = (cx - W/2) / (W/2)                     further right      (in [-1, 1])
    low    = (cy - H/2) / (H/2)                     further down
    centre = 1 - 2 * dist(centroid, image centre) / (W/2)   closer to the middle

A user is a unit weight vector ``w`` over these features and its reward is ``r_u(x) = w . phi(x)``.
``population`` draws users with Gaussian directions, seeded; the first ``n_seen`` are the users whose
pairs train the model, the rest are unseen (only their k few-shot pairs are ever used).
``user_pairs`` labels a shared pool of base-model image pairs by each user's reward and writes them in
the Pick-a-Pic schema with a ``user_id`` column.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .oracles import hue_chroma, white_balance
from .shapes import Split, sample_scene

FEATURES: tuple[str, ...] = ("size", "right", "low", "centre")


def features(images: torch.Tensor) -> torch.Tensor:
    """``[B,3,H,W]`` in [0,1] -> ``[B, 4]`` attribute features (``FEATURES``; see the module docstring)."""
    _, chroma = hue_chroma(white_balance(images.float().clamp(0, 1)))
    alpha = (chroma / 0.6).clamp(0, 1)  # ~1 inside a shape, ~0 on the grey background
    b, h, w = alpha.shape
    mass = alpha.flatten(1).sum(1).clamp_min(1e-6)
    ys = torch.arange(h, dtype=alpha.dtype) + 0.5
    xs = torch.arange(w, dtype=alpha.dtype) + 0.5
    cx = (alpha.sum(1) * xs).sum(1) / mass
    cy = (alpha.sum(2) * ys).sum(1) / mass
    area = mass / (h * w)
    right, low = (cx - w / 2) / (w / 2), (cy - h / 2) / (h / 2)
    centre = 1 - 2 * torch.sqrt(right**2 + low**2)
    return torch.stack([(area - 0.10) / 0.05, right, low, centre], 1)


@dataclass(frozen=True)
class SyntheticUser:
    user_id: str
    weights: tuple[float, ...]  # over FEATURES, unit norm

    def reward(self, images: torch.Tensor, prompts: list[str] | None = None) -> torch.Tensor:
        """``r_u = w . phi(images)``: ``[B]`` (the prompts are not needed: users differ on open attributes)."""
        return features(images) @ torch.tensor(self.weights, dtype=torch.float32)

    def describe(self) -> str:
        return ", ".join(f"{f} {w:+.2f}" for f, w in zip(FEATURES, self.weights, strict=True))


def population(n_seen: int = 24, n_unseen: int = 8, seed: int = 0) -> tuple[list[SyntheticUser], list[SyntheticUser]]:
    """``(seen, unseen)`` users with Gaussian unit directions over ``FEATURES``; ids ``s00..``, ``n00..``."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(n_seen + n_unseen, len(FEATURES)))
    w /= np.linalg.norm(w, axis=1, keepdims=True)
    users = [tuple(float(x) for x in row) for row in w]
    seen = [SyntheticUser(f"s{i:02d}", users[i]) for i in range(n_seen)]
    unseen = [SyntheticUser(f"n{i:02d}", users[n_seen + i]) for i in range(n_unseen)]
    return seen, unseen


def open_prompts(n: int, seed: int = 0, split: Split = "train") -> list[str]:
    """Prompts that name no size and no position (relations allowed): users disagree on what they leave open."""
    rng = np.random.default_rng(seed)
    return [sample_scene(rng, split, p_size=0.0, p_position=0.0).caption() for _ in range(n)]


def user_pairs(
    out_dir: str | os.PathLike[str],
    prompts: list[str],
    images: torch.Tensor,
    users: list[SyntheticUser],
    pairs_per_user: int,
    seed: int = 0,
    margin: float = 0.05,
) -> Path:
    """Label a shared pool of pairs by each user's reward and write ``out_dir/pairs.jsonl``.

    ``images``: ``[N, 2, 3, H, W]``, two base samples per prompt (written once, as PNGs under
    ``images/``). Each user gets ``pairs_per_user`` pairs drawn from the pool (without replacement),
    labelled by its reward; pairs whose rewards differ by less than ``margin`` are skipped (the user
    is indifferent). Rows: ``caption, jpg_0, jpg_1, label_0, user_id`` (the Pick-a-Pic v2 columns).
    """
    from PIL import Image

    out = Path(out_dir)
    if (out / "pairs.jsonl").exists():
        raise FileExistsError(f"{out / 'pairs.jsonl'} exists; choose a new folder")
    n = len(prompts)
    if images.shape[:2] != (n, 2):
        raise ValueError(f"images must be [N, 2, 3, H, W] with N = {n} prompts, got {tuple(images.shape)}")
    (out / "images").mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(n):
        pair = []
        for s in range(2):
            name = f"images/{i:06d}_{s}.png"
            arr = (images[i, s].clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
            Image.fromarray(arr).save(out / name)
            pair.append(name)
        names.append(pair)
    rng = np.random.default_rng(seed)
    flat = images.flatten(0, 1)
    rows, stats = [], {}
    for u in users:
        r = u.reward(flat).view(n, 2)
        order = rng.permutation(n)
        chosen = [int(i) for i in order if abs(float(r[i, 0] - r[i, 1])) >= margin][:pairs_per_user]
        if len(chosen) < pairs_per_user:
            raise ValueError(f"user {u.user_id}: only {len(chosen)} decided pairs in a pool of {n} (margin {margin})")
        for i in chosen:
            rows.append({"caption": prompts[i], "jpg_0": names[i][0], "jpg_1": names[i][1],
                         "label_0": 1.0 if float(r[i, 0]) > float(r[i, 1]) else 0.0, "user_id": u.user_id})
        stats[u.user_id] = {"pairs": len(chosen), "weights": list(u.weights)}
    tmp = out / ".pairs.jsonl.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    os.replace(tmp, out / "pairs.jsonl")
    (out / "users.json").write_text(json.dumps(stats, indent=2))
    return out / "pairs.jsonl"


def win_rate(scores_a: torch.Tensor, scores_b: torch.Tensor) -> torch.Tensor:
    """Per-sample wins of a over b: 1, 0.5 for a tie, 0 (``[N]``; its mean is the win rate)."""
    return (scores_a > scores_b).float() + 0.5 * (scores_a == scores_b).float()


def user_table(users: list[SyntheticUser]) -> list[dict[str, Any]]:
    return [{"user_id": u.user_id, **dict(zip(FEATURES, u.weights, strict=True))} for u in users]
