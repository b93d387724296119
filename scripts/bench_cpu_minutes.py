"""Diffusion-DPO beside the online methods at equal CPU minutes: the target's gain against the CPU minutes
spent, from the curves the two benchmark scripts already scored, with DPO's cost measured here.

    OMP_NUM_THREADS=1 python scripts/bench_cpu_minutes.py --precise runs/precise_sd \\
        --online nft=runs/o12/nft --online grpo=runs/o12/grpo --out docs/results/cpu_minutes

DPO's curve comes from ``scripts/bench_precise.py --curve dpo`` (its checkpoints scored on the curve protocol,
64 held-out prompts x 4 seeds, cached under ``PRECISE/scores/curve``); its x-axis is CPU minutes =
(the pair sample's cost + step x the cost of one training step), both measured by this script on this
machine with ``time.process_time`` (one thread): ``--cost-steps`` DPO steps through ``diffalign.training.train``
on the same pairs and settings (batch 16, LoRA rank 8, lr 1e-3), and ``--cost-prompts`` prompts x k images
sampled and labelled as the pairs were (20 steps, CFG 5), scaled to the pair sample's size. The online curves
come from ``scripts/bench_online_rl.py --curve-every-min`` (the same curve protocol; their x-axis already is
their training CPU, rollouts included). DPO's costs are kept in OUT.costs.json with the setting they were measured
in, and reused by a rerun with the same base, pairs and measurement sizes (otherwise measured again). Writes OUT.json and OUT.png (gain and its 95% band for DPO, per-seed
lines for the online runs).
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile
import time
from pathlib import Path

import torch


def dpo_costs(base: Path, pairs: Path, cost_steps: int, cost_prompts: int, k: int) -> dict[str, float]:
    from diffalign.backbones import load_backbone
    from diffalign.bench.alignment import run_config
    from diffalign.bench.experiment import load_rewards
    from diffalign.toyworld.pairs import make_pairs
    from diffalign.toyworld.shapes import prompts
    from diffalign.training import train

    with tempfile.TemporaryDirectory() as tmp:
        cfg = run_config(base, pairs / "pairs.jsonl", Path(tmp) / "dpo", "dpo", seed=0, steps=cost_steps)
        cfg.train.progress = False
        c = time.process_time()
        train(cfg)
        step_s = (time.process_time() - c) / cost_steps
        reward = load_rewards(["toy_shape"])["toy_shape"]
        c = time.process_time()
        bb = load_backbone(base)
        make_pairs(bb, prompts("train", n=cost_prompts, seed=99), reward, Path(tmp) / "pairs", k=k, seed=0,
                   progress=False)
        prompt_s = (time.process_time() - c) / cost_prompts
    return {"step_cpu_s": step_s, "pair_prompt_cpu_s": prompt_s}


def dpo_curve(precise_dir: Path, target: str) -> dict[int, list[torch.Tensor]]:
    """step -> per-seed per-sample target scores of DPO's checkpoints (step 0: the base)."""
    curve_dir = precise_dir / "scores" / "curve"
    out: dict[int, list[torch.Tensor]] = {}
    for f in curve_dir.glob("dpo_seed*_step*.pt"):
        m = re.fullmatch(r"dpo_seed(\d+)_step(\d+)\.pt", f.name)
        if m:
            out.setdefault(int(m.group(2)), []).append(torch.load(f, weights_only=True)[target])
    if not out:
        raise SystemExit(f"--precise: no DPO curve under {curve_dir} (run bench_precise.py with --curve dpo)")
    base = torch.load(curve_dir / "base.pt", weights_only=True)[target]
    out[0] = [base]
    return dict(sorted(out.items()))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--precise", required=True, help="a bench_precise.py output folder with DPO's curve")
    ap.add_argument("--base", default="diffalign/toyworld/base/sd")
    ap.add_argument("--online", action="append", default=[], help="NAME=FOLDER of a bench_online_rl.py run")
    ap.add_argument("--target", default="toy_shape")
    ap.add_argument("--cost-steps", type=int, default=40)
    ap.add_argument("--cost-prompts", type=int, default=64)
    ap.add_argument("--out", required=True, help="OUT.json and OUT.png are written")
    args = ap.parse_args(argv)
    for flag in ("cost_steps", "cost_prompts"):
        if getattr(args, flag) < 1:
            ap.error(f"--{flag.replace('_', '-')} must be at least 1 (got {getattr(args, flag)})")
    online: dict[str, list[dict]] = {}
    folders: dict[str, list[Path]] = {}
    for spec in args.online:
        name, sep, folder = spec.partition("=")
        if not sep or not (Path(folder) / "results.jsonl").is_file():
            ap.error(f"--online {spec!r}: expected NAME=FOLDER with FOLDER/results.jsonl")
        rows = [json.loads(line) for line in (Path(folder) / "results.jsonl").read_text().splitlines() if line]
        online.setdefault(name, []).extend(rows)  # a NAME given twice: its runs pooled (e.g. seeds run apart)
        folders.setdefault(name, []).extend(Path(folder) / f"{r['method']}_seed{r['seed']}" for r in rows)
    torch.set_num_threads(1)
    from diffalign.bench import precise

    precise_dir = Path(args.precise)
    meta = json.loads((precise_dir / "pairs" / "pairs_meta.json").read_text())
    # measured once per setting; reused only for the same base, pairs and measurement sizes
    cost_file = Path(args.out).with_suffix(".costs.json")
    setting = {"base": str(Path(args.base).resolve()), "pairs": str((precise_dir / "pairs").resolve()),
               "cost_steps": args.cost_steps, "cost_prompts": args.cost_prompts}
    cached = json.loads(cost_file.read_text()) if cost_file.is_file() else {}
    if cached.get("setting") == setting:
        costs = {k: cached[k] for k in ("step_cpu_s", "pair_prompt_cpu_s")}
    else:
        costs = dpo_costs(Path(args.base), precise_dir / "pairs", args.cost_steps, args.cost_prompts, int(meta["k"]))
        cost_file.parent.mkdir(parents=True, exist_ok=True)
        cost_file.write_text(json.dumps({**costs, "setting": setting}, indent=1))
    pair_min = costs["pair_prompt_cpu_s"] * meta["pairs"] / 60
    curve = dpo_curve(precise_dir, args.target)
    base = curve[0][0]
    dpo = []
    for step, runs in curve.items():
        g = precise.gain(base, runs) if step else {"mean": 0.0, "low": 0.0, "high": 0.0}
        cpu = 0.0 if step == 0 else pair_min + step * costs["step_cpu_s"] / 60
        dpo.append({"step": step, "cpu_min": cpu, "gain": g["mean"], "low": g["low"], "high": g["high"]})
    res = {"target": args.target, "dpo_costs": costs, "dpo_pair_sample_cpu_min": pair_min, "dpo": dpo,
           "online": {n: [{"seed": r["seed"], "curve": [{"cpu_min": p["cpu_min"], "gain": p[args.target] - r["curve"][0][args.target]}
                                                          for p in r["curve"]],
                           "final_gain": r["gains"][args.target]} for r in rs] for n, rs in online.items()}}
    res["final"] = final_table(precise_dir, folders)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=1))
    plot(res, out.with_suffix(".png"))
    print(f"DPO: pair sample {pair_min:.2f} CPU min ({meta['pairs']} prompts x {meta['k']}), "
          f"{costs['step_cpu_s']:.3f} CPU s per step")
    for p in dpo:
        print(f"  dpo step {p['step']:4d}  {p['cpu_min']:6.2f} CPU min  gain {p['gain']:+.3f} [{p['low']:+.3f}, {p['high']:+.3f}]")
    for n, f in res["final"].items():
        print(f"{n} ({f['seeds']} seeds, {f['n']} samples): " + ", ".join(f"{m} {_fmt(g)}" for m, g in f["gains"].items()))
        for k, g in f["target_by_scene"].items():
            print(f"  {args.target} on {k} prompts: {_fmt(g)}")
        for m, g in f.get("minus_dpo", {}).items():
            print(f"  {n} - DPO, {m}: {_fmt(g)}")
    for n, runs in res["online"].items():
        for r in runs:
            print(f"  {n} seed {r['seed']}: " + "  ".join(f"{p['cpu_min']:.1f}:{p['gain']:+.3f}" for p in r["curve"]))
    return res


def _fmt(g: dict) -> str:
    from diffalign.bench import precise

    return precise.fmt_gain(g)


def final_table(precise_dir: Path, folders: dict[str, list[Path]]) -> dict:
    """Each online method's seed-averaged gains on the full protocol (every oracle, the target by scene), and
    its paired difference from DPO's seed-averaged model on the same samples (``PRECISE/scores/dpo_seed*.pt``)."""
    from diffalign.bench import precise

    meta = json.loads((precise_dir / "results.json").read_text())
    proto = precise.Protocol(**{k: v for k, v in meta["protocol"].items() if k != "samples"}
                             | {"prompt_list": None if meta["protocol"].get("prompt_list") is None
                                else tuple(meta["protocol"]["prompt_list"])})
    target = meta["target"]
    base = torch.load(precise_dir / "scores" / "base.pt", weights_only=True)
    dpo = [torch.load(f, weights_only=True) for f in sorted((precise_dir / "scores").glob("dpo_seed*.pt"))]
    out = {}
    for name, dirs in folders.items():
        runs = [torch.load(d / "scores.pt", weights_only=True) for d in dirs]
        metrics = [m for m in base if m != "diversity" and all(m in r for r in runs)]
        f = {"seeds": len(runs), "n": int(base[target].numel()),
             "gains": {m: precise.gain(base[m], [r[m] for r in runs]) for m in metrics},
             "target_by_scene": precise.gain_by_scene(base[target], [r[target] for r in runs], proto)}
        if dpo:
            f["minus_dpo"] = {m: precise.gain(torch.stack([d[m].double() for d in dpo]).mean(0),
                                              [torch.stack([r[m].double() for r in runs]).mean(0)])
                              for m in (target, "toy_oracle")}
            f["dpo_seeds"] = len(dpo)
        out[name] = f
    return out


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    d = res["dpo"]
    x = [p["cpu_min"] for p in d]
    ax.plot(x, [p["gain"] for p in d], "o-", color="C0", label="Diffusion-DPO (pairs + training; 2-seed mean)")
    ax.fill_between(x, [p["low"] for p in d], [p["high"] for p in d], color="C0", alpha=0.2)
    for i, (name, runs) in enumerate(res["online"].items()):
        for j, r in enumerate(runs):
            c = r["curve"]
            ax.plot([p["cpu_min"] for p in c], [p["gain"] for p in c], ".-", color=f"C{i + 1}", alpha=0.8,
                    label=f"{name} (per seed)" if j == 0 else None)
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xlabel("CPU minutes (one thread)")
    ax.set_ylabel(f"held-out {res['target']} gain over the base")
    ax.set_title("Gain per CPU minute, toy SD base (curve protocol: 64 prompts x 4 seeds)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
