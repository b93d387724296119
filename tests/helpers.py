"""Small data sets the tests write for themselves."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image


def write_pairs(root: Path, n: int = 8) -> Path:
    """``n`` pairs of 32x32 PNGs (a red square vs noise), labels alternating."""
    rng = np.random.default_rng(0)
    (root / "img").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        a = np.full((32, 32, 3), 230, np.uint8)
        a[8:24, 8:24] = [220, 30, 30]
        b = (rng.random((32, 32, 3)) * 255).astype(np.uint8)
        Image.fromarray(a).save(root / f"img/{i}_0.png")
        Image.fromarray(b).save(root / f"img/{i}_1.png")
        rows.append({"caption": "a red square", "jpg_0": f"img/{i}_0.png", "jpg_1": f"img/{i}_1.png", "label_0": i % 2})
    path = root / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def write_experts(root: Path, n: int = 8) -> Path:
    """``n`` expert demonstrations (image + caption) as JSONL, for Diffusion-DRO."""
    (root / "experts").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        a = np.full((32, 32, 3), 230, np.uint8)
        a[4 + i % 4 : 20 + i % 4, 8:24] = [220, 30, 30]
        Image.fromarray(a).save(root / f"experts/{i}.png")
        rows.append({"image": f"experts/{i}.png", "caption": "a red square"})
    path = root / "experts.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path
