"""The ``diffalign`` command: train, cache, score, sample, tiny."""

from __future__ import annotations

import argparse
import logging
import sys


def _train(args: argparse.Namespace, overrides: list[str]) -> int:
    """Exit status: 0 done; 2 bad input (config, data, checkpoint); 3 stopped by non-finite steps;
    128 + signal number when SIGINT/SIGTERM stopped the run after saving a checkpoint (130, 143)."""
    import signal

    from .config import load_config
    from .training import train
    from .training.checkpoints import CheckpointError
    from .training.loop import LaunchError, NonFiniteError, cpu_processes_requested

    cfg = load_config(args.config, overrides)
    n = cpu_processes_requested()
    if n:
        return _relaunch_on_cpu(n, args.argv)
    try:
        result = train(cfg, resume=args.resume)
    except NonFiniteError as e:
        print(f"diffalign train: stopped: {e}", file=sys.stderr)
        return 3
    except (CheckpointError, FileExistsError, LaunchError) as e:
        print(f"diffalign train: error: {e}", file=sys.stderr)
        return 2
    if not result.get("main_process", True):
        return 128 + signal.Signals[result["signal"]].value if result.get("status") == "interrupted" else 0
    if result.get("status") == "interrupted":
        sig = result["signal"]
        where = result.get("checkpoint")
        saved = f"checkpoint saved: {where}" if where else "nothing to save yet (no step was taken)"
        again, skip = [], False
        for a in args.argv:  # the same command line, with --resume latest
            if skip or a == "--resume" or a.startswith("--resume="):
                skip = a == "--resume"
                continue
            again.append(a)
        print(f"interrupted by {sig} at step {result['step']}/{cfg.train.steps}; {saved}\n"
              f"  continue with: diffalign {' '.join(again)} --resume latest", file=sys.stderr)
        return 128 + signal.Signals[sig].value
    m = result.get("metrics", {})
    print(f"done: step {result['step']}", " ".join(f"{k}={v:.4g}" for k, v in m.items() if isinstance(v, float)))
    for key in ("weights", "checkpoint", "samples"):
        if result.get(key):
            print(f"  {key}: {result[key]}")
    data = result.get("data") or {}
    if data.get("skipped_rows") or data.get("skipped_at_load"):
        print(f"  data: skipped {data['skipped_rows']} bad row(s) when reading ({data['skipped_by_reason']}) and "
              f"{data['skipped_at_load']} unloadable item(s) while training")
    if result.get("skipped_steps"):
        print(f"  non-finite steps skipped: {result['skipped_steps']}")
    return 0


def _relaunch_on_cpu(n: int, argv: list[str]) -> int:
    """``accelerate launch --cpu --num_processes N`` starts one process; start the N that were asked
    for with torchrun (each one then sets accelerate up for CPU with gloo) and wait for them."""
    import os

    from torch.distributed.run import main as torchrun

    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    module = spec.name if spec is not None and spec.name.startswith("diffalign") else "diffalign.cli"
    print(f"diffalign train: `accelerate launch --cpu` started one process; starting {n} CPU processes "
          "with torchrun (gloo)", file=sys.stderr)
    os.environ["ACCELERATE_USE_CPU"] = "true"
    try:
        torchrun(["--standalone", "--nproc_per_node", str(n), "-m", module, *argv])
    except SystemExit as e:
        return int(e.code or 0)
    except Exception as e:  # torchrun's ChildFailedError: the workers' own messages are above
        print(f"diffalign train: error: {type(e).__name__}: {str(e)[:2000]}", file=sys.stderr)
        return 1
    return 0


def _tiny(args: argparse.Namespace, _: list[str]) -> int:
    from .backbones.tiny import save_tiny

    print(save_tiny(args.family, args.out, seed=args.seed))
    return 0


def _sample(args: argparse.Namespace, _: list[str]) -> int:
    from .api import sample

    prompts = _read_prompts(args.prompts)
    modes = args.guidance.split("+")
    if "rlg" in modes and not args.lora:
        raise ValueError("--guidance rlg needs --lora DIR: RL guidance mixes the model with its LoRA disabled "
                         "(base) and enabled (tuned)")
    if "reward" in modes and not args.reward:
        raise ValueError("--guidance reward needs --reward NAME=PATH (a differentiable reward or Ensemble)")
    if (args.best_of > 1 or args.reject_below is not None) and not args.reward:
        raise ValueError("--best-of / --reject-below need --reward NAME=PATH to select by")
    out = sample(
        args.model, prompts, lora=args.lora, steps=args.steps, guidance_scale=args.guidance_scale,
        negative_prompt=args.negative_prompt, seed=args.seed, images_per_prompt=args.images_per_prompt,
        size=args.size, batch_size=args.batch_size, scheduler=args.scheduler, guidance=args.guidance,
        rlg_scale=args.rlg_scale, rlg_mode=args.rlg_mode, zero_init_step=args.zero_init_step,
        rlg_batched=not args.rlg_sequential, reward=args.reward, reward_scale=args.reward_scale,
        reward_schedule=args.reward_schedule, reward_normalize=args.reward_normalize, best_of=args.best_of,
        reject_below=args.reject_below, device=args.device, dtype=args.dtype, progress=not args.no_progress,
    )
    cli = {k: v for k, v in vars(args).items() if k not in ("func", "allow_overrides")}
    path = out.save(args.out, extra_settings={"prompts_source": args.prompts, "cli": cli})
    per = out.settings["seconds_per_image"]
    print(f"{len(out)} images in {path} (grid.png, settings.json); {per:.3g} s per image")
    return 0


def _read_prompts(spec: str) -> list[str]:
    from pathlib import Path

    p = Path(spec)
    if p.is_file():
        lines = [ln.strip() for ln in p.read_text().splitlines() if ln.strip()]
        if not lines:
            raise ValueError(f"{p}: no prompts (one per line)")
        return lines
    return [spec]


def _score(args: argparse.Namespace, _: list[str]) -> int:
    from rewards import score_cli

    return int(score_cli.run(args) or 0)


def _cache(args: argparse.Namespace, _: list[str]) -> int:
    from .data.cache import cache_main

    return int(cache_main(args) or 0)


def _tiny_pairs(args: argparse.Namespace, _: list[str]) -> int:
    from .data.synthetic import write_rendered_pairs

    print(write_rendered_pairs(args.out, n=args.n, seed=args.seed))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="diffalign", description="Align text-to-image diffusion and flow models.")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="fine-tune from a YAML config; extra --section.key VALUE overrides")
    t.add_argument("config")
    t.add_argument("--resume", default=None,
                   help="'latest' (error if none), 'auto' (latest if any, else start) or a checkpoint folder")
    t.set_defaults(func=_train, allow_overrides=True)

    c = sub.add_parser("cache", help="encode a pair data set into a latent + text-embedding cache")
    try:
        from .data.cache import add_cache_arguments

        add_cache_arguments(c)
    except ImportError:  # pragma: no cover
        pass
    c.set_defaults(func=_cache)

    s = sub.add_parser("sample", help="generate images (CFG, RL guidance, reward guidance, best-of-N)")
    s.add_argument("--model", required=True, help="diffusers pipeline folder")
    s.add_argument("--lora", default=None, help="LoRA folder (pytorch_lora_weights.safetensors)")
    s.add_argument("--prompts", required=True, help="a text file (one prompt per line) or a prompt")
    s.add_argument("--out", required=True, help="folder for the PNGs, grid.png and settings.json")
    s.add_argument("--negative-prompt", default="")
    s.add_argument("--steps", type=int, default=30)
    s.add_argument("--guidance-scale", type=float, default=7.5, help="CFG scale (FLUX-dev: the guidance embedding)")
    s.add_argument("--seed", type=int, default=0, help="image i uses seed + i")
    s.add_argument("--size", type=int, default=None, help="image side in pixels (default: the model's)")
    s.add_argument("--batch-size", type=int, default=4)
    s.add_argument("--images-per-prompt", type=int, default=1)
    s.add_argument("--scheduler", default=None, help="ddim, dpm++, euler, euler_a, unipc, flow_euler, ... or a "
                   "diffusers class name (default: the model's)")
    s.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    s.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"])
    s.add_argument("--guidance", default="cfg", choices=["cfg", "rlg", "reward", "rlg+reward"])
    s.add_argument("--rlg-scale", type=float, default=1.0, help="RLG weight w: 0 base, 1 tuned, >1 extrapolates")
    s.add_argument("--rlg-mode", default="exact", choices=["exact", "approx"],
                   help="exact: (1-w) base + w tuned; approx: the LoRA scaled by w (half the model calls)")
    s.add_argument("--zero-init-step", type=int, default=0, help="first K model calls use the tuned model alone")
    s.add_argument("--rlg-sequential", action="store_true", help="run base and tuned as two forwards (less memory)")
    s.add_argument("--reward", default=None, help="NAME, NAME=PATH or NAME=PATH:W,NAME:W (an Ensemble)")
    s.add_argument("--reward-scale", type=float, default=1.0, help="reward-gradient step on the predicted x0")
    s.add_argument("--reward-schedule", default="constant", choices=["constant", "increasing", "decreasing"],
                   help="weight over the noise level sigma: 1, 1 - sigma, sigma")
    s.add_argument("--reward-normalize", action="store_true", help="scale the reward gradient to unit RMS per image")
    s.add_argument("--best-of", type=int, default=1, help="keep the best of N candidates per prompt by --reward")
    s.add_argument("--reject-below", type=float, default=None,
                   help="rejection sampling: stop at the first candidate scoring >= this (at most --best-of)")
    s.add_argument("--no-progress", action="store_true")
    s.set_defaults(func=_sample)

    sc = sub.add_parser("score", help="score images with reward models into a CSV")
    try:
        from rewards import score_cli

        score_cli.add_arguments(sc)
    except ImportError:  # the rewards CLI module is optional at import time
        pass
    sc.set_defaults(func=_score)

    ty = sub.add_parser("tiny", help="build and save a tiny offline pipeline (sd15, sd2v, sdxl, sd3, flux)")
    ty.add_argument("family")
    ty.add_argument("out")
    ty.add_argument("--seed", type=int, default=0)
    ty.set_defaults(func=_tiny)

    tp = sub.add_parser("tiny-pairs", help="render toy preference pairs (right colour beats wrong colour)")
    tp.add_argument("out")
    tp.add_argument("--n", type=int, default=64)
    tp.add_argument("--seed", type=int, default=0)
    tp.set_defaults(func=_tiny_pairs)

    from .data.relabel import add_relabel_parsers
    from .toyworld.cli import add_bench_parser, add_toyworld_parser

    add_relabel_parsers(sub)

    add_toyworld_parser(sub)
    add_bench_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args, rest = parser.parse_known_args(argv)
    args.argv = argv
    if rest and not getattr(args, "allow_overrides", False):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from .config import ConfigError

    try:
        return args.func(args, rest)
    except (ConfigError, FileNotFoundError, ValueError, KeyError) as e:
        print(f"diffalign {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
