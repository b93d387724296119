"""Toy-world composition reward heads (the toy counterpart of IterComp's three reward models), trained and
refined on rankings with the Bradley-Terry loss.

Three heads, one per composition aspect, each a small CNN over the image's pixels conditioned (FiLM) on the
caption's parsed structure (``caption_features``: each object's colour, shape and size, the position word,
the relation and the object count, one-hot):

    attribute   colour-shape(-size) binding     (ranked by the ``toy_shape`` oracle in the toy IterComp loop)
    spatial     position word / relation        (``toy_position``)
    count       number of objects               (``toy_count``)

Rankings (``Rankings``): images in groups (one group = one prompt's images from every gallery model) with
one score per image and head from that head's annotator; every ordered pair of a group whose scores
differ by more than ``margin`` is a preference. Bradley-Terry, as IterComp trains its reward models
(``cross_entropy([r_better, r_worse], 0)``):

    L_h = mean over pairs (i > j) of  -log sigmoid(r_h(x_i, c) - r_h(x_j, c))

``refine(heads, rankings, steps, lr)`` takes ``steps`` Adam steps on the sum over heads. The reward
``toy_composition`` (a saved heads folder) scores ``mean_h r_h`` (``combine="mean"``) or IterComp's hinge
sum ``-sum_h relu(margin - r_h)`` (``combine="hinge"``); differentiable, for reward feedback (ReFL/DRaFT).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from diffalign.toyworld.shapes import COLORS, POSITIONS, RELATIONS, SHAPES, SIZES, parse_caption

from .base import Reward, RewardInputError
from .registry import register

HEADS = ("attribute", "spatial", "count")
ANNOTATORS = {"attribute": "toy_shape", "spatial": "toy_position", "count": "toy_count"}
_OBJ_DIM = len(COLORS) + len(SHAPES) + len(SIZES) + 1  # + "no size word"
TEXT_DIM = 2 * (_OBJ_DIM + 1) + len(POSITIONS) + 1 + len(RELATIONS) + 1 + 2


def caption_features(captions: Sequence[str]) -> torch.Tensor:
    """One-hot structure of toy-grammar captions ``[B, TEXT_DIM]`` (ValueError names a caption outside it)."""
    rows = []
    for c in captions:
        s = parse_caption(c)
        v = torch.zeros(TEXT_DIM)
        for k in range(2):
            base = k * (_OBJ_DIM + 1)
            if k >= len(s.objects):
                v[base + _OBJ_DIM] = 1.0  # "no object in this slot"
                continue
            o = s.objects[k]
            v[base + COLORS.index(o.color)] = 1.0
            v[base + len(COLORS) + SHAPES.index(o.shape)] = 1.0
            v[base + len(COLORS) + len(SHAPES) + (SIZES.index(o.size) if o.size else len(SIZES))] = 1.0
        off = 2 * (_OBJ_DIM + 1)
        v[off + (POSITIONS.index(s.position) if s.position else len(POSITIONS))] = 1.0
        off += len(POSITIONS) + 1
        v[off + (RELATIONS.index(s.relation) if s.relation else len(RELATIONS))] = 1.0
        off += len(RELATIONS) + 1
        v[off + len(s.objects) - 1] = 1.0
        rows.append(v)
    return torch.stack(rows)


class CompositionHead(nn.Module):
    """A small CNN over ``[B,3,32,32]`` pixels (plus two coordinate channels), FiLM-conditioned on the
    caption features after each conv, then an MLP on the flattened 8x8 map -> one score per image."""

    def __init__(self, width: int = 24, size: int = 32) -> None:
        super().__init__()
        self.size = size
        self.convs = nn.ModuleList([
            nn.Conv2d(5, width, 3, padding=1), nn.Conv2d(width, width, 3, stride=2, padding=1),
            nn.Conv2d(width, width, 3, stride=2, padding=1),
        ])
        self.films = nn.ModuleList([nn.Linear(TEXT_DIM, 2 * width) for _ in self.convs])
        self.out = nn.Sequential(nn.Linear(width * (size // 4) ** 2, 64), nn.SiLU(), nn.Linear(64, 1))

    def forward(self, images: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        x = images.float()
        if x.shape[-1] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=True)
        b = x.shape[0]
        ys, xs = torch.meshgrid(torch.linspace(-1, 1, self.size), torch.linspace(-1, 1, self.size), indexing="ij")
        coords = torch.stack([xs, ys]).to(x)[None].expand(b, -1, -1, -1)
        h = torch.cat([x * 2 - 1, coords], 1)
        for conv, film in zip(self.convs, self.films, strict=True):
            gamma, beta = film(text.to(h)).chunk(2, -1)
            h = F.silu(conv(h) * (1 + gamma[..., None, None]) + beta[..., None, None])
        return self.out(h.flatten(1)).squeeze(-1)


class CompositionHeads(nn.Module):
    """The three heads; ``forward(images, prompts)`` -> ``{head: [B]}``."""

    def __init__(self, width: int = 24, size: int = 32) -> None:
        super().__init__()
        self.config = {"width": width, "size": size}
        self.heads = nn.ModuleDict({h: CompositionHead(width, size) for h in HEADS})

    def forward(self, images: torch.Tensor, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        text = caption_features(prompts).to(images.device)
        return {h: m(images, text) for h, m in self.heads.items()}

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()},
                  str(path / "heads.safetensors"))
        (path / "config.json").write_text(json.dumps({**self.config, "heads": list(HEADS)}))
        return path

    @classmethod
    def load(cls, path: str | Path) -> CompositionHeads:
        path = Path(path)
        if not (path / "heads.safetensors").is_file():
            raise FileNotFoundError(f"{path}: no heads.safetensors (a folder written by CompositionHeads.save)")
        cfg = json.loads((path / "config.json").read_text())
        m = cls(width=int(cfg["width"]), size=int(cfg["size"]))
        m.load_state_dict(load_file(str(path / "heads.safetensors")))
        return m


@dataclass
class Rankings:
    """Images ``[N,3,H,W]`` in [0,1] (or uint8), their captions, their group (one prompt) ``[N]`` and the
    annotators' scores ``{head: [N]}``; a pair (i better than j) is any two images of one group whose score
    for a head differs by more than ``margin``."""

    images: torch.Tensor
    prompts: list[str]
    group: torch.Tensor
    scores: dict[str, torch.Tensor]
    margin: float = 1e-6

    def pairs(self, head: str) -> torch.Tensor:
        """``[P, 2]`` index pairs (better, worse) for ``head``."""
        s, g = self.scores[head].float(), self.group
        better = (s[:, None] - s[None, :] > self.margin) & (g[:, None] == g[None, :])
        return better.nonzero()

    def state_dict(self) -> dict[str, Any]:
        img = self.images if self.images.dtype == torch.uint8 else (self.images.clamp(0, 1) * 255).round().to(torch.uint8)
        return {"images": img, "group": self.group, "margin": self.margin, "prompts": list(self.prompts),
                **{f"scores.{h}": v for h, v in self.scores.items()}}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Rankings:
        return cls(state["images"], list(state["prompts"]), state["group"],
                   {k[7:]: v for k, v in state.items() if k.startswith("scores.")}, float(state["margin"]))

    def float_images(self) -> torch.Tensor:
        return self.images.float() / 255 if self.images.dtype == torch.uint8 else self.images.float()


def head_scores(heads: CompositionHeads, rankings: Rankings, batch_size: int = 256) -> dict[str, torch.Tensor]:
    """Every image's score by every head ``{head: [N]}`` (with gradient when enabled)."""
    imgs = rankings.float_images()
    outs: dict[str, list[torch.Tensor]] = {h: [] for h in HEADS}
    for i in range(0, len(imgs), batch_size):
        r = heads(imgs[i : i + batch_size], rankings.prompts[i : i + batch_size])
        for h in HEADS:
            outs[h].append(r[h])
    return {h: torch.cat(v) for h, v in outs.items()}


def bt_log_likelihood(heads: CompositionHeads, rankings: Rankings) -> dict[str, torch.Tensor]:
    """Per head: the mean Bradley-Terry log-likelihood of its pairs, ``mean log sigmoid(r_i - r_j)`` (0-dim;
    NaN for a head without pairs)."""
    r = head_scores(heads, rankings)
    out = {}
    for h in HEADS:
        p = rankings.pairs(h)
        out[h] = F.logsigmoid(r[h][p[:, 0]] - r[h][p[:, 1]]).mean() if len(p) else torch.tensor(float("nan"))
    return out


@torch.no_grad()
def ranking_accuracy(heads: CompositionHeads, rankings: Rankings) -> dict[str, float]:
    """Per head: the fraction of its pairs the head orders as the annotator does (ties in the head count half)."""
    r = head_scores(heads, rankings)
    out = {}
    for h in HEADS:
        p = rankings.pairs(h)
        if not len(p):
            out[h] = float("nan")
            continue
        d = r[h][p[:, 0]] - r[h][p[:, 1]]
        out[h] = float(((d > 0).float() + 0.5 * (d == 0).float()).mean())
    return out


def refine(heads: CompositionHeads, rankings: Rankings, steps: int = 1, lr: float = 1e-3,
           pairs_per_step: int = 512, seed: int = 0, score_l2: float = 0.0, progress: bool = False) -> list[float]:
    """Refine the heads on ``rankings`` with the Bradley-Terry loss: ``steps`` Adam steps, each on up to
    ``pairs_per_step`` pairs per head drawn at random (all of them when fewer). ``score_l2`` adds
    ``score_l2 * mean(r^2)`` over the pairs' images: Bradley-Terry alone grows the scores without bound on
    separable rankings, and an unbounded score is an easy target for reward feedback. Returns the losses."""
    from tqdm.auto import tqdm

    g = torch.Generator().manual_seed(seed)
    pairs = {h: rankings.pairs(h) for h in HEADS}
    imgs = rankings.float_images()
    text = caption_features(rankings.prompts)
    opt = torch.optim.Adam(heads.parameters(), lr=lr)
    losses = []
    heads.train()
    for _ in tqdm(range(steps), desc="refine heads", disable=not progress):
        total = torch.zeros(())
        for h in HEADS:
            p = pairs[h]
            if not len(p):
                continue
            if len(p) > pairs_per_step:
                p = p[torch.randperm(len(p), generator=g)[:pairs_per_step]]
            idx, inv = torch.unique(p.flatten(), return_inverse=True)
            r = heads.heads[h](imgs[idx], text[idx])
            inv = inv.view(-1, 2)
            total = total - F.logsigmoid(r[inv[:, 0]] - r[inv[:, 1]]).mean() + score_l2 * r.pow(2).mean()
        opt.zero_grad()
        if total.requires_grad:
            total.backward()
            opt.step()
        losses.append(float(total.detach()))
    heads.eval()
    return losses


class ToyCompositionReward(Reward):
    """The refined heads as a reward: ``mean_h r_h`` or IterComp's ``-sum_h relu(margin - r_h)``."""

    name = "toy_composition"
    differentiable = True

    def __init__(self, heads: CompositionHeads, combine: str = "mean", margin: float = 2.0) -> None:
        super().__init__()
        if combine not in ("mean", "hinge"):
            raise ValueError(f"toy_composition: combine must be 'mean' or 'hinge', got {combine!r}")
        self.model = heads.eval().requires_grad_(False)
        self.combine, self.margin = combine, float(margin)

    def score(self, images: torch.Tensor, prompts: list[str], context: dict[str, Any] | None = None) -> torch.Tensor:
        try:
            r = self.model(images, prompts)
        except ValueError as e:
            raise RewardInputError(f"{self.name}: {e}") from None
        if self.combine == "hinge":
            return -sum(F.relu(self.margin - r[h]) for h in HEADS)
        return sum(r[h] for h in HEADS) / len(HEADS)


@register("toy_composition")
def _toy_composition(path: str | None = None, combine: str = "mean", margin: float = 2.0,
                     device: str | torch.device = "cpu", **kwargs: Any) -> Reward:
    if kwargs:
        raise TypeError(f"toy_composition takes path, combine, margin and device; got unknown options {sorted(kwargs)}")
    if path is None:
        raise ValueError("toy_composition needs path= a folder written by CompositionHeads.save (the toy IterComp "
                         "loop writes one per round: ROUND/heads)")
    return ToyCompositionReward(CompositionHeads.load(path).to(device), combine=combine, margin=margin)
