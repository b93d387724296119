"""`make demo` (`diffalign demo`): preference alignment shown in the embedded toy world, end to end on a CPU.

1. loads the toy SD base (built by `diffalign toyworld build`, or the copy shipped in the package);
2. samples k images per training prompt from it and labels best-vs-worst pairs with the target reward;
3. fine-tunes a LoRA with Diffusion-DPO on those pairs;
4. scores base and tuned models on held-out prompts (target reward, every oracle, the aesthetic proxy,
   diversity) and prints the before/after table;
5. writes under runs/demo/: grid.png (before | after, same noise), reward_curve.png (held-out target
   metric at each checkpoint), summary.json {"target_metric", "before", "after", "how_to_read"}.

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


def run_demo(args: argparse.Namespace) -> int:
    """The demo with the flags of ``diffalign demo`` (declared in cli.py)."""
    import torch

    torch.set_num_threads(1)  # toy models: one thread is as fast, and robust on a shared CPU (docs/BENCHMARKS.md)

    import rewards

    from .backbones import load_backbone
    from .bench.alignment import evaluate_model, plot_curve, reward_curve, run_config
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
    res = train(cfg, resume="auto") if not (run_dir / "final" / "lora").exists() else {"weights": str(run_dir / "final" / "lora")}

    names = list(ORACLES) + ["toy_aesthetic"]
    rs = load_rewards(names)
    prompts = shapes.eval_prompts(args.eval_prompts, seed=1)
    before, imgs_b = evaluate_model(model, None, prompts, rs, seeds=2, steps=20, guidance=TOY_GUIDANCE)
    after, imgs_a = evaluate_model(model, res["weights"], prompts, rs, seeds=2, steps=20, guidance=TOY_GUIDANCE)

    print(f"\nheld-out prompts: {len(prompts)} x 2 seeds; target metric: {args.target}")
    print(f"{'metric':<16}{'before':>10}{'after':>10}{'change':>10}")
    for m in before:
        flag = "  <- target" if m == args.target else ""
        print(f"{m:<16}{before[m]:>10.3f}{after[m]:>10.3f}{after[m] - before[m]:>+10.3f}{flag}")

    n = 8  # 8 prompts, first seed: before | after side by side, same starting noise
    idx = torch.arange(n) * 2
    grid = torch.stack([imgs_b[idx], imgs_a[idx]], 1).flatten(0, 1)
    save_grid(grid, out / "grid.png", nrow=4, upscale=4)
    (out / "grid_prompts.txt").write_text("\n".join(prompts[:n]) + "\n")
    curve = reward_curve(model, run_dir, prompts[:32], {args.target: rs[args.target]}, steps=20, guidance=TOY_GUIDANCE)
    plot_curve(curve, [args.target], out / "reward_curve.png", f"DPO in the toy world: held-out {args.target}")
    pixel_diff = float((imgs_a[idx] - imgs_b[idx]).abs().mean()) * 255
    note = how_to_read(args.target, len(prompts), min(32, len(prompts)), before[args.target], after[args.target],
                       pixel_diff)
    print("\n" + note)
    summary = {"target_metric": args.target, "before": before, "after": after, "how_to_read": note}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"\ngrid (pairs of columns: before | after): {out / 'grid.png'}")
    print(f"reward curve: {out / 'reward_curve.png'}\nsummary: {out / 'summary.json'}")
    print(f"demo wall time: {time.time() - t_start:.0f} s")
    return 0


def how_to_read(target: str, n_prompts: int, n_curve: int, before: float, after: float, pixel_diff: float) -> str:
    """What the table, the curve and the grid each measure, and why they differ."""
    return (
        f"How to read these: the table is the mean {target} over {n_prompts} held-out prompts x 2 seeds "
        f"({2 * n_prompts} images): {before:.3f} -> {after:.3f}. The reward curve scores the first {n_curve} prompts x "
        f"1 seed at each checkpoint, so one image moves it by up to 1/{n_curve} = {1 / n_curve:.3f}: it is noisier and can end near its start while "
        "the table shows the gain. The grid pairs each before image with the after image from the same starting "
        f"noise; the LoRA changes a sample only a little (mean pixel difference {pixel_diff:.1f} of 255 here), so "
        "most pairs look alike, and the gain is in the few images whose shape or colour becomes right."
    )

