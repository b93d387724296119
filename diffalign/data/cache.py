"""An on-disk cache of VAE latents and prompt conditionings for preference pairs.

Training from the cache skips the VAE encoder and the text encoders at every step. Layout::

    out_dir/meta.json                   what was cached, from what, and how far the build got
    out_dir/empty_cond.safetensors      the empty-prompt Cond (batch 1), for prompt dropout
    out_dir/shard-00000.safetensors     items [0, shard_size), then the next shard, ...

A shard holds, for its ``n`` cached items (an item whose image cannot be loaded under
``on_bad_row="skip"`` is left out and counted)::

    rows [n] int64  weight [n] float32  cond_index [n] int64 (into the shard's unique captions)
    latents_w_mean, latents_l_mean [n,C,h,w]   latents_w_std, latents_l_std [n,C,h,w]
    cond.<key> [u,...]                         one row per unique caption of the shard
    metadata "captions": JSON list of the n captions

Latents: the cache stores the *mean and std of the VAE posterior*, in the backbone's scaled (and
shifted) latent space, from ``backbone.encode_images_dist(images)``. :class:`CachedPairs` draws
``mean + std * randn`` each time an item is read (``sample=True``, default), which keeps the
official code's ``latent_dist.sample()`` stochasticity; ``sample=False`` gives the mean. A backbone
without ``encode_images_dist`` is cached as one posterior sample per item from
``encode_images(images, generator)`` with a fixed seed (``meta["latents"] == "sample"``; no std).

Conditioning: ``backbone.encode_prompts(captions, dropout=0.0)``; prompt dropout at train time
replaces rows by the stored empty-prompt Cond (``diffalign.backbones.base.apply_prompt_dropout``).

Flips: the cached view is deterministic, so build it from a dataset with ``random_crop=False`` and
``random_flip=False``. With ``flips=True`` (default; ``diffalign cache --no-flips`` turns it off) the
build also encodes the horizontally flipped images and stores their posterior as
``latents_{w,l}_{mean,std}_flip`` (twice the encoder work and the latent storage, as the caching
trainers that support flip augmentation do). ``CachedPairs(hflip=True)`` then picks, per item and
with probability 0.5, the latents *of the flipped images* for both images of the pair (a shared flip,
as ``PreferencePairs(same_augment=True)``). Latents themselves are never flipped: the VAE is not
flip-equivariant (on the toy VAE the flipped latents differ from the latents of the flipped image by
more than the latents' own RMS). ``hflip=True`` on a cache built without flips is a
:class:`CacheError` naming ``data.random_flip`` and ``data.cache_dir``.

Staleness: ``meta.json`` records each data file's size, mtime and a SHA-256 (of the whole file up
to 8 MiB, else of its first and last MiB, with the mtime then required to match too), the dataset
options, the backbone family, the model id and the storage settings. Resuming a build against
different inputs, or reading a cache whose data file has changed, is a :class:`StaleCacheError`.
Image files referenced by path are not fingerprinted.

Resume: shards are written atomically (temporary file, then ``os.replace``) and ``meta.json`` is
updated after each one, so a rerun of an interrupted build continues from the completed shards.
"""

from __future__ import annotations

import argparse
import bisect
import hashlib
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch.utils.data import DataLoader, Dataset

from .pairs import PairDataError, PreferencePairs, list_data_files

logger = logging.getLogger(__name__)

CACHE_FORMAT = "diffalign-pair-cache"
CACHE_VERSION = 1
META_FILE = "meta.json"
EMPTY_COND_FILE = "empty_cond.safetensors"
_FULL_HASH_LIMIT = 8 << 20
_PART = 1 << 20
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


class CacheError(RuntimeError):
    """The cache directory is unusable (incomplete, corrupt, or built for other inputs)."""


class StaleCacheError(CacheError):
    """The cache was built from other data or settings than the ones given now."""


def shard_name(k: int) -> str:
    return f"shard-{k:05d}.safetensors"


# --------------------------------------------------------------------------------------------------
# fingerprints
# --------------------------------------------------------------------------------------------------
def file_fingerprint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """``{"path", "size", "mtime_ns", "sha256", "hashed"}`` of one data file (see module docstring)."""
    p = Path(path).resolve()
    st = p.stat()
    h = hashlib.sha256()
    with open(p, "rb") as fh:
        if st.st_size <= _FULL_HASH_LIMIT:
            h.update(fh.read())
            hashed = "full"
        else:
            h.update(fh.read(_PART))
            fh.seek(st.st_size - _PART)
            h.update(fh.read(_PART))
            hashed = "head+tail"
    return {"path": str(p), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": h.hexdigest(), "hashed": hashed}


def data_fingerprint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Fingerprint of a preference data file or directory (every data file in it)."""
    return {"path": str(Path(path).resolve()), "files": [file_fingerprint(f) for f in list_data_files(path)]}


def fingerprint_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Human-readable differences between two data fingerprints; empty when they match."""
    out: list[str] = []
    a = {f["path"]: f for f in old.get("files", [])}
    b = {f["path"]: f for f in new.get("files", [])}
    for p in sorted(set(a) - set(b)):
        out.append(f"{p}: no longer part of the data")
    for p in sorted(set(b) - set(a)):
        out.append(f"{p}: new data file")
    for p in sorted(set(a) & set(b)):
        fa, fb = a[p], b[p]
        if fa["size"] != fb["size"]:
            out.append(f"{p}: size changed ({fa['size']} -> {fb['size']} bytes)")
        elif fa["sha256"] != fb["sha256"]:
            out.append(f"{p}: content changed")
        elif fa.get("hashed") != "full" and fa["mtime_ns"] != fb["mtime_ns"]:
            out.append(f"{p}: modified (mtime changed) and too large to hash in full")
    return out


# --------------------------------------------------------------------------------------------------
# small io helpers
# --------------------------------------------------------------------------------------------------
def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _write_json(path: Path, obj: Any) -> None:
    _atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def _read_meta(out_dir: Path) -> dict[str, Any]:
    f = out_dir / META_FILE
    try:
        meta = json.loads(f.read_text())
    except FileNotFoundError:
        raise CacheError(f"{out_dir}: not a latent cache ({META_FILE} missing); build one with `diffalign cache`") from None
    except (OSError, json.JSONDecodeError) as e:
        raise CacheError(f"{f}: unreadable cache metadata ({e})") from e
    if meta.get("format") != CACHE_FORMAT:
        raise CacheError(f"{f}: not a diffalign pair cache (format {meta.get('format')!r})")
    if meta.get("version") != CACHE_VERSION:
        raise CacheError(f"{f}: cache version {meta.get('version')} is not supported (expected {CACHE_VERSION}); rebuild it")
    return meta


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.to(dtype) if t.is_floating_point() else t


def _cond_class() -> Any:
    from diffalign.backbones.base import Cond

    return Cond


# --------------------------------------------------------------------------------------------------
# build
# --------------------------------------------------------------------------------------------------
class _Loadable(Dataset):
    """Items of a PreferencePairs, with an unloadable item returned as (index, message)."""

    def __init__(self, dataset: PreferencePairs, indices: range) -> None:
        self.dataset, self.indices = dataset, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int) -> Any:
        i = self.indices[k]
        try:
            return i, self.dataset.load(i)
        except PairDataError as e:
            if self.dataset.on_bad_row == "error":
                raise
            return i, str(e)


def _identity(
    dataset: PreferencePairs, backbone: Any, model_id: str | None, kind: str, dtype: str, shard_size: int, seed: int,
    flips: bool,
) -> dict[str, Any]:
    return {
        "flips": flips,
        "format": CACHE_FORMAT,
        "version": CACHE_VERSION,
        "family": str(getattr(backbone, "family", "unknown")),
        "model": model_id,
        "resolution": dataset.resolution,
        "latents": kind,
        "dtype": dtype,
        "shard_size": shard_size,
        "num_items": len(dataset),
        "seed": seed,
        "dataset": dataset.options(),
    }


def _identity_changes(old: dict[str, Any], new: dict[str, Any], data_new: dict[str, Any]) -> list[str]:
    out = [f"{k}: {old.get(k)!r} -> {v!r}" for k, v in new.items() if k != "dataset" and old.get(k) != v]
    od = old.get("dataset", {})
    out += [f"dataset.{k}: {od.get(k)!r} -> {v!r}" for k, v in new["dataset"].items() if od.get(k) != v]
    out += fingerprint_changes(old.get("data", {}), data_new)
    return out


def _shard_complete(path: Path, expect_items: int) -> int | None:
    """Number of cached rows of a valid shard file, else None."""
    try:
        with safe_open(str(path), framework="pt") as f:
            md = f.metadata() or {}
            if int(md.get("num_items", -1)) != expect_items:
                return None
            return int(md["n"])
    except (OSError, ValueError, KeyError, SafetensorError):
        return None


@torch.no_grad()
def build_cache(
    dataset: PreferencePairs,
    backbone: Any,
    out_dir: str | os.PathLike[str],
    batch_size: int = 8,
    progress: bool = True,
    *,
    shard_size: int = 1024,
    dtype: str = "float16",
    num_workers: int = 0,
    overwrite: bool = False,
    model_id: str | None = None,
    seed: int = 0,
    flips: bool = True,
) -> dict[str, Any]:
    """Encode every item of ``dataset`` with ``backbone`` into ``out_dir``; returns the final meta.

    ``flips=True`` also caches the latents of the horizontally flipped images (for ``random_flip``
    at train time; see the module docstring).

    Resumes from completed shards when ``out_dir`` holds a partial build for the same inputs; a
    cache for other inputs is a :class:`StaleCacheError` unless ``overwrite=True`` (which deletes
    its shards). ``dtype`` ("float16", "bfloat16", "float32") is the storage type of floating tensors.
    """
    if dataset.random_crop or dataset.random_flip:
        raise ValueError(
            "the cache stores one deterministic view of each pair: build it from a dataset with "
            "random_crop=False and random_flip=False (build_cache(flips=True) also caches the flipped images)"
        )
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
    if batch_size <= 0 or shard_size <= 0:
        raise ValueError("batch_size and shard_size must be positive")
    store = _DTYPES[dtype]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    kind = "dist" if hasattr(backbone, "encode_images_dist") else "sample"
    ident = _identity(dataset, backbone, model_id, kind, dtype, shard_size, seed, flips)
    data_fp = data_fingerprint(dataset.path)
    n_items = len(dataset)
    n_shards = (n_items + shard_size - 1) // shard_size

    for tmp in out.glob(".*.tmp-*"):  # leftovers of an interrupted write
        tmp.unlink(missing_ok=True)
    if (out / META_FILE).exists():
        old = json.loads((out / META_FILE).read_text())
        changes = _identity_changes(old, ident, data_fp)
        if changes:
            if not overwrite:
                raise StaleCacheError(
                    f"{out}: holds a cache built from other inputs; pass overwrite=True (--overwrite) "
                    f"to rebuild it. Differences: " + "; ".join(changes)
                )
            for f in out.glob("shard-*.safetensors"):
                f.unlink()
            (out / EMPTY_COND_FILE).unlink(missing_ok=True)
            (out / META_FILE).unlink()

    elif any(out.glob("shard-*.safetensors")) and not overwrite:
        raise StaleCacheError(
            f"{out}: holds cache shards but no {META_FILE}, so their inputs are unknown; "
            "pass overwrite=True (--overwrite) to rebuild"
        )
    elif overwrite:
        for f in out.glob("shard-*.safetensors"):
            f.unlink()
        (out / EMPTY_COND_FILE).unlink(missing_ok=True)

    meta: dict[str, Any] = dict(ident, data=data_fp, complete=False, num_shards=n_shards, shards=[])
    device = getattr(backbone, "device", torch.device("cpu"))

    if not (out / EMPTY_COND_FILE).exists():
        empty = backbone.encode_prompts([""], dropout=0.0)
        _save_tensors(out / EMPTY_COND_FILE, {k: _cast(v, store) for k, v in empty.tensors.items()})

    done: dict[int, int] = {}
    for k in range(n_shards):
        n = _shard_complete(out / shard_name(k), n_items)
        if n is not None:
            done[k] = n
    meta["shards"] = [{"file": shard_name(k), "n": done[k]} for k in sorted(done)]
    _write_json(out / META_FILE, meta)
    if done:
        logger.info("%s: resuming, %d of %d shard(s) already cached", out, len(done), n_shards)

    bar = None
    if progress:
        from tqdm.auto import tqdm

        initial = sum(min(shard_size, n_items - k * shard_size) for k in done)
        bar = tqdm(total=n_items, initial=initial, desc="caching latents", unit="pair", dynamic_ncols=True)
    skipped_total = 0
    try:
        for k in range(n_shards):
            if k in done:
                continue
            start, end = k * shard_size, min(n_items, (k + 1) * shard_size)
            loader = DataLoader(
                _Loadable(dataset, range(start, end)),
                batch_size=batch_size,
                num_workers=num_workers,
                collate_fn=list,
            )
            rows: list[int] = []
            weights: list[float] = []
            captions: list[str] = []
            lat: dict[str, list[torch.Tensor]] = {f"{a}_{b}{f}": [] for f in ("", "_flip")[: 1 + flips]
                                                  for a in "wl" for b in ("mean", "std")}
            skipped: list[str] = []
            for batch in loader:
                good = [it for _, it in batch if isinstance(it, dict)]
                skipped += [msg for _, msg in batch if not isinstance(msg, dict)]
                if good:
                    px = torch.cat([torch.stack([it["pixels_w"] for it in good]),
                                    torch.stack([it["pixels_l"] for it in good])]).to(device)
                    b = len(good)
                    views = [("", px), ("_flip", px.flip(-1))] if flips else [("", px)]
                    for suffix, images in views:  # the flipped images are encoded, never flipped latents
                        if kind == "dist":
                            mean, std = backbone.encode_images_dist(images)
                            lat["w_std" + suffix].append(_cast(std[:b].cpu(), store))
                            lat["l_std" + suffix].append(_cast(std[b:].cpu(), store))
                        else:
                            gen = torch.Generator().manual_seed(seed * 1_000_003 + batch[0][0] + (bool(suffix) << 40))
                            mean = backbone.encode_images(images, generator=gen)
                        lat["w_mean" + suffix].append(_cast(mean[:b].cpu(), store))
                        lat["l_mean" + suffix].append(_cast(mean[b:].cpu(), store))
                    rows += [it["row"] for it in good]
                    weights += [it["weight"] for it in good]
                    captions += [it["caption"] for it in good]
                if bar is not None:
                    bar.update(len(batch))
            for msg in skipped:
                logger.warning("cache: skipped unloadable pair: %s", msg)
            skipped_total += len(skipped)

            tensors: dict[str, torch.Tensor] = {
                "rows": torch.tensor(rows, dtype=torch.int64),
                "weight": torch.tensor(weights, dtype=torch.float32),
            }
            uniq = list(dict.fromkeys(captions))
            pos = {c: j for j, c in enumerate(uniq)}
            tensors["cond_index"] = torch.tensor([pos[c] for c in captions], dtype=torch.int64)
            for name, parts in lat.items():
                if parts:
                    tensors[f"latents_{name}"] = torch.cat(parts)
            if uniq:
                conds = [backbone.encode_prompts(uniq[j : j + batch_size], dropout=0.0)
                         for j in range(0, len(uniq), batch_size)]
                for key in conds[0].tensors:
                    tensors[f"cond.{key}"] = _cast(torch.cat([c.tensors[key].cpu() for c in conds]), store)
            md = {"n": str(len(rows)), "num_items": str(n_items), "start": str(start), "end": str(end),
                  "captions": json.dumps(captions), "skipped": json.dumps(skipped)}
            _save_tensors(out / shard_name(k), tensors, md)
            done[k] = len(rows)
            meta["shards"] = [{"file": shard_name(j), "n": done[j]} for j in sorted(done)]
            _write_json(out / META_FILE, meta)
    finally:
        if bar is not None:
            bar.close()

    meta["complete"] = True
    meta["num_rows"] = sum(done.values())
    meta["skipped"] = n_items - meta["num_rows"]
    _write_json(out / META_FILE, meta)
    if meta["skipped"]:
        logger.warning("%s: cached %d pair(s); skipped %d unloadable", out, meta["num_rows"], meta["skipped"])
    return meta


# --------------------------------------------------------------------------------------------------
# read
# --------------------------------------------------------------------------------------------------
class CachedPairs(Dataset):
    """Items of a latent cache built by :func:`build_cache`::

        {"caption": str, "latents_w": [C,h,w], "latents_l": [C,h,w], "cond": dict[str, Tensor]
         (no batch dim), "weight": float, "row": int}

    Args:
        cache_dir: the cache directory.
        sample: draw ``mean + std * randn`` (default) or return the posterior mean.
        hflip: with probability 0.5 per item, return the cached latents of the horizontally flipped
            images (both images of the pair); needs a cache built with ``flips=True``.
        check_stale: compare the data files with the fingerprint in ``meta.json`` (a changed file
            is a :class:`StaleCacheError`; a missing one only a warning).
        dtype: type of the returned floating tensors (default float32).
    """

    def __init__(
        self,
        cache_dir: str | os.PathLike[str],
        *,
        sample: bool = True,
        hflip: bool = False,
        check_stale: bool = True,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.dir = Path(cache_dir)
        self.meta = _read_meta(self.dir)
        self.sample, self.hflip, self.dtype = sample, hflip, dtype
        if hflip and not self.meta.get("flips"):
            raise CacheError(
                f"{self.dir}: this cache holds no latents of flipped images (built with --no-flips or by an older "
                "version), and flipping latents is not flipping images. Set data.random_flip: false to train from "
                "it as it is, or rebuild data.cache_dir with `diffalign cache ... --overwrite` (flips are cached "
                "by default)"
            )
        if not self.meta.get("complete"):
            raise CacheError(
                f"{self.dir}: cache is incomplete ({len(self.meta.get('shards', []))} of "
                f"{self.meta.get('num_shards')} shards); rerun `diffalign cache` to finish it"
            )
        if check_stale:
            data = self.meta.get("data", {})
            present = [f for f in data.get("files", []) if Path(f["path"]).is_file()]
            if len(present) < len(data.get("files", [])):
                logger.warning("%s: data file(s) of this cache not found; staleness not checked", self.dir)
            else:
                try:
                    now = data_fingerprint(data["path"])
                except PairDataError as e:
                    raise StaleCacheError(f"{self.dir}: cache data {data.get('path')} unreadable: {e}") from e
                changes = fingerprint_changes(data, now)
                if changes:
                    raise StaleCacheError(
                        f"{self.dir}: stale cache: its data changed since it was built ({'; '.join(changes)}); "
                        f"rebuild it with `diffalign cache ... --overwrite`"
                    )
        self.shards = [self.dir / s["file"] for s in self.meta["shards"]]
        for p in self.shards:
            if not p.is_file():
                raise CacheError(f"{p}: shard listed in {META_FILE} is missing")
        counts = [int(s["n"]) for s in self.meta["shards"]]
        self._ends: list[int] = []
        total = 0
        for c in counts:
            total += c
            self._ends.append(total)
        self._small: dict[int, dict[str, Any]] = {}
        self._handles: dict[int, Any] = {}
        empty_path = self.dir / EMPTY_COND_FILE
        if not empty_path.is_file():
            raise CacheError(f"{empty_path}: missing")
        with safe_open(str(empty_path), framework="pt") as f:
            names = list(f.keys())
            self._empty = {k: _cast(f.get_tensor(k), dtype) for k in names}

    @property
    def empty_cond(self) -> Any:
        """The empty-prompt ``Cond`` (batch 1) for prompt dropout."""
        return _cond_class()(dict(self._empty))

    @property
    def family(self) -> str:
        return str(self.meta["family"])

    @property
    def resolution(self) -> int:
        return int(self.meta["resolution"])

    def __len__(self) -> int:
        return self._ends[-1] if self._ends else 0

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_handles"] = {}
        return state

    def _locate(self, i: int) -> tuple[int, int]:
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for a cache of {len(self)} pairs")
        k = bisect.bisect_right(self._ends, i)
        return k, i - (self._ends[k - 1] if k else 0)

    def _handle(self, k: int) -> Any:
        h = self._handles.get(k)
        if h is None:
            h = self._handles[k] = safe_open(str(self.shards[k]), framework="pt")
            keys = set(h.keys())
            md = h.metadata() or {}
            self._small[k] = {
                "rows": h.get_tensor("rows").tolist(),
                "weight": h.get_tensor("weight").tolist(),
                "cond_index": h.get_tensor("cond_index").tolist(),
                "captions": json.loads(md.get("captions", "[]")),
                "cond_keys": sorted(n[5:] for n in keys if n.startswith("cond.")),
                "has_std": "latents_w_std" in keys,
                "has_flip": "latents_w_mean_flip" in keys,
            }
        return h

    def raw(self, i: int, flipped: bool = False) -> dict[str, Any]:
        """The stored tensors of pair ``i`` (means, stds when present, cond), no sampling; with
        ``flipped=True`` those of the flipped images (keys without the ``_flip`` suffix)."""
        k, j = self._locate(i)
        h = self._handle(k)
        s = self._small[k]
        if flipped and not s["has_flip"]:
            raise CacheError(f"{self.shards[k]}: holds no latents of flipped images")
        out: dict[str, Any] = {"caption": s["captions"][j], "weight": s["weight"][j], "row": s["rows"][j]}
        names = ["latents_w_mean", "latents_l_mean"] + (["latents_w_std", "latents_l_std"] if s["has_std"] else [])
        for n in names:
            out[n] = _cast(h.get_slice(n + "_flip" * flipped)[j : j + 1][0], self.dtype)
        ci = s["cond_index"][j]
        out["cond"] = {key: _cast(h.get_slice("cond." + key)[ci : ci + 1][0], self.dtype) for key in s["cond_keys"]}
        return out

    def __getitem__(self, i: int) -> dict[str, Any]:
        r = self.raw(i, flipped=self.hflip and bool(torch.rand(()) < 0.5))
        w, lo = r["latents_w_mean"], r["latents_l_mean"]
        if self.sample and "latents_w_std" in r:
            w = w + r["latents_w_std"] * torch.randn_like(w)
            lo = lo + r["latents_l_std"] * torch.randn_like(lo)
        return {"caption": r["caption"], "latents_w": w, "latents_l": lo, "cond": r["cond"],
                "weight": r["weight"], "row": r["row"]}


def collate_cached(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Items of :class:`CachedPairs` -> a cached batch::

    {"captions": list[str], "latents_w": [B,C,h,w], "latents_l": [B,C,h,w], "cond": Cond (batch B),
     "weight": [B] float32, "rows": [B] int64}
    """
    keys = items[0]["cond"].keys()
    return {
        "captions": [it["caption"] for it in items],
        "latents_w": torch.stack([it["latents_w"] for it in items]),
        "latents_l": torch.stack([it["latents_l"] for it in items]),
        "cond": _cond_class()({k: torch.stack([it["cond"][k] for it in items]) for k in keys}),
        "weight": torch.tensor([it["weight"] for it in items], dtype=torch.float32),
        "rows": torch.tensor([it["row"] for it in items], dtype=torch.int64),
    }


def is_cached_batch(batch: dict[str, Any]) -> bool:
    """True for a batch from :func:`collate_cached` (latents + cond), False for a pixel batch."""
    return "latents_w" in batch


# --------------------------------------------------------------------------------------------------
# CLI: diffalign cache
# --------------------------------------------------------------------------------------------------
def cache_main(args: argparse.Namespace) -> int:
    """``diffalign cache``: build (or resume) a latent cache; returns the exit status."""
    from diffalign.backbones import load_backbone

    try:
        list_data_files(args.data)  # fail fast on a bad --data, before loading the model
        backbone = load_backbone(args.model)
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        backbone.to(device)
        resolution = args.resolution or int(backbone.resolution)
        dataset = PreferencePairs(
            args.data,
            resolution,
            image_root=args.image_root,
            ties=args.ties,
            on_bad_row=args.on_bad_row,
            random_crop=False,
            random_flip=False,
            limit=args.limit,
        )
        meta = build_cache(
            dataset,
            backbone,
            args.out,
            args.batch_size,
            progress=not args.no_progress,
            shard_size=args.shard_size,
            dtype=args.dtype,
            num_workers=args.num_workers,
            overwrite=args.overwrite,
            model_id=str(Path(args.model).resolve()),
            flips=not args.no_flips,
        )
    except (PairDataError, CacheError) as e:
        print(f"diffalign cache: error: {e}", file=sys.stderr)
        return 2
    print(
        f"cached {meta['num_rows']} pair(s) ({meta['skipped']} skipped) of {args.data} at {resolution}px "
        f"for {meta['family']} in {args.out}"
    )
    return 0
