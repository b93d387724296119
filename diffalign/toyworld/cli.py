"""``diffalign toyworld build|pairs`` and ``diffalign bench alignment``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

DEFAULT_BASE = Path("runs/toyworld_base")


def parse_reward(spec: str, clip_path: str | None = None) -> Any:
    """``toy_color`` or ``toy_color:1,toy_aesthetic:0.5`` (a weighted Ensemble); a member may name its
    weights as ``NAME=PATH`` (``pickscore=models/ps:1,aesthetic=models/aes.pth:0.5``); ``toy_clip``
    without a path reads ``clip_path``."""
    import rewards
    from rewards.ensemble import Ensemble

    parts = [p.strip() for p in spec.split(",") if p.strip()]
    if not parts:
        raise ValueError("--reward: empty")
    members, weights, weighted = {}, {}, False
    for p in parts:
        head, sep, w = p.rpartition(":")
        try:
            weight = float(w) if sep else None
        except ValueError:  # a ':' inside a path, not a weight
            weight = None
        weighted |= weight is not None
        name, _, path = (p if weight is None else head).partition("=")
        members[name] = rewards.load(name, path=path or (clip_path if name == "toy_clip" else None))
        weights[name] = 1.0 if weight is None else weight
    if len(members) == 1 and not weighted:
        return next(iter(members.values()))
    return Ensemble(members, weights)


def find_base(base: str | Path | None = None) -> Path:
    """The toy base folder: the given one, else runs/toyworld_base, else the copy shipped in the package."""
    for cand in [base, DEFAULT_BASE, Path(__file__).parent / "base"]:
        if cand and (Path(cand) / "sd" / "model_index.json").is_file():
            return Path(cand)
    raise FileNotFoundError(
        f"no toy base found ({base or DEFAULT_BASE}); build it with `diffalign toyworld build --out {DEFAULT_BASE}`"
    )


def _build(args: argparse.Namespace) -> int:
    from .pretrain import build_toyworld

    report = build_toyworld(args.out, seed=args.seed)
    print(json.dumps(report, indent=2))
    return 0


def _pairs(args: argparse.Namespace) -> int:
    from ..backbones import load_backbone
    from . import shapes
    from .experiment import make_pairs

    model = Path(args.model) if args.model else find_base() / "sd"
    bb = load_backbone(model)
    prompts = shapes.prompts("train", n=args.prompts, seed=args.seed)
    reward = parse_reward(args.reward, args.clip)
    stats = make_pairs(bb, prompts, reward, args.out, k=args.k, seed=args.seed, steps=args.steps,
                       guidance_scale=args.guidance, tie_margin=args.tie_margin, noise=args.noise)
    print(json.dumps(stats, indent=2))
    return 0


def _bench(args: argparse.Namespace) -> int:
    from . import shapes
    from .alignment import bench_alignment
    from .experiment import make_pairs

    base = find_base(args.base)
    out = Path(args.out)
    pairs = Path(args.pairs) if args.pairs else out / "pairs"
    if not args.pairs and not (pairs / "pairs.jsonl").exists():
        from ..backbones import load_backbone

        make_pairs(load_backbone(base / "sd"), shapes.prompts("train", n=args.pair_prompts, seed=args.pair_seed),
                   parse_reward(args.reward, args.clip), pairs, k=args.k, seed=args.pair_seed)
    objectives = [o.strip() for o in args.objectives.split(",")]
    experts = None
    if "dro" in objectives:
        from .alignment import toy_experts

        experts = toy_experts(pairs, parse_reward(args.reward, args.clip))
    res = bench_alignment(
        base / "sd", pairs / "pairs.jsonl", objectives, args.seeds, out,
        shapes.eval_prompts(args.eval_prompts, seed=1), target=args.target, steps=args.steps,
        batch_size=args.batch_size, lr=args.lr, eval_seeds=args.eval_seeds, clip_path=args.clip,
        curve_every=args.curve_every, experts=experts,
    )
    print((out / "results.md").read_text())
    print(f"results: {out / 'results.json'}, plot: {out / 'results.png'}")
    return 0 if res else 1


def add_toyworld_parser(sub: Any) -> None:
    tw = sub.add_parser("toyworld", help="the embedded toy world: build the base models, sample pairs")
    tsub = tw.add_subparsers(dest="toy_command", required=True)
    b = tsub.add_parser("build", help="pretrain the toy SD and flow base models (CPU, minutes)")
    b.add_argument("--out", default=str(DEFAULT_BASE))
    b.add_argument("--seed", type=int, default=0)
    b.set_defaults(func=lambda a, _: _build(a))
    p = tsub.add_parser("pairs", help="sample k images per prompt from a model, label best vs worst by a reward")
    p.add_argument("--model", default=None, help="diffusers folder (default: the toy SD base)")
    p.add_argument("--reward", default="toy_shape", help="NAME or NAME:W,NAME:W (an Ensemble)")
    p.add_argument("--clip", default=None, help="toy CLIP folder for toy_clip")
    p.add_argument("--out", required=True)
    p.add_argument("--prompts", type=int, default=512, help="number of train-split prompts")
    p.add_argument("--k", type=int, default=4, help="images per prompt (also written as a k-way ranking)")
    p.add_argument("--noise", type=float, default=0.0, help="label flip probability")
    p.add_argument("--tie-margin", type=float, default=0.0)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=lambda a, _: _pairs(a))


def add_bench_parser(sub: Any) -> None:
    bp = sub.add_parser("bench", help="benchmarks")
    bsub = bp.add_subparsers(dest="bench_command", required=True)
    a = bsub.add_parser("alignment", help="objectives side by side in the toy world, over seeds")
    a.add_argument("--objectives", default="dpo")
    a.add_argument("--seeds", type=int, default=3)
    a.add_argument("--out", required=True)
    a.add_argument("--base", default=None)
    a.add_argument("--pairs", default=None, help="a pairs folder (default: sampled into OUT/pairs)")
    a.add_argument("--reward", default="toy_shape", help="labelling reward for the pairs")
    a.add_argument("--target", default="toy_shape", help="the metric the labelling reward targets")
    a.add_argument("--clip", default=None)
    a.add_argument("--pair-prompts", type=int, default=1024)
    a.add_argument("--pair-seed", type=int, default=0, help="seed of the pair sample (prompts and images)")
    a.add_argument("--k", type=int, default=4)
    a.add_argument("--steps", type=int, default=400)
    a.add_argument("--curve-every", type=int, default=0,
                   help="score a checkpoint every N steps: steps to reach the first objective's final gain")
    a.add_argument("--batch-size", type=int, default=16)
    a.add_argument("--lr", type=float, default=None, help="LoRA learning rate (default: each objective's TOY_LR)")
    a.add_argument("--eval-prompts", type=int, default=96)
    a.add_argument("--eval-seeds", type=int, default=2)
    a.set_defaults(func=lambda a, _: _bench(a))
