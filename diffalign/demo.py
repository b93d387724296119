"""`make demo` (`diffalign demo`): preference alignment shown in the embedded toy world, end to end on a CPU.

1. loads the toy SD base (built by `diffalign toyworld build`, or the copy shipped in the package);
2. samples k images per training prompt from it and labels best-vs-worst pairs with the target reward;
3. fine-tunes a LoRA with Diffusion-DPO on those pairs;
4. with ``--online-steps N`` (default 0: skipped), fine-tunes a second LoRA online with DiffusionNFT, the
   target reward scoring its own rollouts. Over 3 seeds and 8 CPU minutes its held-out gain is several
   times DPO's (docs/BENCHMARKS.md, "Online RL with the precise protocol"), but at the demo's budget one
   seed is not reliably above DPO (300 steps, seed 0: +0.019 against DPO's +0.051 here), so it is not on
   by default;
5. scores the base and the tuned models on held-out prompts (target reward, every oracle, the aesthetic
   proxy, diversity) and prints the table;
6. writes under runs/demo/: grid.png (base | DPO | NFT, same noise), reward_curve.png (held-out target
   metric at each checkpoint of each run), summary.json {"target_metric", "before", "after", "online",
   "how_to_read"} ("after": DPO; "online": NFT's objective, steps and scores).

The three measure different things, and the "how_to_read" line (printed too) says how: the table is
the mean over every held-out prompt x 2 seeds; the curve is the first 32 prompts x 1 seed, so it is
noisier and can end near its start while the table shows the gain; the grid pairs images drawn from
the same noise, and a LoRA moves the sample only a little, so most pairs look alike.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import yaml


def run_demo(args: argparse.Namespace) -> int:
    """The demo with the flags of ``diffalign demo`` (declared in cli.py)."""
    import torch

    torch.set_num_threads(1)  # toy models: one thread is as fast, and robust on a shared CPU (docs/BENCHMARKS.md)

    import rewards

    from .backbones import load_backbone
    from .bench.alignment import evaluate_model, online_run_config, reward_curve, run_config
    from .bench.experiment import ORACLES, TOY_GUIDANCE, load_rewards
    from .toyworld import shapes
    from .toyworld.bases import DEFAULT_BASE, find_base
    from .toyworld.pairs import make_pairs
    from .training import train
    from .utils.images import save_grid

    t_start = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        base = find_base()
    except FileNotFoundError:
        from .toyworld.pretrain import build_toyworld

        print(f"building the toy base models into {DEFAULT_BASE} (once) ...")
        build_toyworld(DEFAULT_BASE, seed=0)
        base = find_base()
    model = base / "sd"
    print(f"toy base: {model}")

    pairs_dir = out / "pairs"
    if not (pairs_dir / "pairs.jsonl").exists():
        print(f"sampling {args.k} images for each of {args.pair_prompts} train prompts; labelling by {args.target}")
        stats = make_pairs(load_backbone(model), shapes.prompts("train", n=args.pair_prompts, seed=args.seed),
                           rewards.from_spec(args.target), pairs_dir, k=args.k, seed=args.seed)
        print(f"  {stats['pairs']} pairs, {stats['ties']} ties")

    run_dir = out / "dpo"
    cfg = run_config(model, pairs_dir / "pairs.jsonl", run_dir, "dpo", seed=args.seed, steps=args.steps,
                     checkpoint_every=args.checkpoint_every)
    if reusable(run_dir, cfg):
        print(f"reusing the DPO LoRA in {run_dir / 'final'} (delete {run_dir} to train it again)")
        res = {"weights": str(run_dir / "final" / "lora")}
    else:
        res = train(cfg, resume="auto")

    nft_dir, nft_weights = out / "nft", None
    if args.online_steps > 0:
        print(f"\nDiffusionNFT, online: {args.online_steps} steps; the policy samples 8 train prompts x 4 images, "
              f"{args.target} scores them, the LoRA learns from its own better and worse samples")
        ocfg = online_run_config(model, nft_dir, "nft", seed=args.seed, steps=args.online_steps, reward=args.target,
                                 checkpoint_every=max(1, args.online_steps // 4))
        if reusable(nft_dir, ocfg):
            print(f"reusing the NFT LoRA in {nft_dir / 'final'} (delete {nft_dir} to train it again)")
            nft_weights = str(nft_dir / "final" / "lora")
        else:
            nft_weights = train(ocfg, resume="auto")["weights"]

    names = list(ORACLES) + ["toy_aesthetic"]
    rs = load_rewards(names)
    prompts = shapes.eval_prompts(args.eval_prompts, seed=1)
    before, imgs_b = evaluate_model(model, None, prompts, rs, seeds=2, steps=20, guidance=TOY_GUIDANCE)
    after, imgs_a = evaluate_model(model, res["weights"], prompts, rs, seeds=2, steps=20, guidance=TOY_GUIDANCE)
    columns, titles = [before, after], ["base", "DPO"]
    if nft_weights:
        online, imgs_o = evaluate_model(model, nft_weights, prompts, rs, seeds=2, steps=20, guidance=TOY_GUIDANCE)
        columns.append(online)
        titles.append("NFT")

    print(f"\nheld-out prompts: {len(prompts)} x 2 seeds; target metric: {args.target}")
    print(f"{'metric':<16}" + "".join(f"{t:>10}" for t in titles) + "".join(f"{t + ' gain':>11}" for t in titles[1:]))
    for m in before:
        flag = "  <- target" if m == args.target else ""
        print(f"{m:<16}" + "".join(f"{c[m]:>10.3f}" for c in columns)
              + "".join(f"{c[m] - before[m]:>+11.3f}" for c in columns[1:]) + flag)

    n = 8  # 8 prompts, first seed: base | DPO (| NFT) side by side, same starting noise
    idx = torch.arange(n) * 2
    shown = [imgs_b[idx], imgs_a[idx]] + ([imgs_o[idx]] if nft_weights else [])
    grid = torch.stack(shown, 1).flatten(0, 1)
    save_grid(grid, out / "grid.png", nrow=2 * len(shown), upscale=4)
    (out / "grid_prompts.txt").write_text("\n".join(prompts[:n]) + "\n")
    curves = {"DPO": reward_curve(model, run_dir, prompts[:32], {args.target: rs[args.target]}, steps=20,
                                  guidance=TOY_GUIDANCE)}
    if nft_weights:
        curves["NFT"] = reward_curve(model, nft_dir, prompts[:32], {args.target: rs[args.target]}, steps=20,
                                     guidance=TOY_GUIDANCE)
    plot_curves(curves, args.target, out / "reward_curve.png")
    pixel_diff = float((imgs_a[idx] - imgs_b[idx]).abs().mean()) * 255
    note = how_to_read(args.target, len(prompts), min(32, len(prompts)), before[args.target], after[args.target],
                       pixel_diff, online[args.target] if nft_weights else None)
    print("\n" + note)
    summary = {"target_metric": args.target, "before": before, "after": after,
               "online": {"objective": "nft", "steps": args.online_steps, "after": online} if nft_weights else None,
               "how_to_read": note}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"\ngrid (groups of columns: {' | '.join(titles)}): {out / 'grid.png'}")
    print(f"reward curve: {out / 'reward_curve.png'}\nsummary: {out / 'summary.json'}")
    print(f"demo wall time: {time.time() - t_start:.0f} s")
    return 0


def reusable(run_dir: Path, cfg: Any) -> bool:
    """True when ``run_dir`` holds a finished LoRA trained with ``cfg``; a LoRA trained with other settings
    (e.g. another ``--steps``) is an error naming the folder and the keys, never reused under new labels."""
    from .training.runfolder import CONFIG, _as_dict, config_changes

    if not (run_dir / "final" / "lora").exists():
        return False
    saved = run_dir / CONFIG
    diff = config_changes(yaml.safe_load(saved.read_text()) or {}, _as_dict(cfg)) if saved.is_file() else {"?": (None, None)}
    if diff:
        what = "; ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in diff.items()) if saved.is_file() else \
            f"no {CONFIG}"
        raise ValueError(f"{run_dir}: holds a LoRA trained with other settings ({what}); delete {run_dir} or give "
                         "another --out")
    return True


def plot_curves(curves: dict[str, list[dict[str, float]]], target: str, path: Path) -> None:
    """Held-out ``target`` against the training step, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for name, points in curves.items():
        ax.plot([p["step"] for p in points], [p[target] for p in points], marker="o", label=name)
    ax.set_xlabel("training step")
    ax.set_ylabel(f"held-out {target} (32 prompts x 1 seed)")
    ax.set_title(f"The toy world: held-out {target} during training")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def how_to_read(target: str, n_prompts: int, n_curve: int, before: float, after: float, pixel_diff: float,
                online: float | None = None) -> str:
    """What the table, the curve and the grid each measure, and why they differ."""
    nft = f", NFT {before:.3f} -> {online:.3f}" if online is not None else ""
    return (
        f"How to read these: the table is the mean {target} over {n_prompts} held-out prompts x 2 seeds "
        f"({2 * n_prompts} images): DPO {before:.3f} -> {after:.3f}{nft}. The reward curve scores the first {n_curve} "
        f"prompts x 1 seed at each checkpoint, so one image moves it by up to 1/{n_curve} = {1 / n_curve:.3f}: it is "
        "noisier and can end near its start while the table shows the gain. The grid puts each base image beside "
        f"the tuned models' images from the same starting noise; DPO's LoRA changes a sample only a little (mean "
        f"pixel difference {pixel_diff:.1f} of 255 here), so most of its images look like the base's, and the gain "
        "is in the few whose shape or colour becomes right."
    )
