"""Gather the SePPO criterion ablation (scripts/bench_precise.py runs on one pair folder, one protocol) into
one table: every run's per-sample scores against the same base, paired bootstrap 95% intervals, and the
share of samples the criterion sent to the SFT-like term (first / last 100 training steps, from metrics.jsonl).

    python scripts/seppo_ablation_table.py --base-scores RUN/scores/base.pt \\
        --run "DPO (pairs)=RUN0/scores/dpo_seed0.pt" --run "SePPO anchor=RUN1/scores/seppo_anchor_seed0.pt" ... \\
        --out docs/results/seppo_ablation.json

A run's training log is looked up beside its scores (``RUN/<name>/metrics.jsonl`` for ``RUN/scores/<name>.pt``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

METRICS = ["toy_color", "toy_shape", "toy_position", "toy_oracle", "toy_aesthetic", "diversity"]


def sft_share(log: Path) -> list[float] | None:
    if not log.exists():
        return None
    rows = [json.loads(x) for x in log.read_text().splitlines() if x.strip()]
    rows = [r for r in rows if "sft_fraction" in r]
    if not rows:
        return None
    first = [r["sft_fraction"] for r in rows if r["step"] <= 100]
    last = [r["sft_fraction"] for r in rows if r["step"] > rows[-1]["step"] - 100]
    return [sum(first) / len(first), sum(last) / len(last)]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base-scores", required=True)
    ap.add_argument("--run", action="append", default=[], metavar="LABEL=SCORES.pt")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    from diffalign.bench import precise

    base = torch.load(args.base_scores, weights_only=True)
    rep = {"base": precise.means(base), "runs": {}}
    lines = ["| run | SFT-like share, first -> last 100 steps | " + " | ".join(METRICS) + " |",
             "|---|---|" + "---|" * len(METRICS),
             "| base (value) | - | " + " | ".join(f"{rep['base'][m]:.3f}" for m in METRICS) + " |"]
    for spec in args.run:
        label, path = spec.split("=", 1)
        p = Path(path)
        s = torch.load(p, weights_only=True)
        g = precise.gains(base, [s])
        share = sft_share(p.parent.parent / p.stem / "metrics.jsonl")
        rep["runs"][label] = {"scores": str(p), "sft_share_first_last100": share,
                              "gains": {m: {k: g[m][k] for k in ("mean", "low", "high", "n")} for m in METRICS}}
        sh = f"{share[0]:.2f} -> {share[1]:.2f}" if share else "-"
        lines.append(f"| {label} | {sh} | " + " | ".join(precise.fmt_gain(g[m]) for m in METRICS) + " |")
    rep["table"] = "\n".join(lines) + "\n"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rep, indent=2))
    print(rep["table"])
    return rep


if __name__ == "__main__":
    main()
