"""A differentiable relaxation of the shape oracle: the reward-feedback training signal for shapes.

The shape oracle (``oracles.classify_shapes``) takes each caption object's colour blob, draws every
shape class with the blob's area and centroid, and picks the class with the highest soft IoU. Its
decision (an argmax) has no gradient. This score keeps the same segmentation but scores each object
by the soft IoU between its coverage map and the template of the shape (and size) the CAPTION asks for:

    alpha_k = clip(<x - bg, d_k> / |c_k - bg0|, 0, 1) * allowed_k   (differentiable in every pixel x)
              d_k: the unit direction from the background grey bg0 to colour k; bg: the image's median
              colour; allowed_k: 0 on pixels strongly of another colour
    T       = template(wanted shape, centroid_k, r),  r = the caption's size (mid of its range) or
              sqrt(area_k / SHAPE_AREA[wanted shape])
    iou_k   = max over blur levels s of  sum min(alpha_k, T_s) / sum max(alpha_k, T_s)
    score   = mean over the caption's objects of iou_k   (an absent colour scores 0)

Only the coverage values carry gradient, at every pixel (so a blob can grow into the template, not
only shrink); the blob's area and centroid (the oracle's ``find_blobs``), the masks and the templates
are computed without gradient. It rises as the blob takes the wanted shape; a model can also
raise it by painting the blob more fully inside the template, so train on it and judge with the
hard oracles (``toy_shape``, ``toy_color``, ``toy_position``) beside.
"""

from __future__ import annotations

import torch

from .oracles import _REF, STRONG_CHROMA, TEMPLATE_BLURS, _blur, _template, find_blobs, hue_chroma
from .shapes import BACKGROUND, COLOR_RGB, COLORS, SHAPE_AREA, SIZE_RANGE, parse_caption


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
