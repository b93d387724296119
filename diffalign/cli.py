"""The ``diffalign`` command. Every sub-command's flags are declared here (argument parsing lives in this
file only); the handlers call the library."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any


def _train(args: argparse.Namespace, overrides: list[str]) -> int:
    """Exit status: 0 done; 2 bad input (config, data, checkpoint); 3 stopped by non-finite steps;
    128 + signal number when SIGINT/SIGTERM stopped the run after saving a checkpoint (130, 143)."""
    import signal

    from .config import load_config
    from .data.cache import CacheError
    from .training import train
    from .training.checkpoints import CheckpointError
    from .training.launch import LaunchError, cpu_processes_requested
    from .training.loop import NonFiniteError
    from .training.runfolder import RunFolderError

    cfg = load_config(args.config, overrides)
    n = cpu_processes_requested()
    if n:
        return _relaunch_on_cpu(n, args.argv)
    try:
        result = train(cfg, resume=args.resume, overwrite=args.overwrite, allow_config_change=args.allow_config_change)
    except NonFiniteError as e:
        print(f"diffalign train: stopped: {e}", file=sys.stderr)
        return 3
    except (CheckpointError, FileExistsError, LaunchError, RunFolderError, CacheError) as e:
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
    if result.get("already_complete"):
        print(f"already complete: {cfg.train.output_dir} finished at step {result['step']}; nothing was trained "
              "or rewritten (raise --train.steps to train further)")
    m = result.get("metrics", {})
    print(f"done: step {result['step']}", " ".join(f"{k}={v:.4g}" for k, v in m.items() if isinstance(v, float)))
    for key in ("weights", "checkpoint", "samples"):
        if result.get(key):
            print(f"  {key}: {result[key]}")
    data = result.get("data") or {}
    if data.get("skipped_rows") or data.get("skipped_at_load"):
        print(f"  data: skipped {data['skipped_rows']} bad row(s) when reading ({data['skipped_by_reason']}) and "
              f"{data['skipped_at_load']} unloadable item(s) while training")
    if data.get("warnings"):
        print(f"  data warnings (rows kept): {data['warnings']}")
    if result.get("skipped_steps"):
        print(f"  non-finite steps skipped: {result['skipped_steps']}")
    return 0


def _config(args: argparse.Namespace, _: list[str]) -> int:
    from .configdoc import format_keys

    print(format_keys(), end="")
    return 0


def _relaunch_on_cpu(n: int, argv: list[str]) -> int:
    """``accelerate launch --cpu --num_processes N`` starts one process; start the N that were asked
    for with torchrun (each one then sets accelerate up for CPU with gloo) and wait for them."""
    import os

    from torch.distributed.run import main as torchrun

    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    module = spec.name if spec is not None else "diffalign.cli"  # `python -m M` relaunches M (e.g. tests.faults)
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
    for flag, value, mode in (("--rlg-scale", args.rlg_scale, "rlg"), ("--reward-scale", args.reward_scale, "reward")):
        if value is not None and mode not in modes:
            raise ValueError(f"{flag} is used only with --guidance {mode} (or rlg+reward); --guidance is {args.guidance!r}")
    if args.size is not None and args.size <= 0:
        raise ValueError(f"--size {args.size}: must be a positive number of pixels")
    out_dir = _sample_out(args.out, args.overwrite)
    if "rlg" in modes and not args.lora:
        raise ValueError("--guidance rlg needs --lora DIR: RL guidance mixes the model with its LoRA disabled "
                         "(base) and enabled (tuned)")
    if "reward" in modes and not args.reward:
        raise ValueError("--guidance reward needs --reward NAME=PATH (a differentiable reward or Ensemble)")
    if (args.best_of > 1 or args.reject_below is not None) and not args.reward:
        raise ValueError("--best-of / --reject-below need --reward NAME=PATH to select by")
    model, lora, ctx = _personalized_model(args)
    with ctx:
        out = sample(
            model, prompts, lora=lora, steps=args.steps, guidance_scale=args.guidance_scale,
            negative_prompt=args.negative_prompt, seed=args.seed, images_per_prompt=args.images_per_prompt,
            size=args.size, batch_size=args.batch_size, scheduler=args.scheduler, guidance=args.guidance,
            rlg_scale=1.0 if args.rlg_scale is None else args.rlg_scale, rlg_mode=args.rlg_mode,
            zero_init_step=args.zero_init_step, rlg_batched=not args.rlg_sequential, reward=args.reward,
            reward_scale=1.0 if args.reward_scale is None else args.reward_scale,
            reward_schedule=args.reward_schedule, reward_normalize=args.reward_normalize, best_of=args.best_of,
            reject_below=args.reject_below, device=args.device, dtype=args.dtype, progress=not args.no_progress,
        )
    cli = {k: v for k, v in vars(args).items() if k not in ("func", "allow_overrides")}
    for old in (*out_dir.glob("*.png"), out_dir / "settings.json"):  # --overwrite: the earlier images go
        old.unlink(missing_ok=True)
    path = out.save(args.out, extra_settings={"prompts_source": args.prompts, "cli": cli})
    per = out.settings["seconds_per_image"]
    print(f"{len(out)} images in {path} (grid.png, settings.json); {per:.3g} s per image")
    return 0


def _sample_out(out: str, overwrite: bool) -> Any:
    """The --out folder, checked before sampling: writable, and holding no earlier images unless --overwrite."""
    from pathlib import Path

    d = Path(out)
    if d.exists() and not d.is_dir():
        raise ValueError(f"--out {d}: is a file; name a folder for the PNGs, grid.png and settings.json")
    old = sorted(d.glob("*.png")) if d.is_dir() else []
    if old and not overwrite:
        raise FileExistsError(f"--out {d}: already holds {len(old)} PNG file(s) of an earlier run; pass --overwrite "
                              "to replace them, or choose another folder")
    try:
        d.mkdir(parents=True, exist_ok=True)
        probe = d / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ValueError(f"--out {d}: cannot write there ({type(e).__name__}: {e})") from None
    return d


PROMPT_FILE_SUFFIXES = (".txt", ".jsonl", ".json", ".csv", ".tsv")


def _read_prompts(spec: str) -> list[str]:
    from pathlib import Path

    p = Path(spec)
    if p.is_file():
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"--prompts {p}: not UTF-8 text (byte offset {e.start}); save it as UTF-8") from None
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        if not lines:
            raise ValueError(f"{p}: no prompts (one per line)")
        return lines
    if spec.lower().endswith(PROMPT_FILE_SUFFIXES) or ("/" in spec and not any(c.isspace() for c in spec)):
        raise FileNotFoundError(f"--prompts {spec}: no such file (a path, not a prompt; give an existing text file "
                                "with one prompt per line, or the prompt itself)")
    return [spec]


def _score(args: argparse.Namespace, _: list[str]) -> int:
    from rewards import score_cli

    return int(score_cli.run(args) or 0)


def _cache(args: argparse.Namespace, _: list[str]) -> int:
    from .data.cache import cache_main

    return int(cache_main(args) or 0)


def _tiny_pairs(args: argparse.Namespace, _: list[str]) -> int:
    from .data.synthetic import write_rendered_pairs

    print(write_rendered_pairs(args.out, n=args.n, seed=args.seed, overwrite=args.overwrite))
    return 0


def _relabel(args: argparse.Namespace, _: list[str]) -> int:
    import json

    import rewards

    from .data.relabel import relabel_pairs

    summary = relabel_pairs(args.pairs, rewards.from_spec(args.reward), args.out, tie_margin=args.tie_margin,
                            resolution=args.resolution, batch_size=args.batch_size, image_root=args.image_root,
                            on_bad_row=args.on_bad_row, reward_name=args.reward)
    print(json.dumps(summary, indent=2))
    return 0


def _select_experts(args: argparse.Namespace, _: list[str]) -> int:
    import json

    import rewards

    from .data.relabel import select_experts

    summary = select_experts(args.pool, rewards.from_spec(args.reward), args.out, top=args.top or None,
                             per_prompt=args.per_prompt, min_score=args.min_score, resolution=args.resolution,
                             batch_size=args.batch_size, image_root=args.image_root)
    print(json.dumps(summary, indent=2))
    return 0


def _demo(args: argparse.Namespace, _: list[str]) -> int:
    from .demo import run_demo

    for flag in ("pair_prompts", "k", "steps", "eval_prompts", "online_steps", "checkpoint_every"):
        low = 0 if flag == "online_steps" else 1
        if getattr(args, flag) < low:
            raise ValueError(f"--{flag.replace('_', '-')} must be at least {low} (got {getattr(args, flag)})")

    return run_demo(args)


def _toyworld_build(args: argparse.Namespace, _: list[str]) -> int:
    import json

    from .toyworld.pretrain import PretrainConfig, build_toyworld, rebuild_sd

    cfg = PretrainConfig(**({"sd_text": args.sd_text} if args.sd_text else {}))
    if args.sd_only_from:
        report = rebuild_sd(args.out, args.sd_only_from, seed=args.seed, minutes_budget=args.minutes, config=cfg)
    else:
        report = build_toyworld(args.out, seed=args.seed, minutes_budget=args.minutes, config=cfg)
    print(json.dumps(report, indent=2))
    return 0


def _toyworld_pairs(args: argparse.Namespace, _: list[str]) -> int:
    import json
    from pathlib import Path

    import rewards

    from .backbones import load_backbone
    from .toyworld import shapes
    from .toyworld.bases import find_base
    from .toyworld.pairs import make_pairs

    bb = load_backbone(Path(args.model) if args.model else find_base() / "sd")
    stats = make_pairs(bb, shapes.prompts("train", n=args.prompts, seed=args.seed),
                       rewards.from_spec(args.reward, paths={"toy_clip": args.clip}), args.out, k=args.k,
                       seed=args.seed, steps=args.steps, guidance_scale=args.guidance, tie_margin=args.tie_margin,
                       noise=args.noise)
    print(json.dumps(stats, indent=2))
    return 0


def _bench_alignment(args: argparse.Namespace, _: list[str]) -> int:
    from pathlib import Path

    from .bench.alignment import run_bench

    res = run_bench(
        [o.strip() for o in args.objectives.split(",")], args.seeds, args.out, base=args.base, pairs=args.pairs,
        reward=args.reward, target=args.target, clip=args.clip, pair_prompts=args.pair_prompts,
        pair_seed=args.pair_seed, k=args.k, steps=args.steps, curve_every=args.curve_every,
        batch_size=args.batch_size, lr=args.lr, eval_prompts=args.eval_prompts, eval_seeds=args.eval_seeds,
    )
    out = Path(args.out)
    print((out / "results.md").read_text())
    print(f"results: {out / 'results.json'}, plot: {out / 'results.png'}")
    return 0 if res else 1


def _bench_speed(args: argparse.Namespace, _: list[str]) -> int:
    import json
    from pathlib import Path

    from .bench import speed

    split = [x.strip() for x in args.switch] if args.switch else []
    variants = [{}] + [speed.switch_set(s) for s in split]
    labels = ["baseline"] + split
    cases = []
    for model in args.models.split(","):
        for res in [int(r) for r in args.resolutions.split(",")] if args.resolutions else [None]:
            for bs in [int(b) for b in args.batch_sizes.split(",")]:
                for obj in args.objectives.split(",") if args.objectives else []:
                    for label, sw in zip(labels, variants, strict=True):
                        cases.append(speed.Case(model=model, objective=obj, batch_size=bs, resolution=res, steps=args.steps,
                                                warmup=args.warmup, log_every=args.log_every, lora_rank=args.lora_rank,
                                                switches=sw, threads=args.threads,
                                                label=f"{model} {obj} b{bs}" + (f" {res}px" if res else "") + f" {label}"))
                for g in args.sample.split(",") if args.sample else []:
                    cases.append(speed.Case(model=model, kind="sample", guidance=g, batch_size=bs, resolution=res,
                                            steps=args.steps, warmup=args.warmup, sample_steps=args.sample_steps,
                                            threads=args.threads, lora_rank=args.lora_rank))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def report(case: speed.Case, r: int, res: dict) -> None:
        rate = res.get("steps_per_s") or res.get("images_per_s")
        print(f"repeat {r + 1}: {case.name}: {rate:.3f}/s, peak {res.get('peak_cuda_mb') or res['peak_rss_mb']:.0f} MB",
              flush=True)

    result = speed.bench(cases, repeats=args.repeats, on_result=report)
    (out / "results.json").write_text(json.dumps(result, indent=2))
    md = speed.table(result)
    (out / "results.md").write_text(md)
    print(md)
    if any("steps_per_s" in r for r in result["rows"]):
        print(f"plot: {speed.plot(result, out / 'speed.png', x='resolution' if args.resolutions else 'batch_size')}")
    return 0


def _bench_evaluate(args: argparse.Namespace, _: list[str]) -> int:
    import json
    from pathlib import Path

    from .bench.experiment import ORACLES, load_rewards
    from .bench.precise import Protocol, evaluate_lora, evaluation_table
    from .toyworld.bases import find_base

    model = Path(args.model) if args.model else find_base() / "sd"
    names = [*ORACLES, "toy_aesthetic"] + (["toy_clip"] if args.clip else [])
    proto = Protocol(prompts=args.eval_prompts, seeds=args.eval_seeds, steps=args.sample_steps, guidance=args.guidance)
    res = evaluate_lora(str(model), args.lora, proto, load_rewards(names, args.clip))
    table = evaluation_table(res)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "evaluation.json").write_text(json.dumps(res, indent=2))
        (out / "evaluation.md").write_text(table)
    print(table)
    return 0


def _itercomp(args: argparse.Namespace, overrides: list[str]) -> int:
    """The toy IterComp loop (diffalign/toyworld/itercomp.py): rounds of gallery -> rankings -> heads -> policy."""
    from pathlib import Path

    from .config import load_config
    from .toyworld.itercomp import IterCompSettings, run_itercomp, table

    cfg = load_config(args.config, overrides)
    s = IterCompSettings(gallery_prompts=args.gallery_prompts, samples_per_model=args.samples_per_model,
                         eval_prompts_heads=args.heads_eval_prompts, refine_steps=args.refine_steps,
                         refine_lr=args.refine_lr, score_l2=args.score_l2, pairs_per_step=args.pairs_per_step,
                         eval_prompts=args.eval_prompts, eval_seeds=args.eval_seeds, seed=args.seed)
    out = Path(args.out or Path(cfg.train.output_dir) / "itercomp")
    report = run_itercomp(cfg, args.rounds, out, s)
    (out / "itercomp.md").write_text(table(report))
    print(table(report))
    print(f"rounds in {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="diffalign", description="Align text-to-image diffusion and flow models.")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="fine-tune from a YAML config; extra --section.key VALUE overrides")
    t.add_argument("config")
    t.add_argument("--resume", default=None,
                   help="'latest' (error if none), 'auto' (latest if any, else start) or a checkpoint folder")
    t.add_argument("--overwrite", action="store_true",
                   help="start afresh in a train.output_dir holding an earlier run's results (they are deleted)")
    t.add_argument("--allow-config-change", action="store_true",
                   help="resume with changed config keys beyond train.steps and the bookkeeping keys "
                   "(the new config is written beside config.yaml)")
    t.set_defaults(func=_train, allow_overrides=True)
    t.epilog = "Every config key, with its type, default and meaning: diffalign config"

    ic = sub.add_parser("itercomp", help="IterComp's loop in the toy world: gallery rankings, Bradley-Terry refined "
                        "composition heads, reward feedback on them; each round saved and resumable")
    ic.add_argument("config", help="a reward-feedback training config (objective refl, draft or alignprop); "
                    "reward.train is replaced by each round's heads; extra --section.key VALUE overrides")
    ic.add_argument("--rounds", type=int, required=True)
    ic.add_argument("--out", default=None, help="run folder (default: TRAIN.OUTPUT_DIR/itercomp); rerun to resume")
    ic.add_argument("--gallery-prompts", type=int, default=128, help="train prompts every gallery model samples")
    ic.add_argument("--samples-per-model", type=int, default=2)
    ic.add_argument("--heads-eval-prompts", type=int, default=32,
                    help="held-out prompts of the gallery whose rankings measure the heads' accuracy")
    ic.add_argument("--refine-steps", type=int, default=200, help="Bradley-Terry Adam steps per round")
    ic.add_argument("--refine-lr", type=float, default=1e-3)
    ic.add_argument("--pairs-per-step", type=int, default=512, help="ranking pairs per head in each refinement step")
    ic.add_argument("--score-l2", type=float, default=0.01, help="penalty on the heads' squared scores (bounds them)")
    ic.add_argument("--eval-prompts", type=int, default=64, help="held-out prompts of the oracle evaluation")
    ic.add_argument("--eval-seeds", type=int, default=2)
    ic.add_argument("--seed", type=int, default=0)
    ic.set_defaults(func=_itercomp, allow_overrides=True)

    k = sub.add_parser("config", help="list every config key with its type, default and description")
    k.set_defaults(func=_config)

    c = add_cache_arguments(sub.add_parser("cache", help="encode a pair data set into a latent + text-embedding cache"))
    c.set_defaults(func=_cache)

    s = sub.add_parser("sample", help="generate images (CFG, RL guidance, reward guidance, best-of-N)")
    s.add_argument("--model", required=True, help="diffusers pipeline folder")
    s.add_argument("--lora", default=None, help="LoRA folder (pytorch_lora_weights.safetensors)")
    s.add_argument("--prompts", required=True, help="a text file (one prompt per line) or a prompt")
    s.add_argument("--out", required=True, help="folder for the PNGs, grid.png and settings.json")
    s.add_argument("--overwrite", action="store_true", help="replace the PNGs an earlier run left in --out")
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
    s.add_argument("--rlg-scale", type=float, default=None,
                   help="RLG weight w: 0 base, 1 tuned (default), >1 extrapolates; needs --guidance rlg")
    s.add_argument("--rlg-mode", default="exact", choices=["exact", "approx"],
                   help="exact: (1-w) base + w tuned; approx: the LoRA scaled by w (half the model calls)")
    s.add_argument("--zero-init-step", type=int, default=0, help="first K model calls use the tuned model alone")
    s.add_argument("--rlg-sequential", action="store_true", help="run base and tuned as two forwards (less memory)")
    s.add_argument("--reward", default=None, help="NAME, NAME=PATH or NAME=PATH:W,NAME:W (an Ensemble)")
    s.add_argument("--reward-scale", type=float, default=None,
                   help="reward-gradient step on the predicted x0 (default 1); needs --guidance reward")
    s.add_argument("--reward-schedule", default="constant", choices=["constant", "increasing", "decreasing"],
                   help="weight over the noise level sigma: 1, 1 - sigma, sigma")
    s.add_argument("--reward-normalize", action="store_true", help="scale the reward gradient to unit RMS per image")
    s.add_argument("--best-of", type=int, default=1, help="keep the best of N candidates per prompt by --reward")
    s.add_argument("--reject-below", type=float, default=None,
                   help="rejection sampling: stop at the first candidate scoring >= this (at most --best-of)")
    s.add_argument("--no-progress", action="store_true")
    add_profile_arguments(s)
    s.set_defaults(func=_sample)

    sc = add_score_arguments(sub.add_parser("score", help="score images with reward models into a CSV"))
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
    tp.add_argument("--overwrite", action="store_true", help="replace an existing OUT/pairs.jsonl and its images")
    tp.set_defaults(func=_tiny_pairs)

    _add_data_parsers(sub)
    _add_demo_parser(sub)
    _add_toyworld_parsers(sub)
    _add_bench_parsers(sub)
    _add_personalization_parsers(sub)
    return p


# --- personalization (#14): profile create, choose, sample --profile -------------------------------
def add_profile_arguments(s: argparse.ArgumentParser) -> None:
    s.add_argument("--profile", default=None,
                   help="a user profile, or a mix: alice.profile:0.7,bob.profile:0.3 (needs --injection)")
    s.add_argument("--injection", default=None, help="the trained user injection (user_injection.safetensors)")
    s.add_argument("--profile-scale", type=float, default=None, help="weight of the user branch (default: trained)")
    s.add_argument("--profile-negative", choices=["zero", "same"], default="zero",
                   help="user embedding of CFG's unconditional branch: zero (IP-Adapter's convention; CFG amplifies "
                        "the profile; the stronger one in the toy world, docs/BENCHMARKS.md) or the same profile")


def _personalized_model(args: argparse.Namespace) -> tuple[Any, Any, Any]:
    """(model, lora, context): the plain model, or a backbone with the injection and the profile applied."""
    import contextlib

    if not (args.profile or args.injection):
        return args.model, args.lora, contextlib.nullcontext()
    if not (args.profile and args.injection):
        raise ValueError("--profile and --injection go together: the profile is read by the trained injection")
    from .personalization.commands import load_personalized
    from .personalization.inject import personalized

    bb, prof = load_personalized(args.model, args.injection, args.profile, lora=args.lora, scale=args.profile_scale,
                                 device=args.device)
    return bb, None, personalized(bb, prof.embedding, negative=args.profile_negative)


def _profile_create(args: argparse.Namespace, _: list[str]) -> int:
    from .personalization.commands import profile_create
    from .personalization.profiles import Profile

    path = profile_create(args.pairs, args.user, args.out, args.encoder, min_pairs=args.min_pairs,
                          resolution=args.resolution, overwrite=args.overwrite)
    prof = Profile.load(path)
    print(f"{path}: user {prof.user_id!r}, {prof.pairs} pairs, {prof.dim}-d embedding ({prof.encoder})")
    return 0


def _choose(args: argparse.Namespace, _: list[str]) -> int:
    from .personalization.commands import choose

    return choose(args.out, args.user, args.model, _read_prompts(args.prompts), host=args.host, port=args.port,
                  encoder=args.encoder, min_pairs=args.min_pairs, steps=args.steps,
                  guidance_scale=args.guidance_scale, lora=args.lora, device=args.device,
                  resolution=args.resolution)


def _add_personalization_parsers(sub: Any) -> None:
    pr = sub.add_parser("profile", help="user profiles for personalization (from a few choices)")
    psub = pr.add_subparsers(dest="profile_command", required=True)
    c = psub.add_parser("create", help="embed one user's choices (pairs with user_id) into a profile file")
    c.add_argument("--pairs", required=True, help="pairs file or folder (Pick-a-Pic schema with a user_id column)")
    c.add_argument("--user", required=True, help="the user_id whose pairs make the profile")
    c.add_argument("--out", required=True, help="the profile file to write, e.g. alice.profile")
    c.add_argument("--encoder", required=True, help="user encoder: clip=DIR, open_clip=FILE@MODEL or vlm=DIR "
                   "(the one the injection was trained with)")
    c.add_argument("--min-pairs", type=int, default=4, help="fewest decided pairs accepted (default 4)")
    c.add_argument("--resolution", type=int, default=224, help="image side the pairs are read at")
    c.add_argument("--overwrite", action="store_true")
    c.set_defaults(func=_profile_create)

    ch = sub.add_parser("choose", help="a local web page to pick between two images; records pairs for a profile")
    ch.add_argument("--model", required=True, help="diffusers pipeline folder that draws the images")
    ch.add_argument("--user", required=True, help="your user id (recorded in every pair)")
    ch.add_argument("--prompts", required=True, help="a text file (one prompt per line) or a prompt")
    ch.add_argument("--out", required=True, help="folder for pairs.jsonl, images/ and the profile")
    ch.add_argument("--lora", default=None)
    ch.add_argument("--encoder", default=None, help="user encoder spec; enables 'create my profile' on the page")
    ch.add_argument("--min-pairs", type=int, default=4)
    ch.add_argument("--resolution", type=int, default=224)
    ch.add_argument("--host", default="127.0.0.1", help="default 127.0.0.1 (this machine only)")
    ch.add_argument("--port", type=int, default=7860)
    ch.add_argument("--steps", type=int, default=30)
    ch.add_argument("--guidance-scale", type=float, default=7.5)
    ch.add_argument("--device", default=None)
    ch.set_defaults(func=_choose)


def add_score_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Flags of ``diffalign score`` (``rewards/score_cli.py`` runs it)."""
    import torch

    parser.add_argument("--reward", action="append", required=True, metavar="NAME[=PATH][,NAME[=PATH]]",
                        help="reward(s) to compute: registry name and, where it needs weights, their local path; "
                        "repeatable")
    parser.add_argument("--reward-arg", action="append", default=[], metavar="NAME.KEY=VALUE",
                        help="extra keyword argument for a reward's loader (string value); repeatable")
    parser.add_argument("--images", required=True, help="image folder or a single image file")
    parser.add_argument("--prompts", required=True,
                        help="text file: one prompt per image (sorted file order), or a single prompt for all")
    parser.add_argument("--out", required=True, help="output CSV path")
    parser.add_argument("--reference-faces", default=None, metavar="FILE|DIR",
                        help="reference image(s) for identity rewards (identity, toy_identity): one file or a folder, "
                        "all of one size; every image is compared with them (their embeddings averaged)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-progress", action="store_true", help="disable the progress bar")
    return parser


def add_cache_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Flags of ``diffalign cache``."""
    parser.add_argument("--model", required=True, help="diffusers model directory (the backbone)")
    parser.add_argument("--data", required=True, help="preference pairs: .parquet/.jsonl file or a directory of them")
    parser.add_argument("--out", required=True, help="cache directory to create (or resume)")
    parser.add_argument("--resolution", type=int, default=None, help="image side in pixels (default: the model's)")
    parser.add_argument("--batch-size", type=int, default=8, help="pairs per encoder call (default 8)")
    parser.add_argument("--shard-size", type=int, default=1024, help="pairs per shard file (default 1024)")
    parser.add_argument("--image-root", default=None, help="directory for relative image paths (default: the data file's)")
    parser.add_argument("--ties", choices=["drop", "keep"], default="drop", help="label_0 == 0.5 pairs (default drop)")
    parser.add_argument("--on-bad-row", choices=["error", "skip"], default="error", help="bad rows (default error)")
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="float16", help="storage dtype (default float16)")
    parser.add_argument("--device", default=None, help="encode on this device (default: cuda when available)")
    parser.add_argument("--num-workers", type=int, default=0, help="image-decoding DataLoader workers")
    parser.add_argument("--limit", type=int, default=None, help="use only the first N source rows")
    parser.add_argument("--overwrite", action="store_true", help="replace a cache built from other inputs")
    parser.add_argument("--no-flips", action="store_true",
                        help="do not also cache the flipped images (half the work; train with data.random_flip: false)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def _add_data_parsers(sub: Any) -> None:
    r = sub.add_parser("relabel", help="relabel pair data with a reward or Ensemble (AI feedback), ties by a margin")
    r.add_argument("--pairs", required=True, help="Pick-a-Pic-schema pairs: .jsonl/.parquet file or folder")
    r.add_argument("--reward", required=True, help="NAME[=PATH] or NAME[=PATH]:W,NAME:W (an Ensemble)")
    r.add_argument("--out", required=True, help="new folder for pairs.jsonl")
    r.add_argument("--tie-margin", type=float, default=0.0, help="|score_0 - score_1| <= margin is a tie (0.5)")
    r.add_argument("--on-bad-row", choices=["error", "skip"], default="error")
    s = sub.add_parser("select-experts", help="top-k images of a pool by a reward, as DRO expert demonstrations")
    s.add_argument("--pool", required=True, help="pair data (both images of every pair) or a rankings.jsonl")
    s.add_argument("--reward", required=True, help="NAME[=PATH] or NAME[=PATH]:W,NAME:W (an Ensemble)")
    s.add_argument("--out", required=True, help="new folder for NNNNNN.png + NNNNNN.txt")
    s.add_argument("--top", type=int, default=500, help="how many to keep overall (0: all)")
    s.add_argument("--per-prompt", type=int, default=None, help="keep at most this many per caption")
    s.add_argument("--min-score", type=float, default=None, help="keep only images scoring above this")
    for p in (r, s):
        p.add_argument("--image-root", default=None)
        p.add_argument("--resolution", type=int, default=256, help="images are scored at this size")
        p.add_argument("--batch-size", type=int, default=32)
    r.set_defaults(func=_relabel)
    s.set_defaults(func=_select_experts)


def _add_demo_parser(sub: Any) -> None:
    from .demo import __doc__ as demo_doc

    d = sub.add_parser("demo", help="preference alignment end to end in the toy world (`make demo`)", description=demo_doc,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--target", default="toy_shape", help="labelling reward = target metric")
    d.add_argument("--pair-prompts", type=int, default=1024)
    d.add_argument("--k", type=int, default=4)
    d.add_argument("--steps", type=int, default=400)
    d.add_argument("--eval-prompts", type=int, default=96)
    d.add_argument("--checkpoint-every", type=int, default=100)
    d.add_argument("--online-steps", type=int, default=0,
                   help="also train DiffusionNFT online on the target reward for this many steps after DPO and show "
                        "it beside DPO (0: DPO only; 300 adds about 1.5 CPU minutes)")
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(func=_demo)


def _add_toyworld_parsers(sub: Any) -> None:
    from .toyworld.bases import DEFAULT_BASE

    tw = sub.add_parser("toyworld", help="the embedded toy world: build the base models, sample pairs")
    tsub = tw.add_subparsers(dest="toy_command", required=True)
    b = tsub.add_parser("build", help="pretrain the toy SD and flow base models (CPU, minutes)")
    b.add_argument("--out", default=str(DEFAULT_BASE))
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--minutes", type=float, default=15.0, help="safety cap on the build time")
    b.add_argument("--sd-text", choices=("scratch", "toy_clip"), default=None,
                   help="SD text encoder: trained from scratch with the UNet, or a toy CLIP's text tower (frozen); "
                   "default: PretrainConfig's")
    b.add_argument("--sd-only-from", metavar="BASE_DIR", default=None,
                   help="rebuild only the SD pipeline into OUT/sd, reusing BASE_DIR/sd's VAE")
    b.set_defaults(func=_toyworld_build)
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
    p.set_defaults(func=_toyworld_pairs)


def _add_bench_parsers(sub: Any) -> None:
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
    a.add_argument("--eval-prompts", type=int, default=256, help="held-out prompts (default 256 x 4 seeds = 1024 samples)")
    a.add_argument("--eval-seeds", type=int, default=4, help="samples per held-out prompt (same noise for every model)")
    a.set_defaults(func=_bench_alignment)
    e = bsub.add_parser("evaluate", help="a toy-world model (and LoRA) on held-out samples, gains with intervals")
    e.add_argument("--model", default=None, help="pipeline folder (default: the toy SD base)")
    e.add_argument("--lora", default=None, help="LoRA folder: report its gain over the model, paired sample by sample")
    e.add_argument("--out", default=None, help="folder for evaluation.json / evaluation.md")
    e.add_argument("--clip", default=None, help="toy CLIP folder: also score toy_clip")
    e.add_argument("--eval-prompts", type=int, default=256, help="held-out prompts (default 256 x 4 seeds = 1024)")
    e.add_argument("--eval-seeds", type=int, default=4)
    e.add_argument("--sample-steps", type=int, default=20)
    e.add_argument("--guidance", type=float, default=5.0)
    e.set_defaults(func=_bench_evaluate)
    s = bsub.add_parser("speed", help="steps/s, images/s, peak memory, FLOPs and utilisation of the hardware peak")
    s.add_argument("--models", default="tiny:sd15", help="comma list: tiny:FAMILY, arch:sd15|sdxl|sd3, or a folder")
    s.add_argument("--objectives", default="dpo", help="comma list of objectives to time a training step of ('' for none)")
    s.add_argument("--sample", default="cfg,rlg", help="comma list of sampling guidances to time ('' for none)")
    s.add_argument("--batch-sizes", default="8", help="comma list (pairs per step for pair objectives)")
    s.add_argument("--resolutions", default=None, help="comma list of image sides (default: the model's own)")
    s.add_argument("--switch", action="append", default=None,
                   help="a speed switch to measure beside the baseline (repeatable): one of cache, channels_last, "
                        "compile, fused_adamw, foreach_adamw, bf16, grad_ckpt, or several joined by '+', or "
                        "SECTION.KEY=VALUE")
    s.add_argument("--steps", type=int, default=30, help="timed training steps (sampling: 1 batch per 5)")
    s.add_argument("--warmup", type=int, default=5)
    s.add_argument("--log-every", type=int, default=5, help="steps per timed window (the median window is reported)")
    s.add_argument("--sample-steps", type=int, default=10)
    s.add_argument("--lora-rank", type=int, default=4)
    s.add_argument("--threads", type=int, default=1, help="torch threads (the CPU peak is measured at the same count)")
    s.add_argument("--repeats", type=int, default=3, help="alternating repeats of every case")
    s.add_argument("--out", default="runs/bench_speed")
    s.set_defaults(func=_bench_speed)


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
    except (ConfigError, FileNotFoundError, FileExistsError, ValueError, KeyError) as e:
        print(f"diffalign {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
