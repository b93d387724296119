"""Analytic oracles: read colours, shapes, sizes and positions back from toy-world pixels.

Segmentation is by hue, so it survives a lossy VAE round trip (blur, shifted colours, noise):

0. White balance: each channel is scaled so that the per-channel median (the background) is grey.
1. ``chroma = max(rgb) - min(rgb)``, ``hue`` in degrees. A pixel is *strong* when ``chroma > 0.25``
   and then belongs to the colour whose hue is nearest (the six colours are 60 degrees apart, so
   any shift under 30 degrees still classifies right). The grey background has chroma ~0.
2. A colour's blob is its strong pixels dilated by one pixel (to catch the faint anti-aliased or
   blurred rim). In it, a pixel's coverage is ``alpha = clip(chroma / ref, 0, 1)`` where ``ref`` is
   the blob's interior chroma (the mean chroma of its pixels above 75% of its peak); strong
   pixels of another colour are excluded. Mixing a colour with grey scales its chroma and keeps
   its hue, so ``sum(alpha)`` is the object's area, which blur does not change.
3. A colour is *present as an object* when its area lies between 0.35 x the smallest object's
   area and 1.6 x the largest one's (``MIN_AREA``, ``MAX_AREA`` at size 32).
4. Shape: template matching. For each shape class, the shape whose area equals the blob's area
   and whose centroid equals the blob's centroid is drawn, sharp and blurred (sigma 0.7 and 1.2 px);
   the class with the highest soft IoU ``sum(min(alpha, t)) / sum(max(alpha, t))`` over the blur
   levels wins (so a blurred square is compared with blurred templates, not taken for a circle). Size: ``r = sqrt(area / SHAPE_AREA[shape])``,
   small when ``r < 5.75`` px (at size 32; small is drawn from [4, 5], large from [6.5, 7.5]).
5. Position: the blob's centroid. left ``cx < 0.4 W``, right ``cx > 0.6 W``, top ``cy < 0.4 H``,
   bottom ``cy > 0.6 H``, center ``|cx - W/2| < 0.17 W and |cy - H/2| < 0.17 H``. "A left of B":
   ``cx_B - cx_A > 0.1 W`` (likewise right of / above / below).

Each oracle returns the fraction of the caption's constraints that the image satisfies:

* ``color_score``: each caption colour is present as an object; plus one constraint that no
  other colour is present as an object.
* ``shape_score``: each object's colour blob has the caption's shape; and its size, when named.
* ``position_score``: the position word, or the relation (both objects present and placed right);
  with no position word, that the object is present (so the score is never vacuously 1).
* ``count_score``: 1 when the number of colours present as objects equals the number of objects.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .shapes import BACKGROUND, COLOR_RGB, COLORS, SHAPE_AREA, SHAPES, SIZE_RANGE, Scene, parse_caption

STRONG_CHROMA = 0.25
MIN_AREA = 0.35 * math.pi * SIZE_RANGE["small"][0] ** 2  # px at size 32
MAX_AREA = 1.6 * 4.0 * SIZE_RANGE["large"][1] ** 2
SMALL_LARGE_R = 5.75
TEMPLATE_BLURS = (0.0, 0.7, 1.2)  # px at size 32
_REF = 32.0


def hue_chroma(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Hue in degrees [0, 360) and chroma ``max - min`` of ``[B,3,H,W]`` images: two ``[B,H,W]`` tensors."""
    r, g, b = images.unbind(1)
    mx, _ = images.max(1)
    mn, _ = images.min(1)
    c = mx - mn
    safe = c.clamp_min(1e-6)
    h = torch.where(
        mx == r,
        torch.remainder((g - b) / safe, 6.0),
        torch.where(mx == g, (b - r) / safe + 2.0, (r - g) / safe + 4.0),
    )
    return h * 60.0, c


def white_balance(images: torch.Tensor) -> torch.Tensor:
    """Scale each channel so that the background (the per-channel median) turns grey.

    The background covers most of every toy image, so the median is its colour; a tinted
    background (a VAE's colour cast) would otherwise carry chroma and shift every hue.
    """
    bg = images.flatten(2).median(dim=2).values.clamp_min(0.05)  # [B,3]
    gain = bg.mean(1, keepdim=True) / bg
    return (images * gain[:, :, None, None]).clamp(0, 1)


@dataclass
class Blobs:
    """Per-image, per-colour blob statistics (colour index as in ``COLORS``)."""

    alpha: torch.Tensor  # [B, 6, H, W] coverage maps
    area: torch.Tensor  # [B, 6] in pixels
    cx: torch.Tensor  # [B, 6] centroid x in pixels (pixel centres at i + 0.5)
    cy: torch.Tensor  # [B, 6]
    present: torch.Tensor  # [B, 6] bool: the colour is present as an object

    @property
    def size(self) -> tuple[int, int]:
        return self.alpha.shape[-2], self.alpha.shape[-1]


@torch.no_grad()
def find_blobs(images: torch.Tensor) -> Blobs:
    """Segment each of the six colours in ``[B,3,H,W]`` images in [0,1] (see the module docstring)."""
    x = white_balance(images.detach().float())
    _, _, h, w = x.shape
    hue, chroma = hue_chroma(x)
    cls = torch.remainder(torch.round(hue / 60.0), 6).long()  # [B,H,W]
    strong = chroma > STRONG_CHROMA
    ks = torch.arange(len(COLORS), device=x.device).view(1, -1, 1, 1)
    core = strong.unsqueeze(1) & (cls.unsqueeze(1) == ks)  # [B,6,H,W]
    support = F.max_pool2d(core.float(), 3, stride=1, padding=1) > 0
    allowed = (~strong).unsqueeze(1) | (cls.unsqueeze(1) == ks)
    ch = chroma.unsqueeze(1).expand(-1, len(COLORS), -1, -1)
    peak = torch.where(core, ch, torch.zeros_like(ch)).amax(dim=(2, 3), keepdim=True)  # [B,6,1,1]
    interior = core & (ch >= 0.75 * peak)
    ref = (ch * interior).sum((2, 3), keepdim=True) / interior.sum((2, 3), keepdim=True).clamp_min(1)
    alpha = (ch / ref.clamp_min(STRONG_CHROMA)).clamp(0, 1) * (support & allowed)
    area = alpha.sum((2, 3))
    xs = torch.arange(w, device=x.device, dtype=x.dtype) + 0.5
    ys = torch.arange(h, device=x.device, dtype=x.dtype) + 0.5
    denom = area.clamp_min(1e-6)
    cx = (alpha.sum(2) * xs).sum(-1) / denom
    cy = (alpha.sum(3) * ys).sum(-1) / denom
    k2 = (h * w) / (_REF * _REF)
    present = (area >= MIN_AREA * k2) & (area <= MAX_AREA * k2)
    return Blobs(alpha, area, cx, cy, present)


def _blur(t: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur of ``[N,H,W]`` maps (zero padding: the maps are zero at the border)."""
    if sigma <= 0:
        return t
    rad = max(1, int(math.ceil(2.5 * sigma)))
    xs = torch.arange(-rad, rad + 1, dtype=t.dtype, device=t.device)
    k = torch.exp(-0.5 * (xs / sigma) ** 2)
    k = k / k.sum()
    y = F.conv2d(t[:, None], k.view(1, 1, 1, -1), padding=(0, rad))
    return F.conv2d(y, k.view(1, 1, -1, 1), padding=(rad, 0))[:, 0]


def _template(shape: str, cx: torch.Tensor, cy: torch.Tensor, r: torch.Tensor, h: int, w: int) -> torch.Tensor:
    xs = (torch.arange(w, dtype=torch.float32, device=cx.device) + 0.5).view(1, 1, w)
    ys = (torch.arange(h, dtype=torch.float32, device=cx.device) + 0.5).view(1, h, 1)
    dx, dy, r = xs - cx.view(-1, 1, 1), ys - cy.view(-1, 1, 1), r.view(-1, 1, 1)
    if shape == "circle":
        sdf = torch.sqrt(dx * dx + dy * dy) - r
    elif shape == "square":
        sdf = torch.maximum(dx.abs(), dy.abs()) - r
    else:
        s5 = math.sqrt(5.0)
        sdf = torch.maximum(dy - r, torch.maximum((-2 * (dx + r) - (dy - r)) / s5, (2 * (dx - r) - (dy - r)) / s5))
    return (0.5 - sdf).clamp(0, 1)


@torch.no_grad()
def classify_shapes(blobs: Blobs, b_idx: torch.Tensor, k_idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Shape class (index into ``SHAPES``) and half extent ``r`` (px at the image's size) of blobs.

    ``b_idx``, ``k_idx``: ``[N]`` image and colour indices of the blobs to classify.
    """
    h, w = blobs.size
    a = blobs.alpha[b_idx, k_idx]  # [N,H,W]
    area = blobs.area[b_idx, k_idx].clamp_min(1e-6)
    cx, cy = blobs.cx[b_idx, k_idx], blobs.cy[b_idx, k_idx]
    ious, radii = [], []
    for shape in SHAPES:
        r = torch.sqrt(area / SHAPE_AREA[shape])
        ccy = cy - r / 3 if shape == "triangle" else cy  # a triangle's centroid is r/3 below its box centre
        t0 = _template(shape, cx, ccy, r, h, w)
        best_iou = torch.zeros_like(area)
        for sigma in TEMPLATE_BLURS:  # match blurred images against equally blurred templates
            t = _blur(t0, sigma * min(h, w) / _REF)
            iou = torch.minimum(a, t).sum((1, 2)) / torch.maximum(a, t).sum((1, 2)).clamp_min(1e-6)
            best_iou = torch.maximum(best_iou, iou)
        ious.append(best_iou)
        radii.append(r)
    best = torch.stack(ious, 1).argmax(1)
    r = torch.stack(radii, 1).gather(1, best[:, None])[:, 0]
    return best, r


@dataclass
class ObjectReading:
    """What the oracle sees for one caption object."""

    present: bool
    shape: str | None
    size: str | None
    cx: float
    cy: float


def read_objects(images: torch.Tensor, scenes: list[Scene], blobs: Blobs | None = None) -> list[list[ObjectReading]]:
    """For each image, read each caption object (found by its colour) back from the pixels."""
    blobs = find_blobs(images) if blobs is None else blobs
    h, w = blobs.size
    k = min(h, w) / _REF
    b_idx = torch.tensor([b for b, s in enumerate(scenes) for _ in s.objects], dtype=torch.long)
    k_idx = torch.tensor([COLORS.index(o.color) for s in scenes for o in s.objects], dtype=torch.long)
    if len(b_idx) == 0:
        return [[] for _ in scenes]
    b_idx, k_idx = b_idx.to(images.device), k_idx.to(images.device)
    shape_i, r = classify_shapes(blobs, b_idx, k_idx)
    present = blobs.present[b_idx, k_idx].tolist()
    cxs, cys = blobs.cx[b_idx, k_idx].tolist(), blobs.cy[b_idx, k_idx].tolist()
    shape_i, r = shape_i.tolist(), (r / k).tolist()
    out: list[list[ObjectReading]] = []
    j = 0
    for s in scenes:
        row = []
        for _ in s.objects:
            ok = bool(present[j])
            row.append(
                ObjectReading(
                    present=ok,
                    shape=SHAPES[shape_i[j]] if ok else None,
                    size=("small" if r[j] < SMALL_LARGE_R else "large") if ok else None,
                    cx=cxs[j] / w,
                    cy=cys[j] / h,
                )
            )
            j += 1
        out.append(row)
    return out


def _position_ok(pos: str, o: ObjectReading) -> bool:
    if not o.present:
        return False
    return {
        "left": o.cx < 0.4,
        "right": o.cx > 0.6,
        "top": o.cy < 0.4,
        "bottom": o.cy > 0.6,
        "center": abs(o.cx - 0.5) < 0.17 and abs(o.cy - 0.5) < 0.17,
    }[pos]


def _relation_ok(rel: str, a: ObjectReading, b: ObjectReading, margin: float = 0.1) -> bool:
    if not (a.present and b.present):
        return False
    return {
        "left of": b.cx - a.cx > margin,
        "right of": a.cx - b.cx > margin,
        "above": b.cy - a.cy > margin,
        "below": a.cy - b.cy > margin,
    }[rel]


def evaluate(
    images: torch.Tensor, prompts: list[str], parts: tuple[str, ...] = ("color", "shape", "position", "count")
) -> dict[str, torch.Tensor]:
    """All requested oracle scores from one segmentation: ``{part: [B] float tensor}``, plus
    ``"oracle"`` (mean of color, shape and position) when those three are requested."""
    unknown = set(parts) - {"color", "shape", "position", "count"}
    if unknown:
        raise ValueError(f"unknown oracle parts {sorted(unknown)}; expected color, shape, position, count")
    if len(prompts) != images.shape[0]:
        raise ValueError(f"got {images.shape[0]} images but {len(prompts)} prompts")
    scenes = [parse_caption(p) for p in prompts]
    blobs = find_blobs(images)
    present = blobs.present.cpu()
    reads = read_objects(images, scenes, blobs) if {"shape", "position"} & set(parts) else None
    res: dict[str, list[float]] = {p: [] for p in parts}
    for b, s in enumerate(scenes):
        if "color" in parts:
            wanted = {COLORS.index(o.color) for o in s.objects}
            ok = [bool(present[b, k]) for k in wanted]
            ok.append(not any(bool(present[b, k]) for k in range(len(COLORS)) if k not in wanted))
            res["color"].append(sum(ok) / len(ok))
        if "shape" in parts:
            assert reads is not None
            ok = []
            for o, rd in zip(s.objects, reads[b], strict=True):
                ok.append(rd.present and rd.shape == o.shape)
                if o.size is not None:
                    ok.append(rd.present and rd.size == o.size)
            res["shape"].append(sum(ok) / len(ok))
        if "position" in parts:
            assert reads is not None
            if len(s.objects) == 2:
                good = _relation_ok(str(s.relation), reads[b][0], reads[b][1])
            elif s.position is not None:
                good = _position_ok(s.position, reads[b][0])
            else:
                good = reads[b][0].present
            res["position"].append(float(good))
        if "count" in parts:
            res["count"].append(float(int(present[b].sum()) == len(s.objects)))
    out = {k: torch.tensor(v, dtype=torch.float32, device=images.device) for k, v in res.items()}
    if {"color", "shape", "position"} <= set(parts):
        out["oracle"] = (out["color"] + out["shape"] + out["position"]) / 3
    return out


def color_score(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """Fraction of colour constraints met: each caption colour present as an object, no other colour."""
    return evaluate(images, prompts, ("color",))["color"]


def shape_score(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """Fraction of shape constraints met: each object's shape, and its size when the caption names it."""
    return evaluate(images, prompts, ("shape",))["shape"]


def position_score(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """1 when the position word / relation holds (an unplaced single object: when it is present)."""
    return evaluate(images, prompts, ("position",))["position"]


def count_score(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """1 when the number of colours present as objects equals the caption's number of objects."""
    return evaluate(images, prompts, ("count",))["count"]


def oracle_score(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """Mean of ``color_score``, ``shape_score`` and ``position_score``."""
    return evaluate(images, prompts, ("color", "shape", "position"))["oracle"]


# ------------------------------------------------- a differentiable relaxation of the shape oracle
# A differentiable relaxation of the shape oracle: the reward-feedback training signal for shapes.
#
# The shape oracle (``oracles.classify_shapes``) takes each caption object's colour blob, draws every
# shape class with the blob's area and centroid, and picks the class with the highest soft IoU. Its
# decision (an argmax) has no gradient. This score keeps the same segmentation but scores each object
# by the soft IoU between its coverage map and the template of the shape (and size) the CAPTION asks for:
#
#     alpha_k = clip(<x - bg, d_k> / |c_k - bg0|, 0, 1) * allowed_k   (differentiable in every pixel x)
#               d_k: the unit direction from the background grey bg0 to colour k; bg: the image's median
#               colour; allowed_k: 0 on pixels strongly of another colour
#     T       = template(wanted shape, centroid_k, r),  r = the caption's size (mid of its range) or
#               sqrt(area_k / SHAPE_AREA[wanted shape])
#     iou_k   = max over blur levels s of  sum min(alpha_k, T_s) / sum max(alpha_k, T_s)
#     score   = mean over the caption's objects of iou_k   (an absent colour scores 0)
#
# Only the coverage values carry gradient, at every pixel (so a blob can grow into the template, not
# only shrink); the blob's area and centroid (the oracle's ``find_blobs``), the masks and the templates
# are computed without gradient. It rises as the blob takes the wanted shape; a model can also
# raise it by painting the blob more fully inside the template, so train on it and judge with the
# hard oracles (``toy_shape``, ``toy_color``, ``toy_position``) beside.


def soft_coverage(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-colour coverage maps ``alpha [B,6,H,W]`` (differentiable in every pixel) and, without gradient,
    the oracle's blob ``area``, ``cx``, ``cy`` ``[B,6]`` (``oracles.find_blobs``)."""
    x = images.float()
    blobs = find_blobs(images)
    with torch.no_grad():
        bg = x.flatten(2).median(dim=2).values  # [B,3]: the background colour
        hue, chroma = hue_chroma(x)
        cls = torch.remainder(torch.round(hue / 60.0), 6).long()
        strong = chroma > STRONG_CHROMA
        ks = torch.arange(len(COLORS), device=x.device).view(1, -1, 1, 1)
        allowed = ((~strong).unsqueeze(1) | (cls.unsqueeze(1) == ks)).float()  # not another colour's pixel
        full = torch.tensor([COLOR_RGB[c] for c in COLORS], device=x.device) - torch.tensor(BACKGROUND, device=x.device)
        d = full / full.norm(dim=1, keepdim=True)  # [6,3] unit direction from the background to each colour
        ref = full.norm(dim=1).view(1, -1, 1, 1)  # the projection of a fully covered pixel
    proj = torch.einsum("bchw,kc->bkhw", x - bg[:, :, None, None], d)
    alpha = (proj / ref).clamp(0, 1) * allowed
    return alpha, blobs.area, blobs.cx, blobs.cy


def soft_shape_score(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """``[B]`` in [0,1]: mean soft IoU of each caption object's blob with its wanted shape (see above)."""
    alpha, area, cx, cy = soft_coverage(images)
    h, w = alpha.shape[-2:]
    k = min(h, w) / _REF
    scores = []
    for b, p in enumerate(prompts):
        per_obj = []
        for o in parse_caption(p).objects:
            c = COLORS.index(o.color)
            a = alpha[b, c][None]
            if float(area[b, c]) < 1e-3:
                per_obj.append(a.sum() * 0.0)
                continue
            with torch.no_grad():
                if o.size is not None:
                    r = torch.tensor(sum(SIZE_RANGE[o.size]) / 2 * k, device=a.device)
                else:
                    r = torch.sqrt(area[b, c] / SHAPE_AREA[o.shape])
                ccy = cy[b, c] - r / 3 if o.shape == "triangle" else cy[b, c]
                t0 = _template(o.shape, cx[b, c].view(1), ccy.view(1), r.view(1), h, w)
                temps = [_blur(t0, s * k) for s in TEMPLATE_BLURS]
            ious = [torch.minimum(a, t).sum() / torch.maximum(a, t).sum().clamp_min(1e-6) for t in temps]
            per_obj.append(torch.stack(ious).max())
        scores.append(torch.stack(per_obj).mean())
    return torch.stack(scores)
