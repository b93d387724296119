"""The curves of ``scripts/bench_online_rl.py`` runs side by side: each metric's change from the base against
the run's training CPU minutes, one panel per metric, one line per run (the training reward beside the gold
oracles shows when reward hacking starts; an early-stopped run ends where it stopped).

    python scripts/plot_online_curves.py --run "no KL=runs/o12/hack_kl0" --run "KL 1e-2=runs/o12/hack_kl" \\
        --metrics toy_aesthetic,toy_oracle,toy_shape --out docs/results/online_hacking.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def load_runs(specs: list[str], error) -> dict[str, dict]:
    runs = {}
    for spec in specs:
        name, sep, folder = spec.partition("=")
        path = Path(folder) / "results.jsonl"
        if not sep or not path.is_file():
            error(f"--run {spec!r}: expected NAME=FOLDER with FOLDER/results.jsonl")
        rows = [json.loads(line) for line in path.read_text().splitlines() if line]
        if not rows or not rows[-1].get("curve"):
            error(f"--run {spec!r}: the run has no curve (run bench_online_rl.py with --curve-every-min)")
        runs[name] = rows[-1]
    return runs


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", action="append", default=[], help="NAME=FOLDER of a bench_online_rl.py run")
    ap.add_argument("--metrics", required=True, help="comma-separated curve metrics")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    if not args.run:
        ap.error("--run: give at least one run")
    runs = load_runs(args.run, ap.error)
    metrics = [m for m in args.metrics.split(",") if m]
    for name, r in runs.items():
        missing = [m for m in metrics if m not in r["curve"][0]]
        if missing:
            ap.error(f"--metrics: run {name!r} has no curve of {', '.join(missing)} (it has {', '.join(sorted(r['curve'][0]))})")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.6), squeeze=False)
    for ax, m in zip(axes[0], metrics, strict=True):
        for i, (name, r) in enumerate(runs.items()):
            c = r["curve"]
            ax.plot([p["cpu_min"] for p in c], [p[m] - c[0][m] for p in c], ".-", color=f"C{i}", label=name)
            if r.get("early_stopped"):
                kept = next(p for p in c if p["step"] == r["kept_step"])
                ax.plot([kept["cpu_min"]], [kept[m] - c[0][m]], "o", mfc="none", ms=10, color=f"C{i}")
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_title(f"{m} ({'training reward' if m == next(iter(runs.values()))['reward'] else 'gold'})")
        ax.set_xlabel("training CPU minutes")
        ax.set_ylabel("change from the base (held-out)")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
