"""Online RL in the toy world: DiffusionNFT / Flow-GRPO / DDPO (any toy reward) and ReFL / DRaFT / AlignProp
(a differentiable toy reward, e.g. ``toy_shape_soft``) from a toy base, scored on held-out prompts with the precise protocol (the same samples as ``scripts/bench_precise.py``), 1 thread.

    OMP_NUM_THREADS=1 python scripts/bench_online_rl.py --base sd --method nft --seeds 0,1,2 --minutes 8 \\
        --curve-every-min 1 --out runs/online_rl

Each run trains a LoRA (rank 8 by default) with AdamW for a budget of CPU minutes of this process (``time.process_time``,
one thread: the same work on a loaded or an idle machine) or ``--updates``, one optimizer update per ``loss``
call (the objective's rollout refills its buffer when it empties), on train-split prompts drawn by seed
(``--two-object``: the fraction of two-object scenes; the held-out protocol is 79% two-object).

Evaluation (``diffalign.bench.precise``): ``--eval-prompts`` x ``--eval-seeds`` held-out samples (default
256 x 4 = 1024), base and tuned from the same starting noise, a paired bootstrap 95% interval of every
oracle's difference, the target's gain split by one- and two-object prompts. ``--curve-every-min M`` also
scores the curve protocol (default 64 x 4 = 256 samples, the one ``bench_precise`` uses for DPO's curve)
every M CPU minutes of training; evaluation CPU is not counted in the training budget. ``--reward`` picks the
training reward (``toy_shape`` by default; ``toy_aesthetic`` for a learned proxy): the curves then show the
proxy beside the oracles ("gold"). ``--early-stop-drop D`` stops a run when ``--gold`` falls more than D below
its best curve point (the rule of the loop's ``reward.early_stop_on_gold_drop``) and evaluates the best point.

Per run: ``OUT/<method>_seed<S>/`` holds the LoRA (``lora/``), the per-sample scores (``scores.pt``) and the
curve; ``OUT/results.jsonl`` gets one line per run and a table goes to stdout. A seed whose folder already holds
a finished run is refused (choose a new ``--out``); the base's scores are cached under ``OUT/scores`` and
reused only for the same base folder, protocol and metrics. The objective is driven
directly (not through ``train()``), so the numbers measure the method, not the loop.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

ORACLES = ("toy_shape", "toy_color", "toy_position", "toy_oracle", "toy_aesthetic")


RF_METHODS = ["refl", "draft_lv", "draft_k", "alignprop"]
METHODS = ["nft", "grpo", "ddpo", *RF_METHODS]


def build_objective(method: str, args: argparse.Namespace):
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
    from diffalign.objectives.reward_feedback import AlignProp, DRaFT, ReFL

    chain = {"steps": args.rollout_steps, "guidance_scale": args.guidance, "beta_kl": args.kl}
    if method == "refl":  # one random step in [k_lo, k_hi] of the chain carries the gradient (10 steps: 3..7)
        lo = min(max(0, round(0.3 * args.rollout_steps)), args.rollout_steps - 1)
        hi = min(max(lo, round(0.7 * args.rollout_steps)), args.rollout_steps - 1)
        return ReFL(k_lo=lo, k_hi=hi, **chain)
    if method == "draft_lv":  # DRaFT-LV, n = 2 re-noised copies of the last step (the paper's setting)
        return DRaFT(k=1, lv_copies=2, **chain)
    if method == "draft_k":  # DRaFT-K, the last K = 1 step
        return DRaFT(k=1, lv_copies=0, **chain)
    if method == "alignprop":  # random truncation, every step of it checkpointed
        return AlignProp(**chain)
    raise ValueError(method)


def base_scores(base_dir: Path, proto, rs: dict, path: Path, desc: str) -> dict[str, torch.Tensor]:
    """The base model's per-sample scores on ``proto``, cached at ``path`` with a sidecar ``.json`` naming the
    base folder, the protocol and the metrics: a cache made for another base, protocol or metric set is
    scored again, never reused."""
    from diffalign.backbones import load_backbone
    from diffalign.bench import precise

    meta = {"base_dir": str(base_dir.resolve()), "protocol": proto.as_dict(), "metrics": sorted(rs)}
    side = path.with_suffix(".json")
    if path.is_file() and side.is_file() and json.loads(side.read_text()) == meta:
        return torch.load(path, weights_only=True)
    s = precise.sample_scores(load_backbone(base_dir), proto, rs, desc=desc)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(s, path)
    side.write_text(json.dumps(meta))
    return s


def run(args: argparse.Namespace, seed: int, rs: dict, base: dict, base_curve: dict | None) -> dict:
    from diffalign.backbones import load_backbone
    from diffalign.backbones.lora import add_lora, save_lora
    from diffalign.bench import precise
    from diffalign.toyworld import shapes

    run_dir = Path(args.out) / f"{args.method}_seed{seed}"
    run_dir.mkdir(parents=True, exist_ok=True)  # main() refused a folder that holds a finished run
    torch.manual_seed(seed)
    bb = load_backbone(Path(args.base_dir) / args.base)
    add_lora(bb, rank=args.rank, targets=_targets(args.lora_targets))
    obj = build_objective(args.method, args)
    obj.setup(bb, reward=rs[args.reward])
    params = bb.trainable_parameters()
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-4)
    pool = shapes.prompt_mix("train", args.train_prompts, args.two_object, seed)
    g = torch.Generator().manual_seed(seed)
    proto = precise.Protocol(prompts=args.eval_prompts, seeds=args.eval_seeds)
    curve_proto = precise.Protocol(prompts=args.curve_prompts, seeds=args.curve_seeds)
    curve_metrics = sorted({args.target, args.reward, args.gold, "toy_oracle"})
    t0, cpu, eval_cpu = time.time(), 0.0, 0.0
    rewards_log, curve, step = [], [], 0
    best: tuple[float, int, dict] | None = None
    stopped = False
    next_curve = args.curve_every_min
    if base_curve is not None:
        curve.append({"step": 0, "cpu_min": 0.0, **{m: float(base_curve[m].mean()) for m in curve_metrics}})
        best = (curve[0][args.gold], 0, {})
    c0 = time.process_time()

    def budget_left() -> bool:
        return (step < args.updates) if args.updates else (cpu < args.minutes * 60)

    while budget_left():
        idx = torch.randint(len(pool), (args.batch,), generator=g).tolist()
        prompts = [pool[i] for i in idx]
        loss, m = obj.loss({"prompts": prompts, "cond": bb.encode_prompts(prompts)}, bb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        obj.on_update(bb)
        step += 1
        cpu = time.process_time() - c0 - eval_cpu
        r_step = m.get("reward_mean", m.get("reward"))  # a rollout's mean (policy optimisation) or the chain's
        if r_step is not None:
            rewards_log.append({"step": step, "cpu_s": round(cpu, 1), "reward": round(float(r_step), 4)})
            if len(rewards_log) % 10 == 0:
                recent = sum(r["reward"] for r in rewards_log[-10:]) / 10
                print(f"seed {seed} step {step} cpu {cpu:.0f}s wall {time.time() - t0:.0f}s train reward "
                      f"(mean of the last 10 logged) {recent:.3f}", flush=True)
        if base_curve is not None and cpu >= next_curve * 60:
            e0 = time.process_time()
            sc = precise.sample_scores(bb, curve_proto, {k: rs[k] for k in curve_metrics})
            point = {"step": step, "cpu_min": round(cpu / 60, 3), **{k: float(sc[k].mean()) for k in curve_metrics}}
            curve.append(point)
            print(f"seed {seed} curve {point}", flush=True)
            if point[args.gold] > best[0]:
                best = (point[args.gold], step, _lora_copy(bb))
            elif args.early_stop_drop is not None and point[args.gold] < best[0] - args.early_stop_drop:
                print(f"seed {seed}: early stop at step {step}: {args.gold} {point[args.gold]:.3f} fell more than "
                      f"{args.early_stop_drop} below its best {best[0]:.3f} (step {best[1]}); evaluating the best",
                      flush=True)
                stopped = True
            next_curve += args.curve_every_min
            eval_cpu += time.process_time() - e0
            if stopped:
                break
    train_s, wall_s = cpu, time.time() - t0
    kept_step = step
    if stopped and best is not None:
        kept_step = best[1]
        _lora_restore(bb, best[2])
    save_lora(bb, run_dir / "lora")
    tuned = precise.sample_scores(bb, proto, rs, desc=f"seed {seed}")
    torch.save(tuned, run_dir / "scores.pt")
    out = {"method": args.method, "base": args.base, "seed": seed, "reward": args.reward, "updates": step,
           "kept_step": kept_step, "early_stopped": stopped, "rollouts": getattr(obj, "rollouts", step),
           "train_cpu_min": round(train_s / 60, 3), "train_wall_min": round(wall_s / 60, 2),
           "rewards": rewards_log, "curve": curve, "n_eval": proto.n}
    out["gains"] = precise.gains(base, [tuned])
    out["target_by_scene"] = precise.gain_by_scene(base[args.target], [tuned[args.target]], proto)
    out["target_gain_per_cpu_min"] = round(out["gains"][args.target]["mean"] / max(train_s / 60, 1e-9), 4)
    (run_dir / "result.json").write_text(json.dumps(out, indent=1))
    return out


TARGETS = {
    "attn": ("to_q", "to_k", "to_v", "to_out.0"),
    "all": ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out", "conv1", "conv2"),
}


def _targets(spec: str) -> tuple[str, ...]:
    return TARGETS.get(spec) or tuple(x for x in spec.split(",") if x)


def _lora_copy(bb) -> dict[str, torch.Tensor]:
    from diffalign.backbones.modules import unwrap

    return {n: p.detach().clone() for n, p in unwrap(bb.denoiser).named_parameters() if ".default." in n}


@torch.no_grad()
def _lora_restore(bb, state: dict[str, torch.Tensor]) -> None:
    from diffalign.backbones.modules import unwrap

    if not state:  # the best point was the base itself: zero the adapter's B (LoRA with B = 0 is the base)
        for n, p in unwrap(bb.denoiser).named_parameters():
            if ".default." in n and "lora_B" in n:
                p.zero_()
        return
    params = dict(unwrap(bb.denoiser).named_parameters())
    for n, v in state.items():
        params[n].copy_(v)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", choices=["sd", "sd3", "sd_pos"], default="sd")
    p.add_argument("--base-dir", default="diffalign/toyworld/base")
    p.add_argument("--method", choices=METHODS, default="nft",
                   help="nft, grpo, ddpo (policy optimisation, any reward) or refl, draft_lv, draft_k, alignprop "
                        "(reward feedback: the reward must be differentiable, e.g. toy_shape_soft)")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--minutes", type=float, default=8.0, help="training budget per run in CPU minutes of this process")
    p.add_argument("--updates", type=int, default=0, help="train this many updates instead of --minutes")
    p.add_argument("--reward", default="toy_shape", help="training reward (a toy reward name)")
    p.add_argument("--target", default="toy_shape", help="metric of the table's gain and the curve")
    p.add_argument("--gold", default="toy_shape", help="the early stop's metric")
    p.add_argument("--early-stop-drop", type=float, default=None,
                   help="stop when --gold on the curve falls more than this below its best point (needs --curve-every-min)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--rank", type=int, default=8, help="LoRA rank")
    p.add_argument("--lora-targets", default="attn",
                   help="denoiser modules with LoRA layers: 'attn' (to_q,to_k,to_v,to_out.0, the loop's default), "
                        "'all' (attention, feed-forward, transformer projections and resnet convolutions) or a "
                        "comma-separated list of module names")
    p.add_argument("--batch", type=int, default=8, help="prompts per rollout")
    p.add_argument("--group", type=int, default=4, help="samples per prompt")
    p.add_argument("--rollout-steps", type=int, default=10, help="steps of a rollout (reward feedback: of the chain)")
    p.add_argument("--timestep-fraction", type=float, default=0.5)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--kl", type=float, default=0.0,
                   help="KL weight to the reference (nft, grpo: kl_beta; reward feedback: beta_kl; ddpo: unused)")
    p.add_argument("--clip-range", type=float, default=1e-3)
    p.add_argument("--nft-beta", type=float, default=1.0)
    p.add_argument("--decay-rate", type=float, default=0.001)
    p.add_argument("--decay-max", type=float, default=0.5)
    p.add_argument("--train-prompts", type=int, default=512)
    p.add_argument("--two-object", type=float, default=0.5, help="fraction of two-object train prompts")
    p.add_argument("--eval-prompts", type=int, default=256)
    p.add_argument("--eval-seeds", type=int, default=4)
    p.add_argument("--curve-every-min", type=float, default=0.0, help="score the curve protocol every M CPU minutes")
    p.add_argument("--curve-prompts", type=int, default=64)
    p.add_argument("--curve-seeds", type=int, default=4)
    p.add_argument("--out", default="runs/online_rl")
    args = p.parse_args()
    for flag in ("minutes", "lr", "rank", "batch", "group", "rollout_steps", "train_prompts", "eval_prompts", "eval_seeds",
                 "curve_prompts", "curve_seeds"):
        if getattr(args, flag) <= 0:
            p.error(f"--{flag.replace('_', '-')} must be positive (got {getattr(args, flag)})")
    for flag in ("updates", "curve_every_min", "early_stop_drop"):
        v = getattr(args, flag)
        if v is not None and v < 0:
            p.error(f"--{flag.replace('_', '-')} must not be negative (got {v})")
    if not _targets(args.lora_targets):
        p.error(f"--lora-targets: {args.lora_targets!r} names no module")
    if not 0 <= args.two_object <= 1:
        p.error(f"--two-object is a fraction in [0, 1] (got {args.two_object})")
    if args.early_stop_drop is not None and args.curve_every_min <= 0:
        p.error("--early-stop-drop needs --curve-every-min (the early stop reads the curve)")
    try:
        seeds = [int(x) for x in args.seeds.split(",") if x]
    except ValueError:
        p.error(f"--seeds: {args.seeds!r} is not a comma-separated list of integers")
    base_dir = Path(args.base_dir) / args.base
    if not (base_dir / "model_index.json").is_file():
        p.error(f"--base-dir/--base: {base_dir} is not a pipeline folder (no model_index.json)")
    done = [Path(args.out) / f"{args.method}_seed{s}" for s in seeds
            if (Path(args.out) / f"{args.method}_seed{s}" / "result.json").is_file()]
    if done:
        p.error(f"--out {args.out}: {', '.join(map(str, done))} already holds a finished run; choose a new --out "
                "(results are never overwritten or mixed)")
    torch.set_num_threads(1)
    from diffalign.backbones import load_backbone
    from diffalign.backbones.modules import unwrap
    from diffalign.bench import precise
    from diffalign.bench.experiment import load_rewards

    modules = [n for n, _ in unwrap(load_backbone(base_dir).denoiser).named_modules()]
    missing = [x for x in _targets(args.lora_targets) if not any(n == x or n.endswith("." + x) for n in modules)]
    if args.lora_targets in TARGETS:  # the presets name every family's layers: at least one must be there
        missing = missing if len(missing) == len(_targets(args.lora_targets)) else []
    if missing:  # peft would skip a name that matches nothing, and the adapter would silently cover less
        p.error(f"--lora-targets: {', '.join(missing)} matches no module of {base_dir}'s denoiser")
    names = sorted({*ORACLES, args.reward, args.target, args.gold})
    try:
        rs = load_rewards(names)
    except Exception as e:  # noqa: BLE001 - name the flag whose reward failed to load
        p.error(f"--reward/--target/--gold: {e}")
    if args.method in RF_METHODS and not getattr(rs[args.reward], "differentiable", True):
        p.error(f"--method {args.method} backpropagates the reward, but --reward {args.reward} is not differentiable "
                "(use e.g. toy_shape_soft, or a policy-optimisation method)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    proto = precise.Protocol(prompts=args.eval_prompts, seeds=args.eval_seeds)
    base = base_scores(base_dir, proto, rs, out / "scores" / f"base_{args.base}_{proto.prompts}x{proto.seeds}.pt", "base")
    base_curve = None
    if args.curve_every_min > 0:
        cp = precise.Protocol(prompts=args.curve_prompts, seeds=args.curve_seeds)
        base_curve = base_scores(base_dir, cp, rs, out / "scores" / f"base_curve_{args.base}_{cp.prompts}x{cp.seeds}.pt",
                                 "base (curve)")
    for s in seeds:
        res = run(args, s, rs, base, base_curve)
        res["args"] = {k: v for k, v in vars(args).items() if k not in ("seeds", "out")}
        with (out / "results.jsonl").open("a") as f:
            f.write(json.dumps(res) + "\n")
        g = res["gains"]
        print(f"{args.method} {args.base} seed {s} (reward {args.reward}): {res['updates']} updates, "
              f"{res['train_cpu_min']} CPU min; " + ", ".join(f"{k} {precise.fmt_gain(g[k])}" for k in ORACLES)
              + f"; {args.target} one-object {precise.fmt_gain(res['target_by_scene']['1 object'])}, two-object "
              f"{precise.fmt_gain(res['target_by_scene']['2 objects'])}", flush=True)


if __name__ == "__main__":
    main()
