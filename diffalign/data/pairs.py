"""Preference pairs in the Pick-a-Pic schema, as a torch ``Dataset`` of (winner, loser) pixel pairs.

Schema (one record per pair)::

    caption  str          the prompt (kept as-is; truncation happens in the tokenizer)
    jpg_0    image        first image
    jpg_1    image        second image
    label_0  0 | 0.5 | 1  1: jpg_0 preferred, 0: jpg_1 preferred, 0.5: tie

Sources: a ``.parquet`` file, a ``.jsonl`` file (one JSON object per line, blank lines ignored), or a
directory holding such files (read in sorted name order, rows numbered across files). Images are
either encoded bytes (parquet ``binary`` columns as in Pick-a-Pic v2 on the Hub, or the Hub's image
struct ``{"bytes", "path"}``) or a path, relative to ``image_root`` when given, else to the data
file's directory (absolute paths are used as-is).

Rows are numbered from 0 in file order (blank JSONL lines not counted); error messages give the
file, the row within that file and, for JSONL, the 1-based line.

Ties (``ties=``):
    ``"drop"`` (default) drops pairs with ``label_0 == 0.5``, as the official Diffusion-DPO code does.
    ``"keep"`` emits a tied pair twice, once in each order, each with ``weight=0.5``: the objective
    multiplies its per-pair loss by ``weight``, so a tie pulls the implicit reward margin towards 0.
    Decided pairs always have ``weight=1.0``.

Bad rows (``on_bad_row=``): a missing column, a label outside {0, 0.5, 1}, a null/empty caption or
one over ``max_caption_chars`` (10,000), a missing image file, undecodable image bytes, an image whose
short side is under ``min_image_side`` (8) or whose aspect ratio is over ``max_aspect_ratio`` (8), or
one over PIL's decompression-bomb limit is a :class:`PairDataError` naming the file and row
(``"error"``, the default). With ``"skip"`` such rows are dropped and counted, and one
``logging.warning`` summarises the counts per reason. Labels, captions and image-file existence are
checked when the dataset is built; image bytes are decoded lazily, so a corrupt image is found when
its item is loaded (pass ``check_images=True`` to decode everything up front). In skip mode an item
whose image turns out corrupt at load time is replaced by the next loadable item (and counted).

Item (winner first, as the objective needs)::

    {"caption": str, "pixels_w": FloatTensor[3,R,R] in [0,1], "pixels_l": FloatTensor[3,R,R],
     "weight": float, "row": int}     # row: the 0-based global source row

Transform (per image, pixels in [0,1] float throughout): EXIF orientation applied; converted to RGB
(transparent images composited on white; grayscale replicated to three channels; 16-bit and 32-bit
integer grayscale scaled from [0, 65535]; float images clipped to [0,1]; palette/CMYK/YCbCr through
PIL's RGB conversion); an image whose short side is 4x ``resolution`` or more first reduced by an
integer box filter (JPEG: decoded at reduced scale) to keep memory in proportion to the output; the
short side resized to ``resolution`` (``interpolation`` bilinear by
default, as the official code, antialiased, clamped to [0,1]); a center crop (or a random crop with
``random_crop=True``) to ``resolution`` x ``resolution``; a random horizontal flip with
``random_flip=True`` (the official default). With ``same_augment=True`` (default) both images of a
pair share the flip and the relative crop position: the two images are then compared under the same
view, so the pair differs only in what the labeller judged, and the DPO loss (same noise and timestep
for both images) is not fed a difference that comes from the augmentation. This is our choice, not
the references': the official Diffusion-DPO ``train.py`` and the diffusers DPO port
(``train_diffusion_dpo.py``) both apply their torchvision transforms to each image of a pair
separately (independent flips and random crops) before concatenating them on the channel axis;
``same_augment=False`` reproduces that.

Data checks beyond the bad rows: a row whose two images are the same file (``jpg_0 == jpg_1`` after
resolving paths) carries no preference and is a bad row ("same image"); a row that repeats an
earlier row's caption and image pair (either order) is kept, as the references keep it, but counted
in ``warn_counts["duplicate row"]`` and summarised in one warning naming the first repeat. Images
stored as bytes are not compared. A JSONL line that is not UTF-8 is a bad row naming the file, row,
line and byte offset.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from torch.utils.data import Dataset

logger = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0")
IMAGE_COLUMNS = ("jpg_0", "jpg_1")
DATA_SUFFIXES = (".parquet", ".jsonl", ".ndjson")

TiesMode = Literal["drop", "keep"]
BadRowMode = Literal["error", "skip"]


class PairDataError(ValueError):
    """A preference data file or row is unusable; the message names the file and row."""


# --------------------------------------------------------------------------------------------------
# images
# --------------------------------------------------------------------------------------------------
class ImageSizeError(ValueError):
    """An image too small, or too elongated, to give a training crop."""


def _exif_transpose(img: Image.Image) -> Image.Image:
    with contextlib.suppress(OSError, ValueError, TypeError, KeyError, AttributeError, SyntaxError):
        img = ImageOps.exif_transpose(img)  # a broken EXIF block is no reason to lose the image
    return img


def image_to_tensor(img: Image.Image, exif: bool = True) -> torch.Tensor:
    """A PIL image of any mode -> ``FloatTensor[3,H,W]`` in [0,1] (see the module docstring)."""
    if exif:
        img = _exif_transpose(img)
    mode = img.mode
    if mode.startswith("I") or mode == "F":  # I;16*, I (32-bit int), F (32-bit float): grayscale
        arr = np.asarray(img).astype(np.float32)
        arr = np.clip(arr, 0.0, 1.0) if mode == "F" else np.clip(arr / 65535.0, 0.0, 1.0)
        t = torch.from_numpy(np.ascontiguousarray(arr))
        return t.unsqueeze(0).expand(3, -1, -1).contiguous()
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info
    if has_alpha:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba).convert("RGB")
    elif mode != "RGB":
        img = img.convert("RGB")
    arr = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)


def decode_image(
    data: bytes | str | os.PathLike[str],
    target_side: int | None = None,
    min_side: int = 1,
    max_aspect_ratio: float | None = None,
) -> torch.Tensor:
    """Decode image bytes or an image file to ``FloatTensor[3,H,W]`` in [0,1]; PIL errors propagate.

    The size is checked before the pixels are decoded: a short side below ``min_side`` or a long/short
    ratio above ``max_aspect_ratio`` is an :class:`ImageSizeError`. With ``target_side`` (the training
    resolution), an image whose short side is 4x that or more is first reduced by an integer box
    filter (JPEG: decoded at 1/2, 1/4 or 1/8 scale) so the short side stays >= 2x ``target_side``:
    a huge image costs memory in proportion to the output, not to its own size, and the final
    antialiased resize sees the same frequencies. Images under 4x are untouched. PIL's decompression
    bomb limit (``Image.MAX_IMAGE_PIXELS``) still applies.
    """
    src = io.BytesIO(data) if isinstance(data, (bytes, bytearray, memoryview)) else data
    with Image.open(src) as img:
        w, h = img.size
        if min(w, h) < min_side:
            raise ImageSizeError(f"image is {w}x{h} pixels; the short side must be at least {min_side}")
        if max_aspect_ratio and max(w, h) > max_aspect_ratio * min(w, h):
            raise ImageSizeError(f"image is {w}x{h} pixels; the aspect ratio is over {max_aspect_ratio:g}")
        factor = min(w, h) // (2 * target_side) if target_side else 0
        if factor >= 2 and img.format == "JPEG":
            img.draft(img.mode, (w // factor, h // factor))
        img.load()
        if factor < 2:
            return image_to_tensor(img)
        out = _exif_transpose(img)
        factor = min(out.size) // (2 * target_side)
        if factor >= 2:
            with contextlib.suppress(ValueError):  # a mode reduce() does not take: convert at full size
                out = out.reduce(factor)
        return image_to_tensor(out, exif=False)


def resize_short_side(img: torch.Tensor, size: int, interpolation: str = "bilinear") -> torch.Tensor:
    """Resize ``[C,H,W]`` so that its short side is ``size`` (torchvision's rounding), antialiased."""
    _, h, w = img.shape
    short, long = (h, w) if h <= w else (w, h)
    if short == size:
        return img
    new_long = int(size * long / short)
    nh, nw = (size, new_long) if h <= w else (new_long, size)
    out = F.interpolate(img[None], size=(nh, nw), mode=interpolation, antialias=True, align_corners=False)
    return out[0].clamp_(0.0, 1.0)


def crop_flip(img: torch.Tensor, size: int, fy: float, fx: float, flip: bool) -> torch.Tensor:
    """Crop ``size`` x ``size`` at relative position (fy, fx) in [0,1] (0.5: center), then maybe flip."""
    _, h, w = img.shape
    top = min(round(fy * (h - size)), h - size)
    left = min(round(fx * (w - size)), w - size)
    out = img[:, top : top + size, left : left + size]
    if flip:
        out = out.flip(-1)
    return out.contiguous()


# --------------------------------------------------------------------------------------------------
# sources
# --------------------------------------------------------------------------------------------------
@dataclass
class _Source:
    path: Path
    kind: str  # "jsonl" | "parquet"
    row_offset: int = 0
    num_rows: int = 0
    lines: list[int] = field(default_factory=list)  # jsonl: 1-based line of each row
    lazy_columns: tuple[str, ...] = ()  # parquet image columns read on demand (bytes / struct)
    rg_offsets: np.ndarray | None = None  # parquet: first row of each row group (+ total)

    def where(self, row: int) -> str:
        if self.kind == "jsonl" and row < len(self.lines):
            return f"{self.path}: row {row} (line {self.lines[row]})"
        return f"{self.path}: row {row}"


def list_data_files(path: str | os.PathLike[str]) -> list[Path]:
    """The data files behind ``path``: the file itself, or the parquet/jsonl files of a directory."""
    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in DATA_SUFFIXES)
        if not files:
            raise PairDataError(f"{p}: directory holds no {'/'.join(DATA_SUFFIXES)} files")
        return files
    if not p.is_file():
        raise PairDataError(f"{p}: preference data file not found")
    if p.suffix.lower() not in DATA_SUFFIXES:
        raise PairDataError(f"{p}: unsupported preference data format {p.suffix!r} (use .parquet or .jsonl)")
    return [p]


class _BadRow(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason, self.detail = reason, detail


def _check_label(value: Any) -> float:
    if isinstance(value, (bool, int, float, np.integer, np.floating)) and not (
        isinstance(value, float) and math.isnan(value)
    ):
        v = float(value)
        if v in (0.0, 0.5, 1.0):
            return v
    raise _BadRow("bad label", f"label_0 must be 0, 0.5 or 1, got {value!r}")


MAX_CAPTION_CHARS = 10_000  # far past any text encoder's window (T5 at 512 tokens is ~2,500 characters)


def _check_caption(value: Any, max_chars: int | None = MAX_CAPTION_CHARS) -> str:
    if value is None:
        raise _BadRow("empty caption", "caption is null")
    if not isinstance(value, str):
        raise _BadRow("bad caption", f"caption must be a string, got {type(value).__name__}")
    if not value.strip():
        raise _BadRow("empty caption", f"caption is empty ({value!r})")
    if max_chars is not None and len(value) > max_chars:
        raise _BadRow("caption too long", f"caption has {len(value)} characters, more than {max_chars} "
                      f"(starts {value[:40]!r}); a column mix-up?")
    return value


# --------------------------------------------------------------------------------------------------
# dataset
# --------------------------------------------------------------------------------------------------
class PreferencePairs(Dataset):
    """Pick-a-Pic-schema preference pairs -> winner/loser pixel pairs (see the module docstring).

    Args:
        path: a ``.parquet``/``.jsonl`` file or a directory of them.
        resolution: output side in pixels (square).
        image_root: directory that relative image paths are resolved against (default: the data
            file's directory).
        ties: ``"drop"`` (default) or ``"keep"`` (both orders, weight 0.5 each).
        on_bad_row: ``"error"`` (default) or ``"skip"``.
        random_crop, random_flip, same_augment, interpolation: the transform.
        check_images: decode every image when the dataset is built (finds corrupt bytes up front).
        limit: use only the first ``limit`` source rows (before ties/bad rows are removed).
        max_caption_chars: a longer caption is a bad row (``None``: no limit).
        min_image_side, max_aspect_ratio: an image with a shorter short side, or a larger long/short
            ratio, is a bad row (found when it is loaded, or up front with ``check_images``).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        resolution: int = 512,
        *,
        image_root: str | os.PathLike[str] | None = None,
        ties: TiesMode = "drop",
        on_bad_row: BadRowMode = "error",
        random_crop: bool = False,
        random_flip: bool = True,
        same_augment: bool = True,
        interpolation: Literal["bilinear", "bicubic"] = "bilinear",
        check_images: bool = False,
        limit: int | None = None,
        max_caption_chars: int | None = MAX_CAPTION_CHARS,
        min_image_side: int = 8,
        max_aspect_ratio: float | None = 8.0,
    ) -> None:
        if ties not in ("drop", "keep"):
            raise ValueError(f"ties must be 'drop' or 'keep', got {ties!r}")
        if on_bad_row not in ("error", "skip"):
            raise ValueError(f"on_bad_row must be 'error' or 'skip', got {on_bad_row!r}")
        if interpolation not in ("bilinear", "bicubic"):
            raise ValueError(f"interpolation must be 'bilinear' or 'bicubic', got {interpolation!r}")
        if int(resolution) <= 0:
            raise ValueError(f"resolution must be positive, got {resolution}")
        self.path = Path(path)
        self.resolution = int(resolution)
        self.image_root = Path(image_root) if image_root is not None else None
        self.ties = ties
        self.on_bad_row = on_bad_row
        self.random_crop = random_crop
        self.random_flip = random_flip
        self.same_augment = same_augment
        self.interpolation = interpolation
        self.check_images = check_images
        self.limit = limit
        self.max_caption_chars = max_caption_chars
        self.min_image_side = int(min_image_side)
        self.max_aspect_ratio = max_aspect_ratio

        self.sources: list[_Source] = []
        # per kept pair (parallel lists)
        self._src: list[int] = []
        self._local: list[int] = []
        self._global: list[int] = []
        self._captions: list[str] = []
        self._refs: list[tuple[Any, Any]] = []  # resolved Path, or None (lazy parquet bytes)
        self.skip_counts: Counter[str] = Counter()
        self.warn_counts: Counter[str] = Counter()  # rows kept, with a warning (duplicates)
        self._first_skip: str | None = None
        self._first_warn: str | None = None
        seen_pairs: dict[tuple[str, frozenset[Path]], str] = {}
        self.num_ties = 0
        self.num_source_rows = 0
        self._rg_cache: OrderedDict[tuple[int, int], dict[str, list[Any]]] = OrderedDict()
        self._pq_files: dict[int, Any] = {}
        self.load_skips = 0

        labels: list[float] = []
        for f in list_data_files(self.path):
            if self.limit is not None and self.num_source_rows >= self.limit:
                break
            src = _Source(path=f, kind="parquet" if f.suffix.lower() == ".parquet" else "jsonl")
            src.row_offset = self.num_source_rows
            self.sources.append(src)
            si = len(self.sources) - 1
            rows = self._read_jsonl(src) if src.kind == "jsonl" else self._read_parquet(src)
            for local, rec in enumerate(rows):
                if self.limit is not None and self.num_source_rows >= self.limit:
                    break
                self.num_source_rows += 1
                try:
                    if isinstance(rec, _BadRow):
                        raise rec
                    caption = _check_caption(rec.get("caption"), max_caption_chars)
                    label = _check_label(rec.get("label_0"))
                    refs = (self._resolve_ref(src, rec, "jpg_0"), self._resolve_ref(src, rec, "jpg_1"))
                    if refs[0] is not None and refs[0] == refs[1]:
                        raise _BadRow("same image", f"jpg_0 and jpg_1 are the same file ({refs[0]}): no preference")
                except _BadRow as e:
                    self._bad(src.where(local), e)
                    continue
                if refs[0] is not None and refs[1] is not None:
                    key = (caption, frozenset(refs))
                    first = seen_pairs.setdefault(key, src.where(local))
                    if first != src.where(local):
                        self.warn_counts["duplicate row"] += 1
                        self._first_warn = self._first_warn or f"{src.where(local)} repeats {first}"
                if label == 0.5 and ties == "drop":
                    self.num_ties += 1
                    continue
                self.num_ties += label == 0.5
                self._src.append(si)
                self._local.append(local)
                self._global.append(src.row_offset + local)
                self._captions.append(caption)
                self._refs.append(refs)
                labels.append(label)
            src.num_rows = self.num_source_rows - src.row_offset

        if check_images:
            keep = []
            for p in range(len(self._captions)):
                try:
                    self._load_pair_images(p)
                    keep.append(p)
                except PairDataError as e:
                    if on_bad_row == "error":
                        raise
                    self.skip_counts["bad image"] += 1
                    self._first_skip = self._first_skip or str(e)
            if len(keep) != len(self._captions):
                self._src = [self._src[p] for p in keep]
                self._local = [self._local[p] for p in keep]
                self._global = [self._global[p] for p in keep]
                self._captions = [self._captions[p] for p in keep]
                self._refs = [self._refs[p] for p in keep]
                labels = [labels[p] for p in keep]

        # items: (pair index, winner is jpg_1, weight)
        item_pair, item_swap, item_weight = [], [], []
        for p, label in enumerate(labels):
            if label == 0.5:
                item_pair += [p, p]
                item_swap += [False, True]
                item_weight += [0.5, 0.5]
            else:
                item_pair.append(p)
                item_swap.append(label == 0.0)
                item_weight.append(1.0)
        self._item_pair = np.asarray(item_pair, dtype=np.int64)
        self._item_swap = np.asarray(item_swap, dtype=bool)
        self._item_weight = np.asarray(item_weight, dtype=np.float32)

        if self.num_ties:
            verb = "dropped" if ties == "drop" else "kept (both orders, weight 0.5)"
            logger.info("%s: %s %d tie(s)", self.path, verb, self.num_ties)
        if self.skip_counts:
            total = sum(self.skip_counts.values())
            reasons = ", ".join(f"{k}: {v}" for k, v in sorted(self.skip_counts.items()))
            logger.warning(
                "%s: skipped %d bad row(s) of %d (%s); first: %s",
                self.path, total, self.num_source_rows, reasons, self._first_skip,
            )
        if self.warn_counts:
            logger.warning(
                "%s: %s (kept); first: %s", self.path,
                ", ".join(f"{v} {k}(s)" for k, v in sorted(self.warn_counts.items())), self._first_warn,
            )
        if len(self) == 0:
            raise PairDataError(f"{self.path}: no usable preference pairs ({self.num_source_rows} rows read)")

    # --- reading ----------------------------------------------------------------------------------
    def _bad(self, where: str, e: _BadRow) -> None:
        msg = f"{where}: {e.detail}"
        if self.on_bad_row == "error":
            raise PairDataError(msg + " (pass on_bad_row='skip' to skip bad rows)")
        self.skip_counts[e.reason] += 1
        self._first_skip = self._first_skip or msg

    def _read_jsonl(self, src: _Source) -> list[Any]:
        rows: list[Any] = []
        with open(src.path, "rb") as fh:
            offset = 0
            for lineno, raw in enumerate(fh, start=1):
                offset, start = offset + len(raw), offset
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    src.lines.append(lineno)
                    rows.append(_BadRow("not UTF-8", f"not UTF-8 text: byte 0x{raw[e.start]:02x} at byte offset "
                                        f"{start + e.start} of the file (save the file as UTF-8)"))
                    continue
                if lineno == 1:
                    line = line.removeprefix("\ufeff")  # a UTF-8 byte-order mark
                if not line.strip():
                    continue
                src.lines.append(lineno)
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    rows.append(_BadRow("invalid JSON", f"invalid JSON ({e.msg} at column {e.colno})"))
                    continue
                if not isinstance(rec, dict):
                    rows.append(_BadRow("invalid JSON", f"expected a JSON object, got {type(rec).__name__}"))
                    continue
                missing = [c for c in REQUIRED_COLUMNS if c not in rec]
                if missing:
                    rows.append(_BadRow("missing column", f"missing key(s) {', '.join(missing)}"))
                    continue
                rows.append(rec)
        return rows

    def _read_parquet(self, src: _Source) -> list[Any]:
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            pf = pq.ParquetFile(src.path)
        except Exception as e:
            raise PairDataError(f"{src.path}: cannot read parquet file ({e})") from e
        schema = pf.schema_arrow
        missing = [c for c in REQUIRED_COLUMNS if c not in schema.names]
        if missing:
            raise PairDataError(
                f"{src.path}: missing column(s) {', '.join(missing)} (found: {', '.join(schema.names)})"
            )
        eager, lazy = ["caption", "label_0"], []
        for c in IMAGE_COLUMNS:
            t = schema.field(c).type
            if pa.types.is_string(t) or pa.types.is_large_string(t):
                eager.append(c)
            elif pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_struct(t):
                lazy.append(c)
            else:
                raise PairDataError(f"{src.path}: column {c} has type {t}; expected binary (image bytes) or string (path)")
        src.lazy_columns = tuple(lazy)
        md = pf.metadata
        src.rg_offsets = np.cumsum([0] + [md.row_group(i).num_rows for i in range(md.num_row_groups)])
        table = pf.read(columns=eager).to_pydict()
        n = md.num_rows
        return [{k: table[k][i] for k in eager} | {c: _LAZY for c in lazy} for i in range(n)]

    def _resolve_ref(self, src: _Source, rec: dict[str, Any], col: str) -> Path | None:
        v = rec.get(col)
        if v is _LAZY:
            return None
        if v is None:
            raise _BadRow("missing image", f"{col} is null")
        if not isinstance(v, str) or not v:
            raise _BadRow("bad image reference", f"{col} must be an image path, got {type(v).__name__}")
        p = Path(v)
        if not p.is_absolute():
            p = (self.image_root or src.path.parent) / p
        if not p.is_file():
            raise _BadRow("missing image file", f"{col}: image file not found: {p}")
        return p

    def _parquet_value(self, si: int, local: int, col: str) -> Any:
        import pyarrow.parquet as pq

        src = self.sources[si]
        assert src.rg_offsets is not None
        rg = int(np.searchsorted(src.rg_offsets, local, side="right")) - 1
        key = (si, rg)
        group = self._rg_cache.get(key)
        if group is None:
            pf = self._pq_files.get(si)
            if pf is None:
                pf = self._pq_files[si] = pq.ParquetFile(src.path)
            group = pf.read_row_group(rg, columns=list(src.lazy_columns)).to_pydict()
            self._rg_cache[key] = group
            while len(self._rg_cache) > 2:
                self._rg_cache.popitem(last=False)
        else:
            self._rg_cache.move_to_end(key)
        return group[col][local - int(src.rg_offsets[rg])]

    def _load_image(self, p: int, k: int) -> torch.Tensor:
        si, local = self._src[p], self._local[p]
        src, col, ref = self.sources[si], IMAGE_COLUMNS[k], self._refs[p][k]
        where = src.where(local)
        try:
            data: Any = ref
            if ref is None:
                data = self._parquet_value(si, local, col)
                if isinstance(data, dict):  # the Hub's Image struct {"bytes": ..., "path": ...}
                    if data.get("bytes") is not None:
                        data = data["bytes"]
                    elif data.get("path"):
                        data = Path(data["path"])
                        if not data.is_absolute():
                            data = (self.image_root or src.path.parent) / data
                    else:
                        data = None
                if data is None:
                    raise PairDataError(f"{where}: {col} is null")
            return decode_image(data, target_side=self.resolution, min_side=self.min_image_side,
                                max_aspect_ratio=self.max_aspect_ratio)
        except PairDataError:
            raise
        except ImageSizeError as e:
            raise PairDataError(f"{where}: {col}: {e}") from e
        except FileNotFoundError as e:
            raise PairDataError(f"{where}: {col}: image file not found: {e.filename}") from e
        except Exception as e:
            raise PairDataError(f"{where}: {col}: cannot decode image ({type(e).__name__}: {e})") from e

    def _load_pair_images(self, p: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self._load_image(p, 0), self._load_image(p, 1)

    def __getstate__(self) -> dict[str, Any]:  # DataLoader workers: no open files, no cached groups
        state = self.__dict__.copy()
        state["_rg_cache"], state["_pq_files"] = OrderedDict(), {}
        return state

    # --- public -----------------------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self._item_pair.shape[0])

    def caption(self, i: int) -> str:
        """Caption of item ``i`` (no image decoding)."""
        return self._captions[int(self._item_pair[i])]

    def row(self, i: int) -> int:
        """Global 0-based source row of item ``i``."""
        return self._global[int(self._item_pair[i])]

    def where(self, i: int) -> str:
        """``"file: row r"`` for item ``i``."""
        p = int(self._item_pair[i])
        return self.sources[self._src[p]].where(self._local[p])

    def load(self, i: int) -> dict[str, Any]:
        """Item ``i``; raises :class:`PairDataError` for an unloadable image whatever ``on_bad_row``."""
        p = int(self._item_pair[i])
        a, b = self._load_pair_images(p)
        w, lo = (b, a) if self._item_swap[i] else (a, b)
        res = self.resolution
        w = resize_short_side(w, res, self.interpolation)
        lo = resize_short_side(lo, res, self.interpolation)
        draws = 1 if self.same_augment else 2
        pos = torch.rand(draws, 2).tolist() if self.random_crop else [[0.5, 0.5]] * draws
        flips = (torch.rand(draws) < 0.5).tolist() if self.random_flip else [False] * draws
        w = crop_flip(w, res, pos[0][0], pos[0][1], flips[0])
        lo = crop_flip(lo, res, pos[-1][0], pos[-1][1], flips[-1])
        return {
            "caption": self._captions[p],
            "pixels_w": w,
            "pixels_l": lo,
            "weight": float(self._item_weight[i]),
            "row": self._global[p],
        }

    def __getitem__(self, i: int) -> dict[str, Any]:
        if self.on_bad_row == "error":
            return self.load(i)
        n = len(self)
        for k in range(n):
            j = (i + k) % n
            try:
                return self.load(j)
            except PairDataError as e:
                self.load_skips += 1
                logger.warning("skipping unloadable pair (%d so far in this process): %s", self.load_skips, e)
        raise PairDataError(f"{self.path}: no loadable pair left")

    def options(self) -> dict[str, Any]:
        """The settings that decide which items exist and how they look (used for cache staleness)."""
        return {
            "resolution": self.resolution,
            "image_root": str(self.image_root) if self.image_root else None,
            "ties": self.ties,
            "on_bad_row": self.on_bad_row,
            "random_crop": self.random_crop,
            "random_flip": self.random_flip,
            "interpolation": self.interpolation,
            "check_images": self.check_images,
            "limit": self.limit,
            "max_caption_chars": self.max_caption_chars,
            "min_image_side": self.min_image_side,
            "max_aspect_ratio": self.max_aspect_ratio,
        }


class _LazyType:
    def __repr__(self) -> str:
        return "<lazy>"


_LAZY = _LazyType()


def collate_pairs(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Items of :class:`PreferencePairs` -> a pixel batch::

    {"captions": list[str], "pixels_w": [B,3,R,R], "pixels_l": [B,3,R,R], "weight": [B] float32,
     "rows": [B] int64}
    """
    return {
        "captions": [it["caption"] for it in items],
        "pixels_w": torch.stack([it["pixels_w"] for it in items]),
        "pixels_l": torch.stack([it["pixels_l"] for it in items]),
        "weight": torch.tensor([it["weight"] for it in items], dtype=torch.float32),
        "rows": torch.tensor([it["row"] for it in items], dtype=torch.int64),
    }
