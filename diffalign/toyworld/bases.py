"""Where the toy base models are: a folder given, else runs/toyworld_base (``diffalign toyworld build``),
else the copy shipped in the package."""

from __future__ import annotations

from pathlib import Path

DEFAULT_BASE = Path("runs/toyworld_base")


def find_base(base: str | Path | None = None) -> Path:
    """The toy base folder: the given one, else runs/toyworld_base, else the copy shipped in the package."""
    for cand in [base, DEFAULT_BASE, Path(__file__).parent / "base"]:
        if cand and (Path(cand) / "sd" / "model_index.json").is_file():
            return Path(cand)
    raise FileNotFoundError(
        f"no toy base found ({base or DEFAULT_BASE}); build it with `diffalign toyworld build --out {DEFAULT_BASE}`"
    )
