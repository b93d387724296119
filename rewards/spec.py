"""The one reward grammar, for every CLI flag and config key that names rewards.

    NAME                      a reward that needs no weights (toy_color, toy_shape, ...)
    NAME=PATH                 a reward with its local weights
    NAME[=PATH]:WEIGHT,...    several: a weighted ``Ensemble`` (weights default to 1)

``rewards.from_spec("pickscore=models/ps:1,hpsv2=models/hps.pt:0.5")``. A single member without a
weight is returned as itself, not wrapped. A ``:`` followed by something that is not a number belongs
to the path (``C:\\models``), not a weight.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .registry import load


@dataclass(frozen=True)
class Member:
    name: str
    path: str | None
    weight: float | None  # None: not given


def parse_spec(spec: str) -> list[Member]:
    """The members of ``spec``; an error names the offending part. Names may not repeat."""
    parts = [p.strip() for p in str(spec).split(",")]
    if not any(parts):
        raise ValueError(f"reward spec {spec!r}: empty (expected NAME, NAME=PATH or NAME[=PATH]:WEIGHT,...)")
    members: list[Member] = []
    for p in parts:
        if not p:
            raise ValueError(f"reward spec {spec!r}: an empty member (two commas in a row?)")
        head, sep, w = p.rpartition(":")
        try:
            weight = float(w) if sep else None
        except ValueError:  # a ':' inside a path, not a weight
            weight = None
        name, eq, path = (p if weight is None else head).partition("=")
        name, path = name.strip(), path.strip()
        if not name or (eq and not path):
            raise ValueError(f"reward spec {spec!r}: {p!r} is not NAME, NAME=PATH or NAME[=PATH]:WEIGHT")
        if any(m.name == name for m in members):
            raise ValueError(f"reward spec {spec!r}: {name!r} is given more than once")
        members.append(Member(name, path or None, weight))
    return members


def from_spec(spec: str, paths: dict[str, str | None] | None = None, options: dict[str, dict[str, Any]] | None = None,
              **ensemble_kwargs: Any) -> Any:
    """Build the reward(s) named by ``spec``. ``paths``: a default path per name, used when the spec
    gives none (e.g. ``{"toy_clip": clip_dir}``); ``options``: extra loader keyword arguments per name.
    ``ensemble_kwargs`` go to :class:`rewards.Ensemble` (normalisation, aggregation)."""
    from .ensemble import Ensemble

    members = parse_spec(spec)
    paths, options = paths or {}, options or {}
    unknown = set(options) - {m.name for m in members}
    if unknown:
        raise ValueError(f"reward options for {sorted(unknown)}, which the spec {spec!r} does not name")
    built = {m.name: load(m.name, path=m.path or paths.get(m.name), **options.get(m.name, {})) for m in members}
    if len(members) == 1 and members[0].weight is None and not ensemble_kwargs:
        return built[members[0].name]
    return Ensemble(built, {m.name: 1.0 if m.weight is None else m.weight for m in members}, **ensemble_kwargs)
