"""User profiles: a user embedding plus where it came from, saved as one small safetensors file.

A profile file (``alice.profile``) is a safetensors file holding one tensor, ``embedding`` ``[D]``, and
its metadata as JSON in the header (``user_id``, ``encoder`` spec, ``pairs``: how many choices made it,
``source``: the pairs file, ``created``).

Mixing users: ``"alice.profile:0.7,bob.profile:0.3"`` is the weighted sum of their embeddings
(``mix_profiles``). Each part is ``PATH[:WEIGHT]`` (weight 1 when omitted); weights must be finite,
non-negative and sum to 1, and every profile must come from the same encoder. Errors name the part.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

FORMAT = "diffalign.profile"


class ProfileError(ValueError):
    """A profile file or profile spec that cannot be used; the message names the file or the part."""


@dataclass
class Profile:
    embedding: torch.Tensor  # [D], float32
    user_id: str = ""
    encoder: str = ""
    pairs: int = 0
    source: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def dim(self) -> int:
        return int(self.embedding.numel())

    def save(self, path: str | os.PathLike[str], overwrite: bool = False) -> Path:
        """Write the profile (atomically: a temporary file renamed into place)."""
        from safetensors.torch import save_file

        path = Path(path)
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} exists; choose a new file name (or pass overwrite)")
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"user_id": self.user_id, "encoder": self.encoder, "pairs": self.pairs, "source": self.source,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **self.extra}
        tmp = path.with_name(f".{path.name}.tmp")
        save_file({"embedding": self.embedding.detach().float().reshape(-1).contiguous().cpu()}, str(tmp),
                  metadata={"format": FORMAT, "profile": json.dumps(meta)})
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Profile:
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise ProfileError(f"{path}: no such profile file")
        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
                if meta.get("format") != FORMAT or "embedding" not in f.keys():
                    raise ProfileError(f"{path}: not a diffalign profile (format {meta.get('format')!r})")
                emb = f.get_tensor("embedding").float()
        except ProfileError:
            raise
        except Exception as e:  # noqa: BLE001  (safetensors' own errors)
            raise ProfileError(f"{path}: not a readable profile file ({e})") from None
        info = json.loads(meta.get("profile", "{}"))
        if emb.ndim != 1 or not torch.isfinite(emb).all():
            raise ProfileError(f"{path}: the embedding must be a finite vector, got shape {tuple(emb.shape)}")
        known = {k: info.pop(k) for k in ("user_id", "encoder", "pairs", "source") if k in info}
        return cls(embedding=emb, extra=info, **known)


def parse_spec(spec: str) -> list[tuple[str, float]]:
    """``"a.profile:0.7,b.profile:0.3"`` -> ``[("a.profile", 0.7), ("b.profile", 0.3)]`` (validated)."""
    if not spec or not spec.strip():
        raise ProfileError("empty profile spec; expected PATH or PATH:WEIGHT,PATH:WEIGHT")
    parts = []
    for raw in spec.split(","):
        part = raw.strip()
        if not part:
            raise ProfileError(f"profile spec {spec!r}: an empty part (two commas, or a trailing comma)")
        path, colon, w = part.rpartition(":")
        if not colon or os.sep in w or w.endswith(".profile"):  # no weight given (or a ':' inside the path)
            path, weight = part, 1.0
        else:
            try:
                weight = float(w)
            except ValueError:
                raise ProfileError(f"profile spec part {part!r}: weight {w!r} is not a number") from None
            if not path:
                raise ProfileError(f"profile spec part {part!r}: no profile path before ':'")
        if not math.isfinite(weight) or weight < 0:
            raise ProfileError(f"profile spec part {part!r}: weight {weight} must be finite and >= 0")
        parts.append((path, weight))
    total = sum(w for _, w in parts)
    if abs(total - 1.0) > 1e-6:
        raise ProfileError(
            f"profile spec {spec!r}: weights sum to {total:g}, not 1 "
            f"({', '.join(f'{p}:{w:g}' for p, w in parts)})"
        )
    return parts


def mix_profiles(spec: str) -> Profile:
    """Load and mix the profiles of a spec: ``sum_i w_i e_i`` (one profile: itself)."""
    parts = parse_spec(spec)
    loaded = []
    for path, w in parts:
        try:
            loaded.append((Profile.load(path), w, path))
        except ProfileError as e:
            raise ProfileError(f"profile spec part {path!r}: {e}") from None
    first, _, first_path = loaded[0]
    for prof, _, path in loaded[1:]:
        if prof.dim != first.dim or prof.encoder != first.encoder:
            raise ProfileError(
                f"profile spec part {path!r}: made with encoder {prof.encoder!r} (dim {prof.dim}), but "
                f"{first_path!r} with {first.encoder!r} (dim {first.dim}); profiles must share an encoder"
            )
    if len(loaded) == 1:
        return first
    emb = sum(w * p.embedding.double() for p, w, _ in loaded).float()
    return Profile(
        embedding=emb, user_id="+".join(f"{p.user_id or path}:{w:g}" for p, w, path in loaded),
        encoder=first.encoder, pairs=sum(p.pairs for p, _, _ in loaded), source=spec,
    )


def create_profile(
    encoder: Any, prompts: list[str], preferred: torch.Tensor, rejected: torch.Tensor, user_id: str = "",
    source: str = "", min_pairs: int = 1,
) -> Profile:
    """The profile of k choices (``preferred[i]`` chosen over ``rejected[i]`` for ``prompts[i]``)."""
    from .encoder import user_embedding

    if len(prompts) < min_pairs:
        where = f" in {source}" if source else ""
        raise ProfileError(f"user {user_id!r} has {len(prompts)} decided pairs{where}; at least {min_pairs} needed")
    emb = user_embedding(encoder, prompts, preferred, rejected)
    return Profile(embedding=emb, user_id=user_id, encoder=getattr(encoder, "name", ""), pairs=len(prompts),
                   source=source)
