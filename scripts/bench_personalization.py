"""Benchmark: personalization from a few choices (PPD) in the toy world.

Stages (each cached under OUT, so a rerun resumes):
1. data: the toy CLIP (the user encoder), a pool of base-model pairs for open prompts, a population of
   synthetic users (seen / unseen), each seen user's pairs (Pick-a-Pic schema + user_id) and each unseen
   user's 4 few-shot pairs from a separate pool;
2. train, per seed: PPD (multi-user Diffusion-DPO, user embedding from 4 other pairs of the same user,
   embedding dropout, only the injection trains) and a single-reward DPO LoRA on the same pairs pooled;
3. evaluate, per seed: for every user, samples with the user's profile (from 4 pairs) vs the same model
   without a profile (the base, exactly) vs the DPO model, same starting noise, scored by the user's own
   reward; win rates with paired-bootstrap 95% intervals; interpolation of two users; a grid PNG.

    OMP_NUM_THREADS=1 python scripts/bench_personalization.py [--seeds 3] [--out runs/bench_ppd]

Pinned to one torch thread. Results and machine facts go to OUT/results.json (OUT/results_scale1_zero.json
for ``--negative zero``, and so on: each inference setting has its own sample caches and results).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402

BASE = Path(__file__).resolve().parent.parent / "diffalign" / "toyworld" / "base" / "sd"
POOL_STEPS, GUIDANCE = 20, 5.0  # base samples for the pairs (the toy base's own setting)
EVAL_STEPS = 10  # evaluation samples (every compared model alike); set by --eval-steps


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def load_base() -> Any:
    from diffalign.backbones import load_backbone

    return load_backbone(BASE)


def ensure_clip(out: Path, seconds: float, steps: int = 1500) -> Path:
    """The user encoder: the toy CLIP under OUT/toy_clip, trained here for ``steps`` (``seconds`` caps the
    wall time; 0: no cap) unless the folder holds one already."""
    d = out / "toy_clip"
    if not (d / "config.json").exists():
        from diffalign.toyworld.clip import train_toy_clip

        log(f"training the toy CLIP (user encoder): {steps} steps" + (f", at most {seconds:.0f} s" if seconds else ""))
        train_toy_clip(d, steps=steps, max_seconds=seconds or None, progress=False, eval_n=256)
    return d


def pool_images(bb: Any, prompts: list[str], seed: int) -> torch.Tensor:
    """Two base samples per prompt: [N, 2, 3, H, W]."""
    from diffalign.toyworld.pairs import sample_images

    expanded = [p for p in prompts for _ in range(2)]
    imgs = sample_images(bb, expanded, seed=seed, steps=POOL_STEPS, guidance_scale=GUIDANCE, progress=True, desc="pool")
    return imgs.view(len(prompts), 2, *imgs.shape[1:])


def ensure_data(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    from diffalign.toyworld.users import open_prompts, population, user_pairs

    seen, unseen = population(args.seen_users, args.unseen_users, seed=0)
    train_dir, shot_dir = out / "pairs_seen", out / "pairs_unseen"
    bb = None
    if not (train_dir / "pairs.jsonl").exists():
        bb = bb or load_base()
        log(f"pool of {args.pool} prompts x 2 for the seen users")
        prompts = open_prompts(args.pool, seed=0)
        user_pairs(train_dir, prompts, pool_images(bb, prompts, seed=10), seen, args.pairs_per_user, seed=0)
    if not (shot_dir / "pairs.jsonl").exists():
        bb = bb or load_base()
        log("pool of 256 prompts x 2 for the unseen users' few shots")
        prompts = open_prompts(256, seed=1)
        user_pairs(shot_dir, prompts, pool_images(bb, prompts, seed=11), unseen, args.shots, seed=1)
    return {"seen": seen, "unseen": unseen, "train": train_dir / "pairs.jsonl", "shots": shot_dir / "pairs.jsonl"}


# ------------------------------------------------------------------------------------------ training


ENCODER = "clip"  # the toy CLIP's pooled image embedding, or "clip_patches" (its patch features); --encoder


def encoder_spec(clip_dir: Path) -> str:
    return f"{ENCODER}={clip_dir}"


def encoder_for(clip_dir: Path) -> Any:
    from diffalign.personalization.encoder import load_encoder

    return load_encoder(encoder_spec(clip_dir))


def ppd_config(args: argparse.Namespace, data: dict[str, Any], clip_dir: Path, seed: int, run: Path) -> Any:
    """The training loop's config for PPD on the seen users' pairs: only the injection trains (the LoRA
    the toy recipe attaches stays frozen at zero, so with it disabled the reference is the base)."""
    from diffalign.config import RunConfig
    from diffalign.toyworld.pairs import TOY_GUIDANCE

    return RunConfig.model_validate({
        "model": {"path": str(BASE), "lora": True, "lora_rank": args.lora_rank},
        "data": {"train": str(data["train"]), "prompt_dropout": 0.1, "random_flip": False},
        "objective": {"name": "ppd", "beta": args.beta, "encoder": encoder_spec(clip_dir),
                      "embed_dim": encoder_for(clip_dir).dim, "k": args.shots, "embedding_dropout": args.dropout,
                      "tokens": args.tokens, "train_lora": args.train_lora},
        "train": {
            "output_dir": str(run), "seed": seed, "steps": args.steps, "batch_size": args.batch, "lr": args.lr,
            "lr_scheduler": "constant_with_warmup", "warmup_steps": args.warmup_steps or max(1, args.steps // 20), "weight_decay": 0.0,
            "checkpoint_every": 0, "keep_checkpoints": 0, "sample_every": 0, "log_every": 25, "progress": False,
            "sample_prompts": ["a red circle", "a blue square"], "sample_steps": 20, "sample_guidance": TOY_GUIDANCE,
        },
    })


def train_ppd(args: argparse.Namespace, data: dict[str, Any], clip_dir: Path, seed: int, run: Path) -> Path:
    """Multi-user DPO with the injection, through the training loop (``diffalign train`` with this config)."""
    path = run / "final" / "user_injection.safetensors"
    if path.exists():
        return path
    from diffalign.training import train

    log(f"PPD seed {seed}: training {args.steps} steps")
    t0 = time.time()
    res = train(ppd_config(args, data, clip_dir, seed, run), resume="auto")
    log(f"PPD seed {seed}: done in {time.time() - t0:.0f} s, metrics {res['metrics']}")
    return path


def train_dpo(args: argparse.Namespace, data: dict[str, Any], seed: int, out: Path) -> Path:
    """Single-reward baseline: a Diffusion-DPO LoRA on every seen user's pairs pooled (user ids ignored)."""
    lora = out / f"dpo_seed{seed}" / "final" / "lora"
    if (lora / "pytorch_lora_weights.safetensors").exists():
        return lora
    from diffalign.bench.alignment import run_config
    from diffalign.training import train

    log(f"DPO seed {seed}: training {args.dpo_steps} steps on the pooled pairs")
    res = train(run_config(BASE, data["train"], out / f"dpo_seed{seed}", "dpo", seed=seed, steps=args.dpo_steps),
                resume="auto")
    return Path(res["weights"])


# ---------------------------------------------------------------------------------------- evaluation


def bootstrap_ci(wins: torch.Tensor, n: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Mean win rate and a paired-bootstrap 95% interval. ``wins``: [seeds, units] (units resampled jointly)."""
    w = wins.reshape(-1, wins.shape[-1]).double()
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, w.shape[1], (n, w.shape[1]), generator=g)
    means = w[:, idx].mean((0, 2))
    lo, hi = torch.quantile(means, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return float(w.mean()), lo, hi


def profiles(users: list[Any], choices: dict[str, Any], enc: Any, k: int, seed: int) -> torch.Tensor:
    """[U, D]: each user's embedding from k of its choices (drawn with ``seed``)."""
    from diffalign.personalization.encoder import user_embedding

    out = []
    g = torch.Generator().manual_seed(seed)
    for u in users:
        prompts, w, lose = choices[u.user_id]
        pick = torch.randperm(len(prompts), generator=g)[:k].tolist()
        out.append(user_embedding(enc, [prompts[i] for i in pick], w[pick], lose[pick]))
    return torch.stack(out)


NEGATIVE = "same"  # the CFG unconditional branch's user embedding (generate_personalized); set by --negative


def sample(bb: Any, prompts: list[str], emb: torch.Tensor | None, noise_seed: int, batch: int = 64) -> torch.Tensor:
    from diffalign.personalization.inject import generate_personalized
    from diffalign.toyworld.pairs import seeded_latents

    lat = seeded_latents(bb, len(prompts), seed=noise_seed)
    out = []
    for i in range(0, len(prompts), batch):
        e = None if emb is None else emb[i:i + batch]
        out.append(generate_personalized(bb, prompts[i:i + batch], e, latents=lat[i:i + batch], steps=EVAL_STEPS,
                                         guidance_scale=GUIDANCE, negative=NEGATIVE).cpu())
    return torch.cat(out)


def user_scores(images: torch.Tensor, users_per_row: list[Any]) -> torch.Tensor:
    from diffalign.toyworld.users import features

    f = features(images)
    w = torch.tensor([u.weights for u in users_per_row], dtype=torch.float32)
    return (f * w).sum(1)


def grid_png(path: Path, rows: list[tuple[str, torch.Tensor, torch.Tensor]]) -> Path:
    """Rows: (label, without [n,3,H,W], with [n,3,H,W]) -> one PNG, 'without | with' per row, scaled x3."""
    from PIL import Image, ImageDraw

    n, s, pad, label_w = rows[0][1].shape[0], 96, 4, 190
    width = label_w + 2 * n * (s + pad) + 3 * pad
    img = Image.new("RGB", (width, 22 + len(rows) * (s + pad)), "white")
    d = ImageDraw.Draw(img)
    d.text((label_w, 4), "without profile (base)", fill="black")
    d.text((label_w + n * (s + pad) + 3 * pad, 4), "with profile (4 choices)", fill="black")
    for r, (label, a, b) in enumerate(rows):
        y = 22 + r * (s + pad)
        d.text((4, y + s // 2 - 12), label, fill="black")
        for j, im in enumerate([*a, *b]):
            x = label_w + j * (s + pad) + (3 * pad if j >= n else 0)
            arr = (im.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
            img.paste(Image.fromarray(arr).resize((s, s), Image.NEAREST), (x, y))
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def cached(path: Path, fn: Any) -> torch.Tensor:
    if path.exists():
        return torch.load(path, weights_only=True)
    x = fn()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(x, path)
    return x


def evaluate(args: argparse.Namespace, data: dict[str, Any], clip_dir: Path, out: Path,
             ppd: dict[int, Path], dpo: dict[int, Path], base_only: bool = False) -> dict[str, Any]:
    from diffalign.api import load_model
    from diffalign.data.users import choices_by_user
    from diffalign.personalization.inject import load_injection
    from diffalign.toyworld.users import open_prompts, win_rate

    enc = encoder_for(clip_dir)
    prompts = open_prompts(max(args.eval_seen, args.eval_unseen, args.interp_prompts), seed=2)
    groups = {
        "seen": (data["seen"][: args.eval_seen_users], choices_by_user(data["train"], 32), args.eval_seen),
        "unseen": (data["unseen"], choices_by_user(data["shots"], 32), args.eval_unseen),
    }
    base = load_base()
    # inference settings other than the default (scale 1, same embedding in CFG's negative) get their own caches
    tag = eval_tag(args)
    res: dict[str, Any] = {}
    grid_rows = []
    wanted = args.eval_groups.split(",")
    for gname, (users, choices, n) in groups.items():
        if gname not in wanted:
            continue
        emb = profiles(users, choices, enc, args.shots, seed=0)  # [U, D]
        rows_u = [u for u in users for _ in range(n)]
        rows_p = [p for _ in users for p in prompts[:n]]
        rows_e = emb.repeat_interleave(n, 0)
        noise = 777 if gname == "seen" else 778
        log(f"{gname}: {len(rows_p)} samples per model")
        img_base = cached(out / "eval" / f"base_{gname}.pt", lambda: sample(base, rows_p, None, noise))  # noqa: B023
        s_base = user_scores(img_base, rows_u)
        if base_only:
            continue
        wins_vs_base, wins_vs_dpo, dpo_vs_base, gains, ppd_scores, dpo_scores = [], [], [], [], [], []
        ref_scores = []  # "the same model without a profile" per seed: the base, or with --train-lora the LoRA model
        first_ppd = None
        for seed in sorted(ppd):
            def ppd_model(seed: int = seed) -> Any:
                bb = load_model(BASE, ppd[seed].parent / "lora", device="cpu") if args.train_lora else load_base()
                load_injection(bb, ppd[seed], scale=args.scale)
                return bb

            def run_ppd(rows_p: list[str] = rows_p, rows_e: torch.Tensor = rows_e, noise: int = noise,
                        ppd_model: Any = ppd_model) -> torch.Tensor:
                return sample(ppd_model(), rows_p, rows_e, noise)

            img_ppd = cached(out / "eval" / f"ppd_{gname}_seed{seed}{tag}.pt", run_ppd)
            s_ppd = user_scores(img_ppd, rows_u)
            s_ref = s_base
            if args.train_lora:  # the LoRA trained too: compare with that model (LoRA on) without a profile
                s_ref = user_scores(cached(out / "eval" / f"ppd_{gname}_seed{seed}_noprofile.pt",
                                           lambda rows_p=rows_p, noise=noise, ppd_model=ppd_model: sample(
                                               ppd_model(), rows_p, None, noise)), rows_u)
            wins_vs_base.append(win_rate(s_ppd, s_ref))
            gains.append(float((s_ppd - s_ref).mean()))
            ppd_scores.append(s_ppd)
            ref_scores.append(s_ref)
            first_ppd = img_ppd if first_ppd is None else first_ppd
            if seed not in dpo:
                continue
            img_dpo = cached(out / "eval" / f"dpo_{gname}_seed{seed}.pt",
                             lambda seed=seed, rows_p=rows_p, noise=noise: sample(
                                 load_model(BASE, dpo[seed], device="cpu"), rows_p, None, noise))
            s_dpo = user_scores(img_dpo, rows_u)
            wins_vs_dpo.append(win_rate(s_ppd, s_dpo))
            dpo_vs_base.append(win_rate(s_dpo, s_base))
            dpo_scores.append(s_dpo)
        per_user = torch.stack(wins_vs_base).mean(0).view(len(users), n).mean(1)
        res[gname] = {
            "users": len(users), "samples_per_model": len(rows_p), "seeds": sorted(ppd),
            "ppd_vs_base": bootstrap_ci(torch.stack(wins_vs_base)),
            "ppd_vs_dpo": bootstrap_ci(torch.stack(wins_vs_dpo)) if dpo_scores else None,
            "dpo_vs_base": bootstrap_ci(torch.stack(dpo_vs_base)) if dpo_scores else None,
            "ppd_vs_base_per_seed": [float(w.mean()) for w in wins_vs_base],
            "reward_gain_per_seed": gains,
            "reward_gain_ppd": _interval(torch.cat(ref_scores), torch.cat(ppd_scores)),
            "reward_gain_dpo": _interval(s_base.repeat(len(dpo_scores)), torch.cat(dpo_scores)) if dpo_scores else None,
            "dpo_seeds": sorted(dpo),
            "per_user_win_rate": {u.user_id: float(v) for u, v in zip(users, per_user, strict=True)},
            "users_above_50": int((per_user > 0.5).sum()),
        }
        for ui in range(3):
            sl = slice(ui * n, ui * n + 4)
            desc = users[ui].describe().split(", ")
            grid_rows.append((f"{gname} user {users[ui].user_id}\n" + "\n".join([", ".join(desc[:2]), ", ".join(desc[2:])]),
                              img_base[sl], first_ppd[sl]))
        if args.probe:
            continue
        if gname == "unseen" and 0 in ppd:  # control: each user sampled with ANOTHER user's profile
            shuffled = emb.roll(1, 0).repeat_interleave(n, 0)

            def run_wrong(rows_p: list[str] = rows_p, shuffled: torch.Tensor = shuffled, noise: int = noise) -> torch.Tensor:
                bb = load_base()
                load_injection(bb, ppd[0], scale=args.scale)
                return sample(bb, rows_p, shuffled, noise)

            img_wrong = cached(out / "eval" / f"ppd_unseen_seed0_wrong_profile{tag}.pt", run_wrong)
            res[gname]["wrong_profile_vs_base_seed0"] = bootstrap_ci(win_rate(user_scores(img_wrong, rows_u), s_base)[None])
        if gname == "unseen":
            res["interpolation"] = interpolate(users, emb, ppd[min(ppd)], prompts[: args.interp_prompts], out,
                                               args.scale, tag)
    if base_only or len(wanted) < 2:
        return res
    res["grid"] = str(grid_png(Path(args.grid), grid_rows))
    return res


def eval_tag(args: argparse.Namespace) -> str:
    """Cache and results suffix of the inference settings ('' for scale 1 with the same embedding in CFG's negative)."""
    return "" if (args.scale, args.negative) == (1.0, "same") else f"_scale{args.scale:g}_{args.negative}"


def _interval(a: torch.Tensor, b: torch.Tensor) -> list[float]:
    """Paired-bootstrap 95% interval of mean(b - a) (diffalign.bench.stats)."""
    from diffalign.bench.stats import paired_bootstrap

    iv = paired_bootstrap(a, b)
    return [iv.mean, iv.low, iv.high]


def interpolate(users: list[Any], emb: torch.Tensor, injection: Path, prompts: list[str], out: Path,
                scale: float = 1.0, tag: str = "") -> dict[str, Any]:
    """Mix the two most opposed users: e = a e_A + (1 - a) e_B; both users' mean rewards along a."""
    from diffalign.personalization.inject import load_injection

    w = torch.tensor([u.weights for u in users])
    cos = w @ w.T
    i, j = divmod(int(cos.argmin()), len(users))
    bb = load_base()
    load_injection(bb, injection, scale=scale)
    out_rows = []
    base_img = cached(out / "eval" / "interp_base.pt", lambda: sample(load_base(), prompts, None, 779))
    ra0, rb0 = user_scores(base_img, [users[i]] * len(prompts)), user_scores(base_img, [users[j]] * len(prompts))
    for a in (0.0, 0.25, 0.5, 0.75, 1.0):
        e = (a * emb[i] + (1 - a) * emb[j]).expand(len(prompts), -1)
        img = cached(out / "eval" / f"interp_{a:.2f}{tag}.pt", lambda e=e: sample(bb, prompts, e, 779))
        ra, rb = user_scores(img, [users[i]] * len(prompts)), user_scores(img, [users[j]] * len(prompts))
        out_rows.append({"weight_on_A": a, "reward_A": float(ra.mean()), "reward_B": float(rb.mean()),
                         "win_A_vs_base": float((ra > ra0).float().mean()),
                         "win_B_vs_base": float((rb > rb0).float().mean())})
    return {"user_A": users[i].user_id, "user_B": users[j].user_id, "cosine": float(cos[i, j]),
            "A": users[i].describe(), "B": users[j].describe(), "base_reward_A": float(ra0.mean()),
            "base_reward_B": float(rb0.mean()), "rows": out_rows}


def _fmt(iv: list[float] | None) -> str:
    if iv is None:
        return "-"
    return f"{iv[0]:+.3f} [{iv[1]:+.3f}, {iv[2]:+.3f}]"


def _ci(t: Any) -> str:
    return "-" if t is None else f"{100 * t[0]:.1f}% [{100 * t[1]:.1f}, {100 * t[2]:.1f}]"


def report(res: dict[str, Any]) -> str:
    ci = _ci

    lines = ["| users | samples/model | PPD vs no profile | PPD vs DPO | DPO vs no profile | users with PPD > 50% "
             "| user-reward gain PPD | gain DPO |", "|---|---|---|---|---|---|---|---|"]
    for g in ("seen", "unseen"):
        r = res[g]
        lines.append(f"| {g} ({r['users']}) | {r['samples_per_model']} x {len(r['seeds'])} seeds | "
                     f"{ci(r['ppd_vs_base'])} | {ci(r['ppd_vs_dpo'])} | {ci(r['dpo_vs_base'])} | "
                     f"{r['users_above_50']}/{r['users']} | {_fmt(r['reward_gain_ppd'])} | "
                     f"{_fmt(r['reward_gain_dpo'])} |")
    it = res["interpolation"]
    lines += ["", f"Interpolation {it['user_A']} ({it['A']}) vs {it['user_B']} ({it['B']}), cosine {it['cosine']:.2f}; "
              f"base rewards A {it['base_reward_A']:.3f}, B {it['base_reward_B']:.3f}:", "",
              "| weight on A | reward A | reward B | A wins vs base | B wins vs base |", "|---|---|---|---|---|"]
    for r in it["rows"]:
        lines.append(f"| {r['weight_on_A']:.2f} | {r['reward_A']:.3f} | {r['reward_B']:.3f} | "
                     f"{100 * r['win_A_vs_base']:.1f}% | {100 * r['win_B_vs_base']:.1f}% |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/bench_ppd")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--seen-users", type=int, default=24)
    ap.add_argument("--unseen-users", type=int, default=32)
    ap.add_argument("--pool", type=int, default=1024)
    ap.add_argument("--pairs-per-user", type=int, default=64)
    ap.add_argument("--shots", type=int, default=4)
    ap.add_argument("--clip-seconds", type=float, default=0.0, help="wall-time cap on the toy CLIP's training (0: none)")
    ap.add_argument("--clip-steps", type=int, default=1500, help="toy CLIP (user encoder) training steps")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--dpo-steps", type=int, default=400)
    ap.add_argument("--warmup-steps", type=int, default=0, help="PPD warm-up (0: steps / 20)")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--beta", type=float, default=2000.0)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--dropout", type=float, default=0.1)
    ap.add_argument("--tokens", type=int, default=4)
    ap.add_argument("--encoder", choices=["clip", "clip_patches"], default="clip",
                    help="user encoder on the toy CLIP: its image embedding, or its patch features (4 x 4 grid)")
    ap.add_argument("--train-lora", action="store_true",
                    help="train the LoRA with the injection (win rates only, --probe: against the LoRA model without "
                         "a profile)")
    ap.add_argument("--lora-rank", type=int, default=4)
    ap.add_argument("--scale", type=float, default=1.0, help="injection scale at evaluation")
    ap.add_argument("--negative", choices=["same", "zero"], default="zero",
                    help="user embedding of CFG's unconditional branch at evaluation (zero: CFG amplifies the profile)")
    ap.add_argument("--eval-seen", type=int, default=64, help="eval prompts per seen user")
    ap.add_argument("--eval-seen-users", type=int, default=16, help="seen users evaluated")
    ap.add_argument("--eval-steps", type=int, default=10)
    ap.add_argument("--dpo-seed-list", default=None, help="seeds of the DPO baseline (default: the PPD seeds; none: no baseline)")
    ap.add_argument("--eval-groups", default="seen,unseen", help="evaluate these user groups (a partial run fills caches)")
    ap.add_argument("--seed-list", default=None, help="comma-separated training seeds (default: 0..seeds-1)")
    ap.add_argument("--eval-unseen", type=int, default=32, help="eval prompts per unseen user")
    ap.add_argument("--interp-prompts", type=int, default=256, help="prompts for the interpolation of two users")
    ap.add_argument("--probe", action="store_true", help="win rates only: no wrong-profile control, interpolation, grid")
    ap.add_argument("--grid", default="docs/results/personalization_grid.png")
    ap.add_argument("--stage", choices=["data", "eval-base", "train-ppd", "train-dpo", "train", "all"], default="all")
    args = ap.parse_args(argv)
    if args.train_lora and not args.probe:
        ap.error("--train-lora: only win rates are evaluated for such runs; add --probe")
    torch.set_num_threads(1)
    global EVAL_STEPS, NEGATIVE, ENCODER
    EVAL_STEPS, NEGATIVE, ENCODER = args.eval_steps, args.negative, args.encoder
    seeds = [int(x) for x in args.seed_list.split(",")] if args.seed_list else list(range(args.seeds))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    clip_dir = ensure_clip(out, args.clip_seconds, args.clip_steps)
    data = ensure_data(args, out)
    log(f"data ready: {data['train']} ({len(data['seen'])} seen users), {data['shots']}")
    if args.stage == "data":
        return
    if args.stage == "eval-base":  # the no-profile samples only (cached for the evaluation)
        evaluate(args, data, clip_dir, out, {}, {}, base_only=True)
        return
    if args.stage == "train-dpo":
        for s in seeds:
            train_dpo(args, data, s, out)
        return
    ppd = {s: train_ppd(args, data, clip_dir, s, out / f"ppd_seed{s}") for s in seeds}
    if args.stage == "train-ppd":
        return
    dpo_seeds = (seeds if args.dpo_seed_list is None else
                 [] if args.dpo_seed_list == "none" else [int(x) for x in args.dpo_seed_list.split(",")])
    dpo = {s: train_dpo(args, data, s, out) for s in dpo_seeds}
    if args.stage == "train":
        return
    res = evaluate(args, data, clip_dir, out, ppd, dpo)
    if "seen" not in res or "unseen" not in res:
        for g in ("seen", "unseen"):
            if g in res:
                r = res[g]
                log(f"{g}: PPD vs no profile {_ci(r['ppd_vs_base'])} (per seed {r['ppd_vs_base_per_seed']}), "
                    f"gain {_fmt(r['reward_gain_ppd'])}, users > 50%: {r['users_above_50']}/{r['users']}")
        log(f"partial evaluation ({args.eval_groups}): caches filled; run again with both groups for the report")
        return
    res["settings"] = vars(args)
    res["machine"] = {"platform": platform.platform(), "cpus": os.cpu_count(), "threads": torch.get_num_threads()}
    (out / f"results{eval_tag(args)}.json").write_text(json.dumps(res, indent=2))
    print(report(res))


if __name__ == "__main__":
    main()
