"""Benchmark: inference-time alignment in the toy world (RL guidance, reward guidance, best-of-N).

1. trains toy LoRAs (or reuses them when OUT/<objective>_seed<s>/final/lora exists) with
   ``bench.alignment.run_config`` for each objective, on the same preference pairs;
2. scores exact and approximate RLG against w on held-out prompts (oracles, aesthetic proxy, diversity),
   every image from the same starting noise as ``bench.experiment.evaluate`` uses;
3. scores reward-gradient guidance and best-of-N on the base model;
4. times one image per mode against plain CFG;
5. writes RESULTS/rlg.json and RESULTS/rlg.png and prints markdown tables.

    OMP_NUM_THREADS=1 python scripts/bench_rlg.py [--objectives dpo,mapo] [--seeds 3] [--out runs/bench_rlg]

Pairs: --pairs FILE, else runs/demo/pairs/pairs.jsonl when present (the demo's pairs), else 1024 train
prompts x 4 samples from the SD base labelled by toy_shape are drawn into OUT/pairs.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch: one thread (2 threads under contention crawl)

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402

TARGET = "toy_shape"
METRICS = ["toy_shape", "toy_color", "toy_position", "toy_oracle", "toy_aesthetic", "diversity"]


def ensure_pairs(args: argparse.Namespace, base: Path) -> Path:
    if args.pairs:
        return Path(args.pairs)
    demo = Path("runs/demo/pairs/pairs.jsonl")
    if demo.exists():
        return demo
    own = Path(args.out) / "pairs"
    if not (own / "pairs.jsonl").exists():
        from diffalign.backbones import load_backbone
        from diffalign.toyworld import shapes
        from diffalign.toyworld.pairs import make_pairs
        from rewards import from_spec as parse_reward

        make_pairs(load_backbone(base), shapes.prompts("train", n=1024, seed=0), parse_reward(TARGET), own, k=4, seed=0)
    return own / "pairs.jsonl"


def ensure_lora(base: Path, pairs: Path, out: Path, objective: str, seed: int, steps: int,
                lr: float | None = None) -> tuple[Path, float | None]:
    lora = out / f"{objective}_seed{seed}" / "final" / "lora"
    if (lora / "pytorch_lora_weights.safetensors").exists():
        return lora, None
    from diffalign.bench.alignment import run_config
    from diffalign.training import train

    t0 = time.time()
    res = train(run_config(base, pairs, out / f"{objective}_seed{seed}", objective, seed=seed, steps=steps, lr=lr),
                resume="auto")
    return Path(res["weights"]), time.time() - t0


class Evaluator:
    """Held-out prompts x seeds, fixed starting noise (as bench.experiment.evaluate), all metrics."""

    def __init__(self, base: Path, n_prompts: int, seeds: int, steps: int, guidance: float) -> None:
        from diffalign.bench.experiment import ORACLES, load_rewards
        from diffalign.toyworld import shapes

        self.base, self.seeds, self.steps, self.guidance = base, seeds, steps, guidance
        self.prompts = [p for p in shapes.eval_prompts(n_prompts, seed=1) for _ in range(seeds)]
        self.rs = load_rewards(list(ORACLES) + ["toy_aesthetic"])

    def backbone(self, lora: Path | None) -> Any:
        from diffalign.api import load_model

        return load_model(self.base, lora, device="cpu")

    def run(self, bb: Any, own_noise: bool = False, **kw: Any) -> dict[str, float]:
        """``own_noise``: image i from seed 1234 + i (as best-of-N's first candidate) instead of the
        evaluate() noise."""
        import diffalign
        from diffalign.bench.experiment import diversity, score_all, seeded_latents

        own_noise = own_noise or kw.get("best_of", 1) > 1
        lat = None if own_noise else seeded_latents(bb, len(self.prompts), seed=1234)
        out = diffalign.sample(bb, self.prompts, steps=self.steps, guidance_scale=self.guidance, batch_size=64,
                               latents=lat, seed=1234, **kw)
        m = {k: float(v.mean()) for k, v in score_all(self.rs, out.images, self.prompts).items()}
        m["diversity"] = diversity(out.images, self.seeds)
        m["seconds_per_image"] = out.settings["seconds_per_image"]
        return m


def time_modes(ev: Evaluator, lora: Path, n: int, batch: int, repeats: int) -> dict[str, dict[str, float]]:
    """Median seconds per image of each mode (alternating repeats, so background load hits all alike)."""
    import diffalign
    from diffalign.bench.experiment import seeded_latents

    base_bb, bb = ev.backbone(None), ev.backbone(lora)
    prompts = ev.prompts[:n]
    modes = {
        "cfg, base (no LoRA)": (base_bb, {}),
        "cfg, tuned (LoRA on)": (bb, {}),
        "rlg exact, batched (w=1.5)": (bb, {"guidance": "rlg", "rlg_scale": 1.5}),
        "rlg exact, sequential (w=1.5)": (bb, {"guidance": "rlg", "rlg_scale": 1.5, "rlg_batched": False}),
        "rlg approx (w=1.5)": (bb, {"guidance": "rlg", "rlg_scale": 1.5, "rlg_mode": "approx"}),
        "reward guidance (toy_aesthetic)": (base_bb, {"guidance": "reward", "reward": "toy_aesthetic",
                                                      "reward_scale": 0.3, "reward_normalize": True}),
        "best-of-4 (toy_aesthetic)": (base_bb, {"best_of": 4, "reward": "toy_aesthetic"}),
    }
    times: dict[str, list[float]] = {k: [] for k in modes}
    for _ in range(repeats):
        for name, (model, kw) in modes.items():
            lat = None if "best_of" in kw else seeded_latents(model, n, seed=7)
            out = diffalign.sample(model, prompts, steps=ev.steps, guidance_scale=ev.guidance, batch_size=batch,
                                   latents=lat, **kw)
            times[name].append(out.settings["sampling_seconds"] / n)  # per kept image
    ref = statistics.median(times["cfg, tuned (LoRA on)"])
    return {k: {"median_s": statistics.median(v), "min_s": min(v), "max_s": max(v),
                "vs_cfg": statistics.median(v) / ref} for k, v in times.items()}


def mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def summarize(curves: list[dict[str, dict[str, float]]], ws: list[float]) -> dict[str, dict[str, list[float]]]:
    """Per metric, mean and std over training seeds at each w."""
    out: dict[str, dict[str, list[float]]] = {}
    for m in METRICS:
        pts = [mean_std([c[str(w)][m] for c in curves]) for w in ws]
        out[m] = {"mean": [p[0] for p in pts], "std": [p[1] for p in pts]}
    return out


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ws = results["ws"]
    panels = ["toy_shape", "toy_oracle", "toy_aesthetic", "diversity"]
    fig, axes2d = plt.subplots(2, 2, figsize=(10, 7))
    axes = axes2d.flatten()
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, m in zip(axes, panels, strict=True):
        for i, (obj, r) in enumerate(results["objectives"].items()):
            for mode, style in (("exact", "-o"), ("approx", "--s")):
                s = r["summary"][mode][m]
                ax.errorbar(ws, s["mean"], yerr=s["std"], fmt=style, color=colors[i % len(colors)], capsize=2,
                            label=f"{obj} {mode}", ms=4)
        ax.axhline(results["base"][m], color="gray", lw=0.8, ls=":")
        ax.axvline(1.0, color="gray", lw=0.6, ls="--")
        ax.set_xlabel("RLG weight w (0 = base, 1 = tuned)")
        ax.set_title(m + (" (target)" if m == TARGET else ""))
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"RL guidance in the toy world: held-out metrics vs w (mean ± std over {results['settings']['seeds']} "
                 "LoRAs per objective)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def tables(results: dict[str, Any]) -> str:
    ws = results["ws"]
    lines = []
    for obj, r in results["objectives"].items():
        lines.append(f"\n{obj} ({len(r['loras'])} LoRAs; mean ± std over them)\n")
        lines.append("| mode | w | " + " | ".join(METRICS) + " |")
        lines.append("|---" * (len(METRICS) + 2) + "|")
        for mode in ("exact", "approx"):
            s = r["summary"][mode]
            for j, w in enumerate(ws):
                cells = [f"{s[m]['mean'][j]:.3f} ± {s[m]['std'][j]:.3f}" for m in METRICS]
                lines.append(f"| {mode} | {w:g} | " + " | ".join(cells) + " |")
    lines.append("\nbase model and other inference-time methods (same prompts and noise)\n")
    lines.append("| method | " + " | ".join(METRICS) + " |")
    lines.append("|---" * (len(METRICS) + 1) + "|")
    lines.append("| base (cfg) | " + " | ".join(f"{results['base'][m]:.3f}" for m in METRICS) + " |")
    for name, m in results["inference_time"].items():
        lines.append(f"| {name} | " + " | ".join(f"{m[k]:.3f}" for k in METRICS) + " |")
    lines.append("\ntime per image (median over repeats; ratio to plain CFG on the tuned model)\n")
    lines.append("| mode | s per image | x CFG |\n|---|---|---|")
    for name, t in results["timing"].items():
        lines.append(f"| {name} | {t['median_s'] * 1000:.1f} ms [{t['min_s'] * 1000:.1f}-{t['max_s'] * 1000:.1f}] | "
                     f"{t['vs_cfg']:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--objectives", default="dpo,mapo")
    p.add_argument("--seeds", type=int, default=3, help="LoRAs (training seeds) per objective")
    p.add_argument("--ws", default="0,0.5,1,1.5,2,3")
    p.add_argument("--pairs", default=None)
    p.add_argument("--train-steps", type=int, default=400)
    p.add_argument("--lr", type=float, default=None, help="LoRA lr (default: each objective's TOY_LR)")
    p.add_argument("--eval-prompts", type=int, default=96)
    p.add_argument("--eval-seeds", type=int, default=2)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--time-images", type=int, default=64)
    p.add_argument("--time-batch", type=int, default=16)
    p.add_argument("--time-repeats", type=int, default=3)
    p.add_argument("--out", default="runs/bench_rlg")
    p.add_argument("--results", default="docs/results")
    args = p.parse_args()
    torch.set_num_threads(1)

    from diffalign.bench.alignment import OBJECTIVE_SETTINGS
    from diffalign.bench.experiment import TOY_GUIDANCE
    from diffalign.toyworld.bases import find_base

    t_start = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = find_base() / "sd"
    pairs = ensure_pairs(args, base)
    ws = [float(w) for w in args.ws.split(",")]
    objectives = [o.strip() for o in args.objectives.split(",") if o.strip()]
    skipped = [o for o in objectives if o not in OBJECTIVE_SETTINGS]
    for o in skipped:
        print(f"skipping {o!r}: no toy-world settings (known: {', '.join(OBJECTIVE_SETTINGS)})", flush=True)
    objectives = [o for o in objectives if o in OBJECTIVE_SETTINGS]

    ev = Evaluator(base, args.eval_prompts, args.eval_seeds, args.steps, TOY_GUIDANCE)
    base_bb = ev.backbone(None)
    results: dict[str, Any] = {
        "ws": ws, "target_metric": TARGET, "skipped_objectives": skipped, "objectives": {},
        "settings": {"pairs": str(pairs), "seeds": args.seeds, "train_steps": args.train_steps,
                     "eval_prompts": args.eval_prompts, "eval_seeds": args.eval_seeds, "sample_steps": args.steps,
                     "guidance_scale": TOY_GUIDANCE, "scheduler": type(base_bb.pipe.scheduler).__name__,
                     "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"},
    }
    print("base ...", flush=True)
    results["base"] = ev.run(base_bb)
    for obj in objectives:
        loras, train_s, curves = [], [], {"exact": [], "approx": []}
        for s in range(args.seeds):
            lora, secs = ensure_lora(base, pairs, out, obj, s, args.train_steps, args.lr)
            loras.append(str(lora))
            if secs is not None:
                train_s.append(secs)
            bb = ev.backbone(lora)
            for mode in ("exact", "approx"):
                curve = {}
                for w in ws:
                    curve[str(w)] = ev.run(bb, guidance="rlg", rlg_scale=w, rlg_mode=mode)
                    print(f"{obj} seed {s} {mode} w={w:g}: " + " ".join(
                        f"{k}={v:.3f}" for k, v in curve[str(w)].items() if k in METRICS), flush=True)
                curves[mode].append(curve)
        results["objectives"][obj] = {
            "loras": loras, "train_seconds": train_s, "curves": curves,
            "summary": {mode: summarize(curves[mode], ws) for mode in curves},
        }
    print("reward guidance and best-of-N on the base ...", flush=True)
    extra = {}
    for scale in (0.1, 0.3, 1.0):
        extra[f"reward guidance toy_aesthetic, scale {scale:g} (normalized)"] = ev.run(
            base_bb, guidance="reward", reward="toy_aesthetic", reward_scale=scale, reward_normalize=True)
    extra["base, seed 1234+i noise (best-of's first candidate)"] = ev.run(base_bb, own_noise=True)
    for sel in ("toy_aesthetic", TARGET):
        extra[f"best-of-4 by {sel}"] = ev.run(base_bb, best_of=4, reward=sel)
    results["inference_time"] = extra
    if objectives:
        print("timing ...", flush=True)
        results["timing"] = time_modes(ev, Path(results["objectives"][objectives[0]]["loras"][0]),
                                       args.time_images, args.time_batch, args.time_repeats)
        results["settings"]["timing"] = {"images": args.time_images, "batch": args.time_batch,
                                         "repeats": args.time_repeats, "lora": objectives[0] + " seed 0"}
    else:
        results["timing"] = {}
    results["settings"]["load_average_end"] = os.getloadavg()[0]
    results["settings"]["wall_seconds"] = time.time() - t_start
    res_dir = Path(args.results)
    res_dir.mkdir(parents=True, exist_ok=True)
    (res_dir / "rlg.json").write_text(json.dumps(results, indent=2))
    if objectives:
        plot(results, res_dir / "rlg.png")
    print(tables(results))
    print(f"results: {res_dir / 'rlg.json'}, plot: {res_dir / 'rlg.png'}; wall {time.time() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
