"""Pool the held-out scores of runs made apart (e.g. seed 0 in one --out folder, seeds 1-2 in another) into one
paired interval per metric, as ``scripts/bench_online_rl.py`` does for the seeds of one run
(``diffalign.bench.precise.gains``: the bootstrap interval of the seed-averaged per-sample differences from the
base, and the spread of the seeds' gains beside it).

    python scripts/pool_seeds.py --base runs/o15/rf4_refl/scores/base_sd_256x4.pt \
        --run runs/o15/rf4_refl/refl_seed0 --run runs/o16/rf4_refl/refl_seed1 --run runs/o16/rf4_refl/refl_seed2

Each ``--run`` folder holds the ``scores.pt`` that ``scripts/bench_online_rl.py`` writes (a dict metric -> [N]).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from diffalign.bench.precise import fmt_gain, gains


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", required=True, help="the base model's scores.pt on the same protocol")
    p.add_argument("--run", action="append", required=True, help="a run folder with scores.pt (give each)")
    p.add_argument("--metrics", default="toy_shape_soft,toy_shape,toy_color,toy_position,toy_oracle,toy_aesthetic")
    a = p.parse_args(argv)
    base = torch.load(a.base, weights_only=True)
    runs = []
    for r in a.run:
        f = Path(r) / "scores.pt"
        if not f.is_file():
            p.error(f"--run {r}: no scores.pt there")
        runs.append(torch.load(f, weights_only=True))
    wanted = a.metrics.split(",")
    for m in wanted:
        if m not in base or any(m not in s for s in runs):
            print(f"{m}: not in every score file, left out")
        elif any(s[m].shape != base[m].shape for s in runs):
            p.error(f"{m}: a run has {[tuple(s[m].shape) for s in runs]} samples, the base {tuple(base[m].shape)}")
    pooled = gains({m: base[m] for m in wanted if m in base}, runs)
    for m, g in pooled.items():
        print(f"{m}: {fmt_gain(g)} (per run {', '.join(f'{x:+.3f}' for x in g['per_seed'])})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
