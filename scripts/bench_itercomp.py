"""IterComp's loop in the toy world over several seeds (diffalign/toyworld/itercomp.py), with intervals.

Each seed is one ``run_itercomp`` into ``OUT/seed{S}`` (its own train prompts, gallery noise, heads'
initialisation and policy training seed); the held-out evaluation protocol (``--eval-prompts`` x
``--eval-seeds``) is the same for every seed and round, so every round's per-sample oracle scores are
paired with the base's (round 0) on the same starting noise. The base's scores and images are computed
once and copied into the other seeds' folders. Every stage is cached, so a rerun continues where it
stopped. Report: ``OUT/itercomp_seeds.json`` and ``OUT/itercomp_seeds.md``.

    OMP_NUM_THREADS=1 python scripts/bench_itercomp.py configs/toy_itercomp.yaml --seeds 0,1,2 --rounds 3 \\
        --out runs/itercomp3
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path
from typing import Any

import torch

KEYS = ["toy_shape", "toy_position", "toy_count", "composition"]
HEADS = ["attribute", "spatial", "count"]


def _cell(g: dict[str, Any]) -> str:
    return f"{g['mean']:+.3f} [{g['low']:+.3f}, {g['high']:+.3f}]"


def aggregate(out: Path, seeds: list[int], rounds: int, boot: int = 2000) -> dict[str, Any]:
    from diffalign.bench import precise

    base = torch.load(out / f"seed{seeds[0]}" / "base_eval.pt", weights_only=True)
    rep: dict[str, Any] = {"seeds": seeds, "base": precise.means(base), "n_eval": int(base["composition"].numel()),
                           "rounds": []}
    for r in range(1, rounds + 1):
        runs, per_seed = [], []
        for s in seeds:
            rd = out / f"seed{s}" / f"round_{r}"
            if not (rd / "round.json").exists():
                return rep
            runs.append(torch.load(rd / "eval.pt", weights_only=True))
            per_seed.append(json.loads((rd / "round.json").read_text()))
        g = precise.gains(base, runs, n_boot=boot)
        acc = {w: {h: [ps["heads_accuracy"][w][h] for ps in per_seed] for h in HEADS} for w in ("before", "after")}
        rep["rounds"].append({
            "round": r,
            "policy": {k: sum(precise.means(x)[k] for x in runs) / len(runs) for k in KEYS},
            "gain_vs_base": {k: g[k] for k in KEYS},
            "heads_accuracy": {w: {h: sum(v) / len(v) for h, v in acc[w].items()} for w in acc},
            "heads_accuracy_per_seed": acc,
            "heads_reward_gain_per_seed": [ps.get("heads_reward_gain") for ps in per_seed],
            "pairs_per_seed": [ps["heads_accuracy"].get("pairs") for ps in per_seed],
        })
    return rep


def table(rep: dict[str, Any]) -> str:
    n = len(rep["seeds"])
    lines = [f"| round | shape (attribute) | position (spatial) | count | composition (mean) | heads' ranking acc. "
             f"before -> after refinement (attribute / spatial / count), mean of {n} seeds | heads' reward on held-out, "
             "gain over the base (per seed) |", "|---|---|---|---|---|---|---|",
             "| 0 (base) | " + " | ".join(f"{rep['base'][k]:.3f}" for k in KEYS) + " | - | - |"]
    for rr in rep["rounds"]:
        cells = [f"{rr['policy'][k]:.3f} ({_cell(rr['gain_vs_base'][k])} ±{rr['gain_vs_base'][k]['seed_std']:.3f})"
                 for k in KEYS]
        a = rr["heads_accuracy"]
        accs = " / ".join(f"{a['before'][h]:.2f} -> {a['after'][h]:.2f}" for h in HEADS)
        hr = ", ".join(_cell(x) if x else "-" for x in rr["heads_reward_gain_per_seed"])
        lines.append(f"| {rr['round']} | " + " | ".join(cells) + f" | {accs} | {hr} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", help="a reward-feedback config (configs/toy_itercomp.yaml)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--gallery-prompts", type=int, default=192)
    ap.add_argument("--samples-per-model", type=int, default=4)
    ap.add_argument("--heads-eval-prompts", type=int, default=64)
    ap.add_argument("--refine-steps", type=int, default=100)
    ap.add_argument("--pairs-per-step", type=int, default=128)
    ap.add_argument("--eval-prompts", type=int, default=256)
    ap.add_argument("--eval-seeds", type=int, default=4)
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="config override, e.g. train.lr=3e-4 (repeatable)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    from diffalign.config import load_config
    from diffalign.toyworld.itercomp import IterCompSettings, run_itercomp

    overrides = []
    for kv in args.set:
        k, v = kv.split("=", 1)
        overrides += [f"--{k}", v]
    cfg = load_config(args.config, overrides)
    out = Path(args.out)
    seeds = [int(x) for x in args.seeds.split(",")]
    t0 = time.time()
    for s in seeds:
        d = out / f"seed{s}"
        d.mkdir(parents=True, exist_ok=True)
        first = out / f"seed{seeds[0]}"
        for f in ("base_eval.pt", "base_eval.images.pt"):  # same protocol, same noise: computed once
            if s != seeds[0] and (first / f).exists() and not (d / f).exists():
                shutil.copy(first / f, d / f)
        st = IterCompSettings(gallery_prompts=args.gallery_prompts, samples_per_model=args.samples_per_model,
                              eval_prompts_heads=args.heads_eval_prompts, refine_steps=args.refine_steps,
                              pairs_per_step=args.pairs_per_step, eval_prompts=args.eval_prompts,
                              eval_seeds=args.eval_seeds, seed=s)
        t = time.time()
        run_itercomp(cfg, args.rounds, d, st)
        print(f"seed {s}: {(time.time() - t) / 60:.1f} min", flush=True)
        rep = aggregate(out, seeds[: seeds.index(s) + 1], args.rounds)
        (out / "itercomp_seeds.json").write_text(json.dumps(rep, indent=2))
    rep = aggregate(out, seeds, args.rounds)
    rep["wall_minutes_this_call"] = (time.time() - t0) / 60
    (out / "itercomp_seeds.json").write_text(json.dumps(rep, indent=2))
    (out / "itercomp_seeds.md").write_text(table(rep))
    print(table(rep))
    return rep


if __name__ == "__main__":
    main()
