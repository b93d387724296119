"""Labels from a reward model: AI-feedback relabelling of pair data, and expert selection for DRO.

``relabel_pairs``: Diffusion-DPO's AI-feedback variant. Every pair of a Pick-a-Pic-schema data set is
scored with a reward (any ``rewards`` model or ``Ensemble``); ``label_0`` becomes 1 when image 0 scores
higher, 0 when image 1 does, and 0.5 (a tie) when the scores differ by at most ``tie_margin``. The
output is a new ``pairs.jsonl`` in the same schema (plus ``score_0``, ``score_1``, ``label_0_source``,
``source_row``) that every objective reads; image paths point at the source images, and images that
were stored as bytes are written out as PNG.

``select_experts``: the top-k images of a pool by a reward, written as a flat folder of ``NNNNNN.png``
+ ``NNNNNN.txt`` (caption) that ``ExpertImages`` reads, as the official Diffusion-DRO expert set was
built (top 500 of Pick-a-Pic by PickScore). The pool is pair data (both images of every pair) or a
``rankings.jsonl`` of ``{"caption", "images": [paths]}`` rows.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .pairs import PairDataError, PreferencePairs, crop_flip, decode_image, resize_short_side

Reward = Callable[[torch.Tensor, list[str]], torch.Tensor]


def _score(reward: Reward, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    with torch.no_grad():
        return reward(images, prompts).float().cpu().reshape(-1)


def label_from_scores(s0: torch.Tensor, s1: torch.Tensor, tie_margin: float = 0.0) -> torch.Tensor:
    """1 where image 0 wins, 0 where image 1 wins, 0.5 where |s0 - s1| <= tie_margin (exact ties too)."""
    lab = (s0 > s1).float()
    return torch.where((s0 - s1).abs() <= tie_margin, torch.full_like(lab, 0.5), lab)


def _unique_pairs(ds: PreferencePairs) -> Iterator[tuple[int, int]]:
    """(item index, pair index) for the first item of every source pair (ties appear twice)."""
    seen: set[int] = set()
    for i in range(len(ds)):
        p = int(ds._item_pair[i])
        if p not in seen:
            seen.add(p)
            yield i, p


def relabel_pairs(source: str | Path, reward: Reward, out_dir: str | Path, *, tie_margin: float = 0.0,
                  resolution: int = 256, batch_size: int = 32, image_root: str | None = None,
                  on_bad_row: str = "error", reward_name: str = "", progress: bool = True) -> dict[str, Any]:
    """Relabel every pair of ``source`` with ``reward``; writes ``out_dir/pairs.jsonl`` and a summary."""
    out = Path(out_dir)
    if (out / "pairs.jsonl").exists():
        raise FileExistsError(f"{out / 'pairs.jsonl'} exists; choose a new folder")
    ds = PreferencePairs(source, resolution=resolution, image_root=image_root, ties="keep", on_bad_row=on_bad_row,
                         random_flip=False)
    (out / "images").mkdir(parents=True, exist_ok=True)
    todo = list(_unique_pairs(ds))
    rows, agree, decided = [], 0, 0
    bar = tqdm(total=len(todo), desc="relabelling", disable=not progress)
    for start in range(0, len(todo), batch_size):
        chunk = todo[start : start + batch_size]
        items = [ds.load(i) for i, _ in chunk]
        swapped = [bool(ds._item_swap[i]) for i, _ in chunk]
        img0 = torch.stack([it["pixels_l"] if sw else it["pixels_w"] for it, sw in zip(items, swapped, strict=True)])
        img1 = torch.stack([it["pixels_w"] if sw else it["pixels_l"] for it, sw in zip(items, swapped, strict=True)])
        caps = [it["caption"] for it in items]
        s0, s1 = _score(reward, img0, caps), _score(reward, img1, caps)
        labels = label_from_scores(s0, s1, tie_margin)
        for j, (i, p) in enumerate(chunk):
            src_label = 0.5 if ds._item_weight[i] == 0.5 else (0.0 if swapped[j] else 1.0)
            refs = []
            for k in (0, 1):
                ref = ds._refs[p][k]
                if ref is None:  # bytes in the source: write the image out
                    name = f"images/{len(rows):07d}_{k}.png"
                    from torchvision.utils import save_image

                    save_image(ds._load_image(p, k), out / name)
                    refs.append(name)
                else:
                    refs.append(str(Path(ref).resolve()))
            new = float(labels[j])
            if new != 0.5 and src_label != 0.5:
                decided += 1
                agree += int(new == src_label)
            rows.append({"caption": caps[j], "jpg_0": refs[0], "jpg_1": refs[1], "label_0": new,
                         "score_0": float(s0[j]), "score_1": float(s1[j]), "label_0_source": src_label,
                         "source_row": int(ds._global[p])})
        bar.update(len(chunk))
    bar.close()
    with open(out / "pairs.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    summary = {
        "source": str(source), "reward": reward_name, "tie_margin": tie_margin, "pairs": len(rows),
        "ties": sum(r["label_0"] == 0.5 for r in rows), "source_ties": sum(r["label_0_source"] == 0.5 for r in rows),
        "agreement_with_source": agree / decided if decided else None, "decided_in_both": decided,
    }
    (out / "relabel_meta.json").write_text(json.dumps(summary, indent=2))
    return summary


def _pool(pool: str | Path, resolution: int, image_root: str | None) -> list[tuple[str, Any]]:
    """(caption, image reference) for every image of the pool; references are paths or (dataset, p, k)."""
    p = Path(pool)
    if p.is_file() and p.name.startswith("rankings") and p.suffix == ".jsonl":
        out = []
        for n, line in enumerate(p.read_text().splitlines(), 1):
            if line.strip():
                rec = json.loads(line)
                if "caption" not in rec or "images" not in rec:
                    raise PairDataError(f"{p}: line {n}: needs 'caption' and 'images'")
                out += [(rec["caption"], p.parent / img) for img in rec["images"]]
        return out
    ds = PreferencePairs(pool, resolution=resolution, image_root=image_root, ties="keep", random_flip=False)
    return [(ds._captions[q], (ds, q, k)) for _, q in _unique_pairs(ds) for k in (0, 1)]


def _load(ref: Any, resolution: int) -> torch.Tensor:
    if isinstance(ref, tuple):
        ds, q, k = ref
        img = ds._load_image(q, k)
    else:
        try:
            img = decode_image(ref)
        except Exception as e:
            raise PairDataError(f"{ref}: cannot read image ({type(e).__name__}: {e})") from e
    return crop_flip(resize_short_side(img, resolution), resolution, 0.5, 0.5, False)


def select_experts(pool: str | Path, reward: Reward, out_dir: str | Path, *, top: int | None = 500,
                   per_prompt: int | None = None, min_score: float | None = None, resolution: int = 256,
                   batch_size: int = 32, image_root: str | None = None, progress: bool = True) -> dict[str, Any]:
    """Score every image of ``pool``; keep the best ``per_prompt`` per caption (all when None), then the
    ``top`` best overall (all when None), only those scoring above ``min_score``; write them to ``out_dir`` as PNG + caption .txt and ``experts.jsonl``."""
    from torchvision.utils import save_image

    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty; choose a new folder")
    entries = _pool(pool, resolution, image_root)
    scores = []
    for start in tqdm(range(0, len(entries), batch_size), desc="scoring pool", disable=not progress):
        chunk = entries[start : start + batch_size]
        imgs = torch.stack([_load(ref, resolution) for _, ref in chunk])
        scores.append(_score(reward, imgs, [c for c, _ in chunk]))
    s = torch.cat(scores)
    order = torch.argsort(s, descending=True, stable=True).tolist()
    kept, per_caption = [], {}
    for i in order:
        if min_score is not None and float(s[i]) <= min_score:
            break
        cap = entries[i][0]
        if per_prompt is not None and per_caption.get(cap, 0) >= per_prompt:
            continue
        per_caption[cap] = per_caption.get(cap, 0) + 1
        kept.append(i)
        if top is not None and len(kept) >= top:
            break
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "experts.jsonl", "w") as f:
        for n, i in enumerate(kept):
            cap, ref = entries[i]
            save_image(_load(ref, resolution), out / f"{n:06d}.png")
            (out / f"{n:06d}.txt").write_text(cap)
            f.write(json.dumps({"image": f"{n:06d}.png", "caption": cap, "score": float(s[i])}) + "\n")
    summary = {"pool": str(pool), "pool_images": len(entries), "experts": len(kept),
               "pool_mean_score": float(s.mean()), "expert_mean_score": float(s[kept].mean()) if kept else None}
    (out / "experts_meta.json").write_text(json.dumps(summary, indent=2))
    return summary
