"""Toy identities: named "characters" the toy generator can be asked for, their reference images, and a small
identity embedding network (the toy world's ArcFace) trained on them.

A character is a fixed pair of toy objects in a portrait layout: a *head* (colour, shape) above a *body*
(colour, shape) of another colour, i.e. the toy scene ``a HEAD above a BODY`` -- something the toy base
can already draw (coloured shapes at positions), so a model can be fine-tuned toward it. The caption
that asks for a character by name is ``portrait_prompt(name)`` = ``"a portrait of Ada"``. Sizes and
positions are jittered per render (as the toy grammar leaves them open), so a character has many
different-looking reference images and only its colour/shape combination identifies it.

``CHARACTERS`` (12, fixed): the first 8 are ``TRAIN_CHARACTERS`` (what an identity adapter trains on), the
last 4 ``HELDOUT_CHARACTERS`` (never seen by the adapter: its generalisation test).

The embedding network ``IdentityNet`` (a 4-layer CNN, 32-d unit-norm output, ~60k parameters) is trained
like a face recognizer: a CosFace classifier (normalised weights, scale s, additive margin m) over every
possible head/body combination (6 colours x 3 shapes, two different colours: 270 "identities"), with blur,
noise and colour jitter so that VAE-decoded samples embed like renders. The named characters are 12 of
those 270 classes; the network is not told which. ``train_identity_net`` takes about a minute on one CPU
core; the trained network ships in ``diffalign/toyworld/identity_net/`` (``load_identity_net()``).
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .shapes import COLORS, SHAPES, Obj, Scene, render

DEFAULT_NET = Path(__file__).parent / "identity_net"


@dataclass(frozen=True)
class Character:
    name: str
    head: Obj
    body: Obj

    def scene(self) -> Scene:
        return Scene((self.head, self.body), relation="above")


def _c(name: str, hc: str, hs: str, bc: str, bs: str) -> Character:
    return Character(name, Obj(hc, hs), Obj(bc, bs))


CHARACTERS: dict[str, Character] = {c.name: c for c in (
    _c("Ada", "red", "circle", "blue", "square"),
    _c("Ben", "yellow", "triangle", "green", "square"),
    _c("Cleo", "magenta", "circle", "cyan", "triangle"),
    _c("Dev", "green", "square", "red", "circle"),
    _c("Eve", "cyan", "circle", "magenta", "square"),
    _c("Finn", "blue", "triangle", "yellow", "circle"),
    _c("Gus", "red", "square", "green", "triangle"),
    _c("Hana", "yellow", "circle", "blue", "triangle"),
    # held out from adapter training
    _c("Ivo", "green", "triangle", "magenta", "circle"),
    _c("Jun", "blue", "circle", "red", "square"),
    _c("Kai", "cyan", "square", "yellow", "triangle"),
    _c("Lea", "magenta", "triangle", "green", "circle"),
)}
TRAIN_CHARACTERS: tuple[str, ...] = tuple(list(CHARACTERS)[:8])
HELDOUT_CHARACTERS: tuple[str, ...] = tuple(list(CHARACTERS)[8:])


def character(name: str) -> Character:
    if name not in CHARACTERS:
        raise ValueError(f"unknown toy character {name!r}; expected one of {list(CHARACTERS)}")
    return CHARACTERS[name]


def portrait_prompt(name: str) -> str:
    """The caption that asks for a character by name: ``"a portrait of Ada"``."""
    return f"a portrait of {character(name).name}"


def reference_images(name: str, n: int = 4, seed: int = 0, size: int = 32) -> torch.Tensor:
    """``n`` renders of the character (sizes and jitter drawn from ``seed``): ``[n,3,size,size]`` in [0,1]."""
    rng = np.random.default_rng([seed, list(CHARACTERS).index(character(name).name)])
    sc = character(name).scene()
    return torch.from_numpy(np.stack([render(sc, rng, size) for _ in range(n)]))


def all_identities() -> list[tuple[Obj, Obj]]:
    """Every head/body combination (the classes the embedding network learns): 270."""
    objs = [Obj(c, s) for c in COLORS for s in SHAPES]
    return [(h, b) for h, b in itertools.product(objs, objs) if h.color != b.color]


# ---------------------------------------------------------------- the embedding network


class IdentityNet(nn.Module):
    """``[B,3,32,32]`` in [0,1] -> unit-norm identity embeddings ``[B, dim]`` (differentiable in the pixels)."""

    def __init__(self, dim: int = 32, width: int = 16) -> None:
        super().__init__()
        self.dim, self.width = dim, width
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(3, w, 3, 1, 1), nn.GELU(),
            nn.Conv2d(w, 2 * w, 3, 2, 1), nn.GELU(),        # 16x16
            nn.Conv2d(2 * w, 2 * w, 3, 2, 1), nn.GELU(),    # 8x8
            nn.Conv2d(2 * w, 4 * w, 3, 2, 1), nn.GELU(),    # 4x4: keeps where things are (head vs body)
        )
        self.head = nn.Linear(4 * w * 16, dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float()
        if x.shape[-2:] != (32, 32):
            x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False, antialias=True)
        x = self.features((x - 0.5) / 0.5)
        return F.normalize(self.head(x.flatten(1)), dim=-1)


def save_identity_net(net: IdentityNet, out: str | Path, meta: dict | None = None) -> Path:
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps({"dim": net.dim, "width": net.width, **(meta or {})}, indent=1) + "\n")
    return out


def load_identity_net(path: str | Path | None = None, device: str | torch.device = "cpu") -> IdentityNet:
    """Load a network saved by ``train_identity_net`` (default: the one shipped with the package)."""
    from safetensors.torch import load_file

    path = Path(path) if path is not None else DEFAULT_NET
    cfg_file, weights = path / "config.json", path / "model.safetensors"
    if not cfg_file.is_file() or not weights.is_file():
        raise FileNotFoundError(f"{path}: not a toy identity network folder (needs config.json and model.safetensors; "
                                "write one with diffalign.toyworld.identity.train_identity_net)")
    cfg = json.loads(cfg_file.read_text())
    net = IdentityNet(dim=int(cfg["dim"]), width=int(cfg["width"]))
    state = load_file(str(weights))
    missing, unexpected = net.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{weights}: weights do not fit IdentityNet(dim={cfg['dim']}, width={cfg['width']}): "
                         f"missing {missing[:3]}, unexpected {unexpected[:3]}")
    return net.to(device).eval().requires_grad_(False)


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Blur (sigma up to 1 px), colour jitter and pixel noise: what a VAE round trip and a sampler do."""
    b = x.shape[0]
    sig = torch.rand(b, generator=gen) * 1.0
    k = torch.arange(-2, 3, dtype=torch.float32)
    ker = torch.exp(-(k[None] ** 2) / (2 * sig[:, None].clamp(min=1e-3) ** 2))
    ker = ker / ker.sum(1, keepdim=True)  # [B,5]
    xp = F.pad(x, (2, 2, 2, 2), mode="replicate")
    # separable blur, per image kernel
    h = sum(ker[:, i, None, None, None] * xp[:, :, :, i:i + x.shape[-1]] for i in range(5))
    x = sum(ker[:, i, None, None, None] * h[:, :, i:i + x.shape[-2], :] for i in range(5))
    x = x * (1 + 0.1 * (torch.rand(b, 3, 1, 1, generator=gen) - 0.5)) + 0.05 * (torch.rand(b, 1, 1, 1, generator=gen) - 0.5)
    x = x + torch.randn(x.shape, generator=gen) * (0.03 * torch.rand(b, 1, 1, 1, generator=gen))
    return x.clamp(0, 1)


def train_identity_net(out: str | Path | None = None, steps: int = 1500, batch: int = 128, lr: float = 3e-3,
                       dim: int = 32, width: int = 16, scale: float = 16.0, margin: float = 0.2, seed: int = 0,
                       progress: bool = True, exclude: tuple[str, ...] = ()) -> IdentityNet:
    """Train the identity embedding (CosFace over ``all_identities()``, less the head/body combinations of the
    characters named in ``exclude``: identities the network never sees) and save it to ``out`` (if given)."""
    from tqdm import tqdm

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    skip = {(character(n).head, character(n).body) for n in exclude}
    classes = [c for c in all_identities() if c not in skip]
    scenes = [Scene((h, b), relation="above") for h, b in classes]
    net = IdentityNet(dim, width)
    proto = nn.Parameter(torch.randn(len(classes), dim) / math.sqrt(dim))
    opt = torch.optim.AdamW([*net.parameters(), proto], lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    net.train()
    bar = tqdm(range(steps), desc="toy identity net", disable=not progress)
    acc = 0.0
    for _ in bar:
        y = rng.integers(len(classes), size=batch)
        x = torch.from_numpy(np.stack([render(scenes[i], rng) for i in y]))
        x = _augment(x, gen)
        e = net(x)
        cos = e @ F.normalize(proto, dim=-1).T
        yt = torch.from_numpy(y)
        logits = scale * (cos - margin * F.one_hot(yt, len(classes)))
        loss = F.cross_entropy(logits, yt)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        acc = 0.95 * acc + 0.05 * float((cos.argmax(1) == yt).float().mean())
        bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{acc:.3f}")
    net.eval().requires_grad_(False)
    if out is not None:
        save_identity_net(net, out, {"classes": len(classes), "excluded": list(exclude), "steps": steps, "seed": seed,
                                     "scale": scale,
                                     "margin": margin, "train_accuracy_ema": round(acc, 4)})
    return net


def identity_similarity(net: IdentityNet, images: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """``cos(net(images), mean-embedding of references)``: ``references`` ``[B,3,H,W]`` (one per image),
    ``[B,K,3,H,W]`` (K per image) or ``[1,K,3,H,W]`` / ``[K?]`` broadcast; returns ``[B]``."""
    e = net(images)
    r = references.to(e.device)
    if r.ndim == 4:
        r = r[:, None]
    n, k = r.shape[:2]
    ref = F.normalize(net(r.flatten(0, 1)).reshape(n, k, -1).mean(1), dim=-1)
    return (e * ref).sum(-1)
