"""Best-of-k by the oracle itself on the precise protocol: the level #12's reward-driven targets point at.

    OMP_NUM_THREADS=1 python scripts/bench_best_of.py --base diffalign/toyworld/base/sd --k 4 --out runs/best_of_sd

Sample i of the protocol (256 held-out prompts x 4 seeds by default) gets k candidates: candidate 0 is the
protocol's own sample (noise seed 1234, the base's evaluation sample), candidate j the same prompt from
noise seed 1234 + j; the reward (``--reward``, default ``toy_shape``) picks the best, and every oracle is
reported for the picked image, paired with the base sample (candidate 0) with a bootstrap 95% interval.
Per-candidate scores are cached under OUT/scores (with the base and protocol they belong to: a rerun with
another base or protocol into the same OUT is refused), so a rerun costs nothing; OUT/results.json holds the table.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import torch

ORACLES = ("toy_shape", "toy_color", "toy_position", "toy_oracle", "toy_aesthetic")


def pick_best(cands: list[dict[str, torch.Tensor]], by: str) -> dict[str, torch.Tensor]:
    """Per sample, every metric of the candidate with the highest ``by`` (the first on ties)."""
    key = torch.stack([c[by] for c in cands])  # [k, N]
    best = key.argmax(0)  # argmax returns the first maximal index
    return {m: torch.stack([c[m] for c in cands]).gather(0, best[None])[0] for m in cands[0] if m != "diversity"}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True, help="a toy base pipeline folder")
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--reward", default="toy_shape", choices=ORACLES)
    ap.add_argument("--eval-prompts", type=int, default=256)
    ap.add_argument("--eval-seeds", type=int, default=4)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    for flag in ("k", "eval_prompts", "eval_seeds"):
        if getattr(args, flag) < 1:
            ap.error(f"--{flag.replace('_', '-')} must be at least 1 (got {getattr(args, flag)})")
    if not (Path(args.base) / "model_index.json").is_file():
        ap.error(f"--base {args.base}: not a pipeline folder (no model_index.json)")
    torch.set_num_threads(1)
    from diffalign.backbones import load_backbone
    from diffalign.bench import precise
    from diffalign.bench.experiment import load_rewards

    rs = load_rewards(list(ORACLES))
    proto = precise.Protocol(prompts=args.eval_prompts, seeds=args.eval_seeds)
    out = Path(args.out)
    meta = {"base_dir": str(Path(args.base).resolve()), "protocol": proto.as_dict(), "metrics": sorted(rs)}
    meta_file = out / "scores" / "meta.json"
    if meta_file.is_file() and json.loads(meta_file.read_text()) != meta:
        ap.error(f"--out {out}: its cached candidate scores are for another base or protocol ({meta_file}); "
                 "choose a new --out")
    meta_file.parent.mkdir(parents=True, exist_ok=True)
    meta_file.write_text(json.dumps(meta))
    bb = None
    cands = []
    for j in range(args.k):
        path = out / "scores" / f"cand{j}.pt"
        if not path.is_file():
            bb = bb or load_backbone(args.base)
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(precise.sample_scores(bb, replace(proto, noise_seed=proto.noise_seed + j), rs, progress=True,
                                             desc=f"candidate {j}"), path)
        cands.append(torch.load(path, weights_only=True))
    best = pick_best(cands, args.reward)
    base = {m: v for m, v in cands[0].items() if m != "diversity"}
    res = {"base_dir": args.base, "k": args.k, "reward": args.reward, "protocol": proto.as_dict(),
           "base": precise.means(base), "best_of_k": precise.means(best), "gains": precise.gains(base, [best]),
           "by_scene": precise.gain_by_scene(base[args.reward], [best[args.reward]], proto)}
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(res, indent=1))
    print(f"best-of-{args.k} by {args.reward}, {proto.n} samples:")
    for m in base:
        print(f"  {m:<14} {res['base'][m]:.3f} -> {res['best_of_k'][m]:.3f}  {precise.fmt_gain(res['gains'][m])}")
    for k, g in res["by_scene"].items():
        print(f"  {args.reward} on {k} prompts (n={g['n']}): {precise.fmt_gain(g)}")
    return res


if __name__ == "__main__":
    main()
