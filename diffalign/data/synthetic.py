"""Preference pairs rendered from the toy world's grammar, with no model: the winner is a faithful
render of the caption, the loser the same scene with the first object's colour changed. Used by the
tiny DPO recipe (``diffalign tiny-pairs``); pairs sampled from a model come from ``diffalign toyworld``."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
from PIL import Image


def write_rendered_pairs(
    out_dir: str | Path, n: int = 64, seed: int = 0, size: int = 32, overwrite: bool = False
) -> Path:
    """Write ``n`` pairs as ``out_dir/pairs.jsonl`` + ``out_dir/images/*.png`` (Pick-a-Pic schema).

    An existing ``pairs.jsonl`` is a :class:`FileExistsError` unless ``overwrite=True``, which also
    removes the images an earlier call wrote (so none is left that the new file does not list)."""
    from ..toyworld.shapes import COLORS, render, sample_scene

    out = Path(out_dir)
    path = out / "pairs.jsonl"
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path}: already exists; pass --overwrite (overwrite=True) to replace it and its "
                              "images, or choose another folder")
    if overwrite and (out / "images").is_dir():
        for old in (out / "images").glob("[0-9][0-9][0-9][0-9][0-9]_[01].png"):
            old.unlink()
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        scene = sample_scene(rng, "train")
        first = scene.objects[0]
        taken = {o.color for o in scene.objects}
        wrong = rng.choice([c for c in COLORS if c not in taken])
        bad = dataclasses.replace(scene, objects=(dataclasses.replace(first, color=str(wrong)),) + scene.objects[1:])
        good_img, bad_img = render(scene, rng, size), render(bad, rng, size)
        winner_first = bool(rng.random() < 0.5)  # both label values occur
        imgs = (good_img, bad_img) if winner_first else (bad_img, good_img)
        names = []
        for k, img in enumerate(imgs):
            name = f"images/{i:05d}_{k}.png"
            Image.fromarray((np.transpose(img, (1, 2, 0)) * 255).round().astype(np.uint8)).save(out / name)
            names.append(name)
        rows.append({"caption": scene.caption(), "jpg_0": names[0], "jpg_1": names[1], "label_0": 1 if winner_first else 0})
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path
