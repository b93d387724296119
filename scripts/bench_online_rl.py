"""Online RL in the toy world: DiffusionNFT / Flow-GRPO / DDPO from a toy base, reward = toy_shape,
scored on held-out prompts before and after with the SAME starting noise (paired), 1 torch thread.

    python scripts/bench_online_rl.py --base sd --method nft --seeds 0,1,2 --minutes 8 --out runs/online_rl

Each run trains a rank-8 LoRA with AdamW for a CPU-time budget (or ``--updates``), one optimizer update per
``loss`` call (the objective's rollout refills its buffer when it empties), on train-split prompts drawn
by seed; then samples ``--eval-prompts`` x ``--eval-seeds`` held-out images (20 steps, CFG 5, the toy
bases' sampler) for the base and the tuned LoRA from identical noise and reports the mean of each oracle
with a paired bootstrap 95% interval of the difference. Results: ``OUT/results.jsonl`` (one line per run)
and a table on stdout. The objective is driven directly (not through ``train()``), so the numbers
measure the method, not the loop.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

ORACLES = ("toy_shape", "toy_color", "toy_position", "toy_oracle", "toy_aesthetic")


def build_objective(method: str, base: str, args: argparse.Namespace):
    from diffalign.objectives.nft import DiffusionNFT
    from diffalign.objectives.policy_gradient import DDPO, FlowGRPO

    common = {"group_size": args.group, "steps": args.rollout_steps, "guidance_scale": args.guidance}
    if method == "nft":
        return DiffusionNFT(beta=args.nft_beta, kl_beta=args.kl, timestep_fraction=args.timestep_fraction,
                            decay_rate=args.decay_rate, decay_max=args.decay_max, **common)
    if method == "grpo":
        return FlowGRPO(kl_beta=args.kl, clip_range=args.clip_range, timestep_fraction=args.timestep_fraction,
                        **common)
    if method == "ddpo":
        return DDPO(clip_range=args.clip_range, timestep_fraction=args.timestep_fraction,
                    stat_min_count=args.group, **common)
    raise ValueError(method)


def paired_bootstrap(a: torch.Tensor, b: torch.Tensor, seed: int = 0) -> tuple[float, float, float]:
    """Mean of b - a and its 95% percentile interval (diffalign.bench.stats, 2000 resamples of the pairs)."""
    from diffalign.bench.stats import paired_bootstrap as boot

    iv = boot(a, b, n_boot=2000, level=0.95, seed=seed)
    return float(iv.mean), float(iv.low), float(iv.high)


@torch.no_grad()
def score(bb, prompts: list[str], seeds: int, rs: dict) -> dict[str, torch.Tensor]:
    from diffalign.bench.experiment import score_all
    from diffalign.toyworld.pairs import sample_images

    expanded = [p for p in prompts for _ in range(seeds)]
    imgs = sample_images(bb, expanded, seed=1234, steps=20, guidance_scale=5.0, progress=False)
    return score_all(rs, imgs, expanded)


def run(args: argparse.Namespace, seed: int, rs: dict, base_scores: dict | None) -> dict:
    from diffalign.backbones import load_backbone
    from diffalign.backbones.lora import add_lora
    from diffalign.toyworld import shapes

    base_dir = Path(args.base_dir) / args.base
    torch.manual_seed(seed)
    bb = load_backbone(base_dir)
    add_lora(bb, rank=8)
    obj = build_objective(args.method, args.base, args)
    obj.setup(bb, reward=rs["toy_shape"])
    params = bb.trainable_parameters()
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-4)
    pool = shapes.prompts("train", n=args.train_prompts, seed=seed)
    g = torch.Generator().manual_seed(seed)
    t0, c0 = time.time(), time.process_time()
    curve, step = [], 0
    while (args.updates and step < args.updates) or (not args.updates and time.process_time() - c0 < args.minutes * 60):
        idx = torch.randint(len(pool), (args.batch,), generator=g).tolist()
        prompts = [pool[i] for i in idx]
        loss, m = obj.loss({"prompts": prompts, "cond": bb.encode_prompts(prompts)}, bb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        obj.on_update(bb)
        step += 1
        if "reward_mean" in m:
            cpu = time.process_time() - c0
            curve.append({"step": step, "cpu_s": round(cpu, 1), "reward": round(float(m["reward_mean"]), 4)})
            print(f"seed {seed} step {step} cpu {cpu:.0f}s wall {time.time() - t0:.0f}s train reward "
                  f"{float(m['reward_mean']):.3f}", flush=True)
    train_s, wall_s = time.process_time() - c0, time.time() - t0
    eval_prompts = shapes.eval_prompts(args.eval_prompts, seed=1)
    tuned = score(bb, eval_prompts, args.eval_seeds, rs)
    out = {"method": args.method, "base": args.base, "seed": seed, "updates": step, "rollouts": obj.rollouts,
           "train_cpu_min": round(train_s / 60, 2), "train_wall_min": round(wall_s / 60, 2), "curve": curve, "n_eval": len(tuned["toy_shape"])}
    for k in rs:
        mean, lo, hi = paired_bootstrap(base_scores[k], tuned[k], seed=seed)
        out[k] = {"base": round(float(base_scores[k].mean()), 4), "tuned": round(float(tuned[k].mean()), 4),
                  "diff": round(mean, 4), "ci95": [round(lo, 4), round(hi, 4)]}
    out["shape_gain_per_cpu_min"] = round(out["toy_shape"]["diff"] / max(train_s / 60, 1e-9), 4)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", choices=["sd", "sd3"], default="sd")
    p.add_argument("--base-dir", default="diffalign/toyworld/base")
    p.add_argument("--method", choices=["nft", "grpo", "ddpo"], default="nft")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--minutes", type=float, default=8.0,
                   help="training budget per run in CPU minutes of this process (time.process_time, 1 thread): "
                        "the same work on a loaded or an idle machine")
    p.add_argument("--updates", type=int, default=0, help="train this many updates instead of --minutes")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch", type=int, default=8, help="prompts per rollout")
    p.add_argument("--group", type=int, default=4, help="samples per prompt")
    p.add_argument("--rollout-steps", type=int, default=10)
    p.add_argument("--timestep-fraction", type=float, default=0.5)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--kl", type=float, default=0.0)
    p.add_argument("--clip-range", type=float, default=1e-3)
    p.add_argument("--nft-beta", type=float, default=1.0)
    p.add_argument("--decay-rate", type=float, default=0.001)
    p.add_argument("--decay-max", type=float, default=0.5)
    p.add_argument("--train-prompts", type=int, default=512)
    p.add_argument("--eval-prompts", type=int, default=512)
    p.add_argument("--eval-seeds", type=int, default=2)
    p.add_argument("--out", default="runs/online_rl")
    args = p.parse_args()
    torch.set_num_threads(1)
    from diffalign.backbones import load_backbone
    from diffalign.bench.experiment import load_rewards
    from diffalign.toyworld import shapes

    rs = load_rewards(list(ORACLES))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cache = out / f"base_{args.base}_{args.eval_prompts}x{args.eval_seeds}.pt"
    if cache.is_file():
        base_scores = torch.load(cache, weights_only=True)
    else:
        base_scores = score(load_backbone(Path(args.base_dir) / args.base),
                            shapes.eval_prompts(args.eval_prompts, seed=1), args.eval_seeds, rs)
        torch.save(base_scores, cache)
    for s in [int(x) for x in args.seeds.split(",")]:
        res = run(args, s, rs, base_scores)
        res["args"] = {k: v for k, v in vars(args).items() if k not in ("seeds", "out")}
        with (out / "results.jsonl").open("a") as f:
            f.write(json.dumps(res) + "\n")
        sh = res["toy_shape"]
        print(f"{args.method} {args.base} seed {s}: shape {sh['base']} -> {sh['tuned']} (diff {sh['diff']:+.4f}, "
              f"95% CI {sh['ci95']}), {res['updates']} updates, {res['train_cpu_min']} min; others "
              + ", ".join(f"{k} {res[k]['diff']:+.4f}" for k in ORACLES if k != "toy_shape"), flush=True)


if __name__ == "__main__":
    main()
