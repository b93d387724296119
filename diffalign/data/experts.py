"""Expert demonstrations for Diffusion-DRO: single (image, caption) items, no pairs.

Sources (the official release stores one folder per demonstration; flat folders are common too):

    DIR/NAME.png + DIR/NAME.txt           a flat folder: each image with a caption file of the same stem
    DIR/ITEM/image.png + DIR/ITEM/caption.txt   one sub-folder per demonstration
    FILE.jsonl                            {"image": path (relative to the file), "caption": str} per line

A missing caption file, an empty caption or a missing image is a :class:`PairDataError` naming the
file (``on_bad_row="error"``) or is skipped and counted (``"skip"``). ``select_experts`` writes the
top-k images of any pool by any reward into a flat folder that this class reads.

Item: ``{"caption": str, "pixels": FloatTensor[3,R,R] in [0,1], "row": int}``.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from .pairs import PairDataError, crop_flip, decode_image, resize_short_side

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def _read_utf8(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        line = path.read_bytes()[: e.start].count(b"\n") + 1
        raise PairDataError(f"{path}: line {line}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at byte offset "
                            f"{e.start}); save the file as UTF-8") from None


def _caption_file(image: Path) -> Path:
    own = image.with_suffix(".txt")
    return own if own.is_file() or image.stem != "image" else image.parent / "caption.txt"


def list_experts(source: str | Path) -> list[tuple[Path, Path | None, str | None, str]]:
    """``(image, caption file or None, caption or None, where)`` for every demonstration of ``source``."""
    p = Path(source)
    if p.is_file() and p.suffix.lower() == ".jsonl":
        out = []
        for line_no, line in enumerate(_read_utf8(p).splitlines(), 1):
            if not line.strip():
                continue
            where = f"{p}: line {line_no}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise PairDataError(f"{where}: not valid JSON ({e.msg})") from None
            if not isinstance(rec, dict) or "image" not in rec or "caption" not in rec:
                raise PairDataError(f"{where}: needs the keys 'image' and 'caption'")
            img = Path(rec["image"])
            out.append((img if img.is_absolute() else p.parent / img, None, rec["caption"], where))
        return out
    if not p.is_dir():
        raise PairDataError(f"{p}: expert demonstrations not found (a folder of images + .txt captions, or .jsonl)")
    images = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise PairDataError(f"{p}: no images ({', '.join(IMAGE_SUFFIXES)}) in the expert folder")
    return [(img, _caption_file(img), None, str(img)) for img in images]


class ExpertImages(Dataset):
    def __init__(self, source: str | Path, resolution: int, *, on_bad_row: str = "error",
                 random_flip: bool = False, limit: int | None = None) -> None:
        self.source, self.resolution, self.random_flip = Path(source), resolution, random_flip
        self.items: list[tuple[Path, str, str]] = []
        skipped: Counter[str] = Counter()
        for img, cap_file, caption, where in list_experts(source):
            try:
                if caption is None:
                    if cap_file is None or not cap_file.is_file():
                        raise PairDataError(f"{where}: no caption file {cap_file}")
                    caption = _read_utf8(cap_file).strip()
                if not isinstance(caption, str) or not caption.strip():
                    raise PairDataError(f"{where}: empty caption")
                if not img.is_file():
                    raise PairDataError(f"{where}: image file not found: {img}")
            except PairDataError as e:
                if on_bad_row != "skip":
                    raise
                skipped[str(e).split(": ", 1)[-1].split(" ")[0]] += 1
                continue
            self.items.append((img, caption, where))
        if skipped:
            logger.warning("%s: skipped %d bad demonstrations (%s)", source, sum(skipped.values()), dict(skipped))
        if limit is not None:
            self.items = self.items[:limit]
        if not self.items:
            raise PairDataError(f"{source}: no usable expert demonstrations")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        img, caption, where = self.items[i]
        try:
            x = decode_image(img)
        except Exception as e:
            raise PairDataError(f"{where}: cannot decode image ({type(e).__name__}: {e})") from e
        x = resize_short_side(x, self.resolution)
        flip = bool(torch.rand(()) < 0.5) if self.random_flip else False
        return {"caption": caption, "pixels": crop_flip(x, self.resolution, 0.5, 0.5, flip), "row": i}


def collate_experts(items: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "captions": [it["caption"] for it in items],
        "pixels": torch.stack([it["pixels"] for it in items]),
        "rows": torch.tensor([it["row"] for it in items], dtype=torch.int64),
    }
