"""Reward feedback (ReFL, DRaFT-K, DRaFT-LV, AlignProp) in the toy world: held-out oracles before/after.

For each training seed: a fresh LoRA on the toy base (SD-style ``sd`` or SD3-style ``sd3``), trained
online on toy-grammar TRAIN prompts with the chosen method and a differentiable training reward
(default ``toy_shape_soft``, the relaxation of the shape oracle; ``toy_clip`` / ``toy_aesthetic`` for a
learned/proxy reward), then scored on HELD-OUT prompts: ``--eval-prompts`` prompts x ``--eval-seeds``
samples (20 DDIM / flow-Euler steps, CFG 5, the stock sampler), each from the same starting noise for
the base and the tuned model, so the difference per sample is paired. Every oracle (shape, colour,
position, overall), the aesthetic proxy and the training reward are reported with a paired bootstrap
95% interval of the gain. Training time is CPU seconds of this process (``time.process_time``) and
wall seconds; on a shared machine both are noisy.

    OMP_NUM_THREADS=1 python scripts/bench_online.py --family sd --method refl --seeds 0,1,2 \
        --steps 200 --out runs/bench_online/sd_refl
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

import rewards
from diffalign.backbones import load_backbone
from diffalign.backbones.lora import add_lora, save_lora
from diffalign.bench.experiment import load_rewards, score_all
from diffalign.bench.stats import paired_bootstrap
from diffalign.objectives.reward_feedback import AlignProp, DRaFT, ReFL
from diffalign.toyworld.bases import find_base
from diffalign.toyworld.pairs import TOY_GUIDANCE, sample_images
from diffalign.toyworld.shapes import prompts as toy_prompts

EVAL_NAMES = ["toy_shape", "toy_color", "toy_position", "toy_oracle", "toy_aesthetic"]


def build_objective(args: argparse.Namespace):
    common = dict(steps=args.chain_steps, guidance_scale=args.guidance, reward_scale=args.reward_scale,
                  beta_kl=args.beta_kl)
    if args.method == "refl":
        lo = args.refl_lo if args.refl_lo is not None else (3 * args.chain_steps) // 4
        hi = args.refl_hi if args.refl_hi is not None else args.chain_steps - 1
        return ReFL(**common, k_lo=lo, k_hi=hi)
    if args.method == "draft":
        return DRaFT(**common, k=args.k)
    if args.method == "draft_lv":
        return DRaFT(**common, lv_copies=args.lv_copies)
    if args.method == "alignprop":
        return AlignProp(**common, k_mean=args.k_mean, k_std=args.k_std)
    raise SystemExit(f"--method: unknown {args.method!r} (refl, draft, draft_lv, alignprop)")


def evaluate(bb, eval_prompts: list[str], rs: dict, args: argparse.Namespace) -> dict[str, torch.Tensor]:
    expanded = [p for p in eval_prompts for _ in range(args.eval_seeds)]
    imgs = sample_images(bb, expanded, seed=1234, steps=20, guidance_scale=args.guidance, batch_size=64,
                         progress=True, desc="evaluating")
    return score_all(rs, imgs, expanded)


def train_one(args: argparse.Namespace, model_dir: Path, seed: int, reward, log_path: Path):
    torch.manual_seed(seed)
    bb = load_backbone(model_dir)
    add_lora(bb, rank=args.rank)
    obj = build_objective(args)
    obj.setup(bb, reward=reward)
    params = bb.trainable_parameters()
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-4)
    train_prompts = toy_prompts("train")
    rng = random.Random(seed)
    cpu0, wall0 = time.process_time(), time.time()
    log = []
    bar = tqdm(range(args.steps), desc=f"{args.method} seed {seed}")
    for step in bar:
        ps = rng.sample(train_prompts, args.batch)
        batch = {"prompts": ps, "cond": bb.encode_prompts(ps)}
        loss, m = obj.loss(batch, bb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        row = {"step": step + 1, **{k: float(v) for k, v in m.items()}, "grad_norm": float(gn)}
        log.append(row)
        bar.set_postfix(reward=f"{row['reward']:.3f}")
    cpu, wall = time.process_time() - cpu0, time.time() - wall0
    log_path.write_text("\n".join(json.dumps(r) for r in log) + "\n")
    return bb, cpu, wall, log


def evaluate_loras(args: argparse.Namespace, model_dir: Path, eval_prompts: list[str], rs: dict,
                   base: dict[str, torch.Tensor], out: Path) -> None:
    from diffalign.backbones.lora import load_lora

    res = {"settings": vars(args), "n_eval": len(next(iter(base.values()))),
           "base": {k: float(v.mean()) for k, v in base.items()}, "loras": {}}
    for i, d in enumerate(args.eval_loras.split(",")):
        bb = load_backbone(model_dir)
        load_lora(bb, d)
        tuned = evaluate(bb, eval_prompts, rs, args)
        res["loras"][d] = {}
        for k in base:
            ci = paired_bootstrap(base[k], tuned[k], seed=i)
            res["loras"][d][k] = {"after": float(tuned[k].mean()), "gain": ci.mean, "ci95": [ci.low, ci.high]}
        print(d, {k: str(paired_bootstrap(base[k], tuned[k], seed=i)) for k in base}, flush=True)
        (out / "eval_loras.json").write_text(json.dumps(res, indent=2))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default=None, help="toy base folder (holds sd/ and sd3/); default: the shipped one")
    p.add_argument("--family", default="sd", choices=["sd", "sd3"])
    p.add_argument("--method", default="refl", choices=["refl", "draft", "draft_lv", "alignprop"])
    p.add_argument("--reward", default="toy_shape_soft", help="training reward (toy_shape_soft, toy_clip, ...)")
    p.add_argument("--clip", default=None, help="toy CLIP folder (for toy_clip)")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--steps", type=int, default=200, help="optimizer steps")
    p.add_argument("--batch", type=int, default=8, help="prompts per step")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--chain-steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=TOY_GUIDANCE)
    p.add_argument("--reward-scale", type=float, default=1.0)
    p.add_argument("--beta-kl", type=float, default=0.0)
    p.add_argument("--refl-lo", type=int, default=None, help="ReFL: first grad step index (default 3/4 of the chain)")
    p.add_argument("--refl-hi", type=int, default=None, help="ReFL: last grad step index (default the last step)")
    p.add_argument("--k", type=int, default=1, help="DRaFT-K: grad steps")
    p.add_argument("--lv-copies", type=int, default=2)
    p.add_argument("--k-mean", type=float, default=4.0)
    p.add_argument("--k-std", type=float, default=2.0)
    p.add_argument("--eval-prompts", type=int, default=512)
    p.add_argument("--eval-seeds", type=int, default=2)
    p.add_argument("--out", required=True)
    p.add_argument("--base-cache", default=None, help="folder for the base model's scores (shared by runs)")
    p.add_argument("--eval-loras", default=None, help="comma-separated saved LoRA folders: evaluate them only")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model_dir = find_base(args.base) / args.family
    reward = rewards.from_spec(args.reward, paths={"toy_clip": args.clip})
    names = EVAL_NAMES + (["toy_clip"] if args.clip else [])
    rs = load_rewards(names, args.clip)
    if "," not in args.reward:  # the training reward, scored beside the oracles
        rs.setdefault(args.reward, reward)
    eval_prompts = toy_prompts("heldout", n=args.eval_prompts, seed=0)

    base_path = Path(args.base_cache or out) / f"base_scores_{args.family}_{args.eval_prompts}x{args.eval_seeds}_g{args.guidance}.pt"
    base_path.parent.mkdir(parents=True, exist_ok=True)
    if base_path.is_file():
        base = torch.load(base_path, weights_only=True)
    else:
        base = evaluate(load_backbone(model_dir), eval_prompts, rs, args)
        torch.save(base, base_path)

    if args.eval_loras:  # evaluate saved LoRAs only (e.g. on more held-out samples than the training run used)
        evaluate_loras(args, model_dir, eval_prompts, rs, base, out)
        return
    results = {"settings": {k: v for k, v in vars(args).items()}, "n_eval": len(next(iter(base.values()))),
               "base": {k: float(v.mean()) for k, v in base.items()}, "runs": []}
    for seed in [int(s) for s in args.seeds.split(",")]:
        run_dir = out / f"seed{seed}"
        run_dir.mkdir(exist_ok=True)
        bb, cpu, wall, log = train_one(args, model_dir, seed, reward, run_dir / "log.jsonl")
        save_lora(bb, run_dir / "lora")
        tuned = evaluate(bb, eval_prompts, rs, args)
        run = {"seed": seed, "train_cpu_s": cpu, "train_wall_s": wall,
               "train_reward_first10": sum(r["reward"] for r in log[:10]) / min(10, len(log)),
               "train_reward_last10": sum(r["reward"] for r in log[-10:]) / min(10, len(log)), "metrics": {}}
        for k in base:
            ci = paired_bootstrap(base[k], tuned[k], seed=seed)
            run["metrics"][k] = {"after": float(tuned[k].mean()), "gain": ci.mean, "ci95": [ci.low, ci.high]}
        results["runs"].append(run)
        shape = run["metrics"]["toy_shape"]
        print(f"seed {seed}: shape {results['base']['toy_shape']:.3f} -> {shape['after']:.3f} "
              f"(gain {shape['gain']:+.3f}, 95% CI [{shape['ci95'][0]:+.3f}, {shape['ci95'][1]:+.3f}]); "
              f"train {cpu / 60:.1f} CPU min, {wall / 60:.1f} wall min", flush=True)
        (out / "results.json").write_text(json.dumps(results, indent=2))
    gains = [r["metrics"]["toy_shape"]["gain"] for r in results["runs"]]
    cpu_min = [r["train_cpu_s"] / 60 for r in results["runs"]]
    results["summary"] = {
        k: {"after_mean": sum(r["metrics"][k]["after"] for r in results["runs"]) / len(results["runs"]),
            "gain_mean": sum(r["metrics"][k]["gain"] for r in results["runs"]) / len(results["runs"])}
        for k in base
    }
    results["summary"]["shape_gain_per_cpu_min"] = sum(g / c for g, c in zip(gains, cpu_min, strict=True)) / len(gains)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results["summary"], indent=2))


if __name__ == "__main__":
    main()
