"""A differentiable relaxation of the shape oracle: the reward-feedback training signal for shapes.

The shape oracle (``oracles.classify_shapes``) takes each caption object's colour blob, draws every
shape class with the blob's area and centroid, and picks the class with the highest soft IoU. Its
decision (an argmax) has no gradient. This score keeps the same segmentation but scores each object
by the soft IoU between its coverage map and the template of the shape (and size) the CAPTION asks for:

    alpha_k = clip(chroma(x) / ref_k, 0, 1) * mask_k          (differentiable in the pixels x)
    T       = template(wanted shape, centroid_k, r),  r = the caption's size (mid of its range) or
              sqrt(area_k / SHAPE_AREA[wanted shape])
    iou_k   = max over blur levels s of  sum min(alpha_k, T_s) / sum max(alpha_k, T_s)
    score   = mean over the caption's objects of iou_k   (an absent colour scores 0)

Only the coverage values carry gradient: the masks (which pixels belong to a colour), the blob's
reference chroma, centroid and area, the white balance and the templates are computed without
gradient, as the oracle computes them. It rises as the blob takes the wanted shape; a model can also
raise it by painting the blob more fully inside the template, so train on it and judge with the
hard oracles (``toy_shape``, ``toy_color``, ``toy_position``) beside.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .oracles import _REF, STRONG_CHROMA, TEMPLATE_BLURS, _blur, _template, hue_chroma
from .shapes import COLORS, SHAPE_AREA, SIZE_RANGE, parse_caption


def soft_coverage(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-colour coverage maps ``alpha [B,6,H,W]`` (differentiable) and, without gradient, the blobs'
    ``area``, ``cx``, ``cy`` ``[B,6]`` (the oracle's ``find_blobs`` with the gradient kept on alpha)."""
    x = images.float()
    with torch.no_grad():
        bg = x.flatten(2).median(dim=2).values.clamp_min(0.05)
        gain = bg.mean(1, keepdim=True) / bg
    xw = (x * gain[:, :, None, None]).clamp(0, 1)
    hue, chroma = hue_chroma(xw)
    _, _, h, w = x.shape
    with torch.no_grad():
        cls = torch.remainder(torch.round(hue / 60.0), 6).long()
        strong = chroma > STRONG_CHROMA
        ks = torch.arange(len(COLORS), device=x.device).view(1, -1, 1, 1)
        core = strong.unsqueeze(1) & (cls.unsqueeze(1) == ks)
        support = F.max_pool2d(core.float(), 3, stride=1, padding=1) > 0
        allowed = (~strong).unsqueeze(1) | (cls.unsqueeze(1) == ks)
        ch0 = chroma.unsqueeze(1).expand(-1, len(COLORS), -1, -1)
        peak = torch.where(core, ch0, torch.zeros_like(ch0)).amax(dim=(2, 3), keepdim=True)
        interior = core & (ch0 >= 0.75 * peak)
        ref = (ch0 * interior).sum((2, 3), keepdim=True) / interior.sum((2, 3), keepdim=True).clamp_min(1)
        mask = (support & allowed).float()
    alpha = (chroma.unsqueeze(1) / ref.clamp_min(STRONG_CHROMA)).clamp(0, 1) * mask
    with torch.no_grad():
        a = alpha.detach()
        area = a.sum((2, 3))
        xs = torch.arange(w, device=x.device, dtype=a.dtype) + 0.5
        ys = torch.arange(h, device=x.device, dtype=a.dtype) + 0.5
        cx = (a.sum(2) * xs).sum(-1) / area.clamp_min(1e-6)
        cy = (a.sum(3) * ys).sum(-1) / area.clamp_min(1e-6)
    return alpha, area, cx, cy


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
