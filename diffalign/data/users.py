"""Multi-user preference pairs: each pair conditioned on its user's embedding from OTHER pairs of that user.

The data are Pick-a-Pic pairs (``diffalign.data.pairs``) with one more column, ``user_id`` (Pick-a-Pic
v2 has it). ``UserPairs`` wraps a ``PreferencePairs`` data set; for the item of pair ``i`` of user ``u``
it draws ``k`` other pairs of ``u`` (never ``i`` itself), pools their per-pair encoder vectors into the
user embedding (``personalization.encoder.pool``: mean, unit norm) and, with probability
``embedding_dropout``, replaces it by zeros (PPD's embedding dropout; the zero embedding becomes the
"any user" condition). The per-pair vectors are computed once, up front, with the user encoder.

Item: the ``PreferencePairs`` item plus ``"user_embedding"`` ``[D]`` and ``"user_id"``.
Batch (``collate_user_pairs``): ``collate_pairs``' batch plus ``"cond_extra": {"user_embedding": [B, D]}``
(conditioning tensors the training batch adds to its ``Cond``) and ``"user_ids"``.

A user with fewer than ``k + 1`` pairs cannot be conditioned on ``k`` other pairs: a ``UserDataError``
naming the user and the file (``on_few_pairs="skip"`` drops that user's pairs instead, with a warning).
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from pathlib import Path
from typing import Any, Literal

import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from .pairs import PairDataError, PreferencePairs, collate_pairs, list_data_files

logger = logging.getLogger(__name__)


class UserDataError(PairDataError):
    """Multi-user data that cannot be used; the message names the file and the user (or row)."""


def read_user_ids(path: str | Path) -> list[str]:
    """The ``user_id`` of every source row, in ``PreferencePairs``' global row order (blank lines skipped)."""
    out: list[str] = []
    for f in list_data_files(path):
        if f.suffix.lower() == ".parquet":
            import pyarrow.parquet as pq

            schema = pq.read_schema(f)
            if "user_id" not in schema.names:
                raise UserDataError(f"{f}: no user_id column (multi-user pairs need one, as Pick-a-Pic v2 has)")
            col = pq.read_table(f, columns=["user_id"]).column("user_id").to_pylist()
            for r, v in enumerate(col):
                if v is None or str(v) == "":
                    raise UserDataError(f"{f}: row {r}: empty user_id")
                out.append(str(v))
            continue
        with open(f, encoding="utf-8") as fh:
            r = 0
            for ln, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserDataError(f"{f}: row {r} (line {ln}): not valid JSON ({e.msg})") from None
                v = rec.get("user_id") if isinstance(rec, dict) else None
                if v is None or str(v) == "":
                    raise UserDataError(f"{f}: row {r} (line {ln}): no user_id")
                out.append(str(v))
                r += 1
    return out


@torch.no_grad()
def pair_vectors(pairs: PreferencePairs, encoder: Any, batch_size: int = 64, progress: bool = True) -> dict[int, torch.Tensor]:
    """Per source row: the encoder's vector of (caption, winner, loser) (``encode_triples``)."""
    seen: dict[int, int] = {}
    for i in range(len(pairs)):
        row = int(pairs._global[pairs._item_pair[i]]) if hasattr(pairs, "_item_pair") else None
        if row is not None and row not in seen:
            seen[row] = i
    if not seen:  # no internals to peek at: load every item
        for i in range(len(pairs)):
            seen.setdefault(int(pairs[i]["row"]), i)
    out: dict[int, torch.Tensor] = {}
    rows = list(seen.items())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # a fixed view of each pair if the data set augments
        for s in tqdm(range(0, len(rows), batch_size), desc="user encoder", disable=not progress, leave=False):
            chunk = [pairs[i] for _, i in rows[s:s + batch_size]]
            caps = [it["caption"] for it in chunk]
            w = torch.stack([it["pixels_w"] for it in chunk])
            lose = torch.stack([it["pixels_l"] for it in chunk])
            g = encoder.encode_triples(caps, w, lose).float().cpu()
            for it, v in zip(chunk, g, strict=True):
                out[int(it["row"])] = v
    return out


class UserPairs(Dataset):
    """``PreferencePairs`` items conditioned on their user's k-shot embedding (see the module docstring)."""

    def __init__(
        self,
        pairs: PreferencePairs,
        encoder: Any | None = None,
        k: int = 4,
        embedding_dropout: float = 0.1,
        on_few_pairs: Literal["error", "skip"] = "error",
        vectors: dict[int, torch.Tensor] | None = None,
        user_ids: list[str] | None = None,
        progress: bool = True,
    ) -> None:
        if k < 1:
            raise ValueError(f"k (pairs per user embedding) must be >= 1, got {k}")
        if not 0.0 <= embedding_dropout < 1.0:
            raise ValueError(f"embedding_dropout must be in [0, 1), got {embedding_dropout}")
        if on_few_pairs not in ("error", "skip"):
            raise ValueError(f"on_few_pairs must be 'error' or 'skip', got {on_few_pairs!r}")
        self.pairs, self.k, self.embedding_dropout = pairs, k, embedding_dropout
        self.source = Path(pairs.path)
        self.user_of = user_ids if user_ids is not None else read_user_ids(pairs.path)
        item_rows = [self._row(i) for i in range(len(pairs))]
        rows_by_user: dict[str, set[int]] = defaultdict(set)
        for row in item_rows:
            if row >= len(self.user_of):
                raise UserDataError(f"{self.source}: row {row} has no user_id")
            rows_by_user[self.user_of[row]].add(row)
        few = {u: len(r) for u, r in rows_by_user.items() if len(r) < k + 1}
        if few:
            names = ", ".join(f"{u!r} ({n})" for u, n in sorted(few.items())[:10])
            msg = (f"{self.source}: {len(few)} user(s) with fewer than {k + 1} usable pairs (k={k} others to embed "
                   f"each pair + the pair itself): {names}")
            if on_few_pairs == "error":
                raise UserDataError(msg + " (lower k, or on_few_pairs='skip')")
            logger.warning("%s; their pairs are skipped", msg)
        self.items = [i for i, row in enumerate(item_rows) if self.user_of[row] not in few]
        if not self.items:
            raise UserDataError(f"{self.source}: no user has {k + 1} or more pairs")
        self.rows_by_user = {u: sorted(r) for u, r in rows_by_user.items() if u not in few}
        self.users = sorted(self.rows_by_user)
        if vectors is None:
            if encoder is None:
                raise ValueError("UserPairs needs a user encoder (or precomputed per-pair vectors)")
            vectors = pair_vectors(pairs, encoder, progress=progress)
        self.vectors = vectors
        self._item_rows = item_rows
        self.dim = int(next(iter(vectors.values())).numel())

    def _row(self, i: int) -> int:
        p = self.pairs
        if hasattr(p, "_item_pair") and hasattr(p, "_global"):
            return int(p._global[p._item_pair[i]])
        return int(p[i]["row"])

    def __len__(self) -> int:
        return len(self.items)

    def embedding_for(self, row: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """The user embedding for the pair at source ``row``: ``k`` other pairs of its user, pooled."""
        from ..personalization.encoder import pool

        others = [r for r in self.rows_by_user[self.user_of[row]] if r != row]
        pick = torch.randperm(len(others), generator=generator)[: self.k].tolist()
        return pool(torch.stack([self.vectors[others[j]] for j in pick]))

    def __getitem__(self, i: int) -> dict[str, Any]:
        j = self.items[i]
        item = dict(self.pairs[j])
        row = self._item_rows[j]
        emb = self.embedding_for(row)
        if self.embedding_dropout > 0 and float(torch.rand(())) < self.embedding_dropout:
            emb = torch.zeros_like(emb)
        item["user_embedding"] = emb
        item["user_id"] = self.user_of[row]
        return item

    def report(self) -> dict[str, Any]:
        return {"users": len(self.users), "pairs": len(self.items), "k": self.k,
                "embedding_dropout": self.embedding_dropout, "dim": self.dim}


def collate_user_pairs(items: list[dict[str, Any]]) -> dict[str, Any]:
    batch = collate_pairs(items)
    batch["cond_extra"] = {"user_embedding": torch.stack([it["user_embedding"] for it in items])}
    batch["user_ids"] = [it["user_id"] for it in items]
    return batch


def user_choices(path: str | Path, user_id: str, resolution: int, min_pairs: int = 1) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """One user's decided pairs as (prompts, preferred ``[k,3,R,R]``, rejected): what a profile is made of."""
    ds = PreferencePairs(path, resolution=resolution, ties="drop", random_flip=False)
    users = read_user_ids(path)
    items = [ds[i] for i in range(len(ds)) if users[int(ds._global[ds._item_pair[i]])] == user_id]
    if len(items) < min_pairs:
        known = sorted(set(users))
        hint = f"; users in the file: {', '.join(known[:10])}{' ...' if len(known) > 10 else ''}"
        raise UserDataError(f"{path}: user {user_id!r} has {len(items)} decided pairs, at least {min_pairs} "
                            f"needed{hint if not items else ''}")
    return ([it["caption"] for it in items], torch.stack([it["pixels_w"] for it in items]),
            torch.stack([it["pixels_l"] for it in items]))


def choices_by_user(path: str | Path, resolution: int) -> dict[str, tuple[list[str], torch.Tensor, torch.Tensor]]:
    """Every user's decided pairs at once: ``{user_id: (prompts, preferred, rejected)}`` (file order)."""
    ds = PreferencePairs(path, resolution=resolution, ties="drop", random_flip=False)
    users = read_user_ids(path)
    grouped: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for i in range(len(ds)):
        it = ds[i]
        grouped[users[int(it["row"])]].append(it)
    return {u: ([it["caption"] for it in items], torch.stack([it["pixels_w"] for it in items]),
                torch.stack([it["pixels_l"] for it in items])) for u, items in grouped.items()}
