"""Alignment runs in the toy world: train an objective from the toy base on preference pairs, score
the result on held-out prompts before and after (rewards, oracle metrics, diversity), and compare
objectives over seeds (``diffalign bench alignment``)."""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from ..backbones import load_backbone
from ..backbones.lora import load_lora
from ..config import RunConfig
from ..toyworld import shapes
from ..toyworld.bases import find_base
from ..toyworld.pairs import make_pairs
from . import precise
from .experiment import ORACLES, TOY_GUIDANCE, evaluate, load_rewards

# objective name -> config overrides that differ from the DPO defaults (later issues add theirs)
# DRO reads expert images (the pool's best image of each prompt) instead of pairs; its rollouts use
# 10 steps (the toy sampler's budget is 20; the official 20 would double DRO's cost per step).
OBJECTIVE_SETTINGS: dict[str, dict[str, Any]] = {
    "dpo": {"objective": {"name": "dpo", "beta": 2000.0}},
    "inpo": {"objective": {"name": "inpo", "beta": 2000.0, "inversion_steps": 10, "inversion_eta": 0.1}},
    "mapo": {"objective": {"name": "mapo", "beta": 0.1, "snr_value": 0.5}},
    "dro": {"objective": {"name": "dro", "margin": 0.001, "rollout_steps": 10, "buffer_size": 4}},
    # SePPO: DPO's beta; 10-step reference rollouts as DRO's; a checkpoint every 50 updates (8 in 400 steps)
    "seppo": {"objective": {"name": "seppo", "beta": 2000.0, "rollout_steps": 10, "snapshot_every": 50,
                            "max_snapshots": 16, "criterion": "reference"}},
    # the same with the reference samples drawn as the data were (stock sampler, CFG 5)
    "seppo_cfg": {"objective": {"name": "seppo", "beta": 2000.0, "rollout_steps": 10, "snapshot_every": 50,
                                "max_snapshots": 16, "guidance_scale": TOY_GUIDANCE, "criterion": "reference"}},
    # the criterion ablation: the paper's anchor-based flipper, and checkpoint replay alone (always DPO)
    "seppo_anchor": {"objective": {"name": "seppo", "beta": 2000.0, "rollout_steps": 10, "snapshot_every": 50,
                                   "max_snapshots": 16, "criterion": "anchor"}},
    "seppo_never": {"objective": {"name": "seppo", "beta": 2000.0, "rollout_steps": 10, "snapshot_every": 50,
                                  "max_snapshots": 16, "criterion": "never"}},
}


# LoRA learning rates in the toy world: DPO's and InPO's from the DPO bench; MaPO's and DRO's from one
# probe each after 1e-3 failed for them (docs/BENCHMARKS.md, "Offline objectives side by side").
TOY_LR: dict[str, float] = {"dpo": 1e-3, "inpo": 1e-3, "mapo": 1e-4, "dro": 1e-3, "seppo": 1e-3, "seppo_cfg": 1e-3,
                         "seppo_anchor": 1e-3, "seppo_never": 1e-3}


def run_config(base: str | Path, pairs: str | Path, out: str | Path, objective: str, seed: int, steps: int,
               batch_size: int = 16, lr: float | None = None, checkpoint_every: int = 0,
               experts: str | Path | None = None) -> RunConfig:
    """A toy-world run of ``objective`` (``lr`` None: the objective's ``TOY_LR``); DRO trains on ``experts``
    (default: ``experts/`` beside the pairs)."""
    lr = TOY_LR[objective] if lr is None and objective in TOY_LR else (lr or 1e-3)
    if objective not in OBJECTIVE_SETTINGS:
        raise KeyError(f"objective {objective!r} has no toy-world settings; known: {', '.join(OBJECTIVE_SETTINGS)}")
    raw: dict[str, Any] = {
        "model": {"path": str(base), "lora": True, "lora_rank": 8},
        "data": {"train": str(pairs), "prompt_dropout": 0.1, "random_flip": False},
        "train": {
            "output_dir": str(out), "seed": seed, "steps": steps, "batch_size": batch_size, "lr": lr,
            "lr_scheduler": "constant_with_warmup", "warmup_steps": max(1, steps // 20),
            "checkpoint_every": checkpoint_every, "keep_checkpoints": 0, "sample_every": 0,
            "log_every": 10, "progress": True, "sample_prompts": ["a red circle", "a blue square at the top"],
            "sample_steps": 20, "sample_guidance": TOY_GUIDANCE,
        },
    }
    for section, values in OBJECTIVE_SETTINGS[objective].items():
        raw.setdefault(section, {}).update(values)
    if objective == "dro" or objective.startswith("seppo"):  # winner-only objectives read expert images
        raw["data"]["train"] = str(experts or Path(pairs).parent / "experts")
    return RunConfig.model_validate(raw)


# DiffusionNFT in the toy world, as measured in docs/BENCHMARKS.md ("Online RL with the precise protocol"):
# rollouts of 8 train prompts x 4 samples (10 ODE steps, CFG 5), the 5 noisiest levels trained per rollout,
# KL 1e-2 to the reference, LoRA rank 8 at lr 2e-3; train prompts 80% two-object scenes (the held-out
# evaluation is 79% two-object).
ONLINE_SETTINGS: dict[str, dict[str, Any]] = {
    "nft": {"objective": {"name": "nft", "steps": 10, "group_size": 4, "guidance_scale": TOY_GUIDANCE,
                          "timestep_fraction": 0.5, "kl_beta": 1e-2, "decay_rate": 0.001, "decay_max": 0.5},
            "train": {"lr": 2e-3, "batch_size": 8}},
}


def online_run_config(base: str | Path, out: str | Path, objective: str = "nft", seed: int = 0, steps: int = 400,
                      reward: str = "toy_shape", prompts: str = "toy:train:512:0.8", checkpoint_every: int = 0) -> RunConfig:
    """A toy-world online run of ``objective`` (``ONLINE_SETTINGS``) through the training loop, trained on
    ``reward`` over the ``prompts`` source."""
    if objective not in ONLINE_SETTINGS:
        raise KeyError(f"objective {objective!r} has no online toy-world settings; known: {', '.join(ONLINE_SETTINGS)}")
    raw: dict[str, Any] = {
        "model": {"path": str(base), "lora": True, "lora_rank": 8},
        "data": {"train": prompts, "prompt_dropout": 0.0},
        "reward": {"train": reward},
        "train": {
            "output_dir": str(out), "seed": seed, "steps": steps, "lr_scheduler": "constant", "weight_decay": 1e-4,
            "max_grad_norm": 1.0, "checkpoint_every": checkpoint_every, "keep_checkpoints": 0, "sample_every": 0,
            "log_every": 10, "progress": True, "sample_prompts": ["a red circle", "a blue square at the top"],
            "sample_steps": 20, "sample_guidance": TOY_GUIDANCE,
        },
    }
    for section, values in ONLINE_SETTINGS[objective].items():
        raw.setdefault(section, {}).update(values)
    return RunConfig.model_validate(raw)


def toy_experts(pairs_dir: str | Path, reward: Any, out: str | Path | None = None, min_score: float = 0.5) -> Path:
    """DRO's experts in the toy world: the best of the k images of every train prompt (from the pair
    sample's ``rankings.jsonl``) by the labelling reward, kept if it scores above ``min_score``. The
    same images and labels that made the pairs: the budgets compare."""
    from PIL import Image

    from ..data.relabel import select_experts

    out = Path(out or Path(pairs_dir) / "experts")
    rankings = Path(pairs_dir) / "rankings.jsonl"
    if not (out / "experts.jsonl").exists():
        first = json.loads(rankings.read_text().splitlines()[0])["images"][0]
        with Image.open(Path(pairs_dir) / first) as im:
            size = im.size[0]  # score and store at the toy images' own size
        select_experts(rankings, reward, out, top=None, per_prompt=1, min_score=min_score, resolution=size)
    return out


def pair_winners(pairs_dir: str | Path, out: str | Path) -> Path:
    """The winners of a pair folder's decided pairs as expert data: ``out/experts.jsonl`` (returned), pointing at
    the pair images; ties left out. SePPO's data beside DPO's pairs: the same winners."""
    out = Path(out)
    jsonl = out / "experts.jsonl"
    if not jsonl.exists():
        import os

        out.mkdir(parents=True, exist_ok=True)
        rows = [json.loads(x) for x in (Path(pairs_dir) / "pairs.jsonl").read_text().splitlines() if x.strip()]
        lines = []
        for r in rows:
            if r["label_0"] == 0.5:
                continue
            img = Path(pairs_dir) / r["jpg_0" if r["label_0"] == 1.0 else "jpg_1"]
            lines.append(json.dumps({"image": os.path.relpath(img.resolve(), out.resolve()), "caption": r["caption"]}))
        jsonl.write_text("\n".join(lines) + "\n")
    return jsonl


def steps_to_reach(points: list[dict[str, float]], metric: str, level: float) -> int | None:
    """The first checkpoint step whose ``metric`` reaches ``level`` (None if none does)."""
    return next((int(p["step"]) for p in points if p["step"] > 0 and p[metric] >= level), None)


def evaluate_model(model_dir: str | Path, lora: str | Path | None, prompts: list[str], rs: dict[str, Any],
                   seeds: int, steps: int, guidance: float) -> tuple[dict[str, float], torch.Tensor]:
    bb = load_backbone(model_dir)
    if lora:
        load_lora(bb, lora)
    return evaluate(bb, prompts, rs, seeds=seeds, steps=steps, guidance_scale=guidance)


def score_model(model_dir: str | Path, lora: str | Path | None, protocol: precise.Protocol,
                rs: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Per-sample scores of the base (plus ``lora``) on ``protocol`` (``precise.sample_scores``)."""
    bb = load_backbone(model_dir)
    if lora:
        load_lora(bb, lora)
    return precise.sample_scores(bb, protocol, rs)


def reward_curve(model_dir: str | Path, run_dir: str | Path, prompts: list[str], rs: dict[str, Any],
                 steps: int, guidance: float, seeds: int = 1) -> list[dict[str, float]]:
    """Metrics of every saved checkpoint's LoRA (step 0 = the base), ``seeds`` samples per prompt."""
    from ..training.checkpoints import list_checkpoints

    points = [{"step": 0, **evaluate_model(model_dir, None, prompts, rs, seeds, steps, guidance)[0]}]
    for ck in list_checkpoints(run_dir):
        step = json.loads((ck / "diffalign_checkpoint.json").read_text())["step"]
        points.append({"step": step, **evaluate_model(model_dir, ck / "lora", prompts, rs, seeds, steps, guidance)[0]})
    return points


def plot_curve(points: list[dict[str, float]], metrics: list[str], path: str | Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for m in metrics:
        ax.plot([p["step"] for p in points], [p[m] for p in points], marker="o", label=m)
    ax.set_xlabel("training step")
    ax.set_ylabel("held-out score")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def bench_alignment(
    base: str | Path, pairs: str | Path, objectives: list[str], seeds: int, out: str | Path,
    eval_prompts: list[str], target: str, steps: int = 300, batch_size: int = 16, lr: float | None = None,
    eval_seeds: int = 4, sample_steps: int = 20, guidance: float = TOY_GUIDANCE, clip_path: str | None = None,
    curve_every: int = 0, experts: str | Path | None = None, curve_prompts: int = 64, curve_seeds: int = 4,
) -> dict[str, Any]:
    """Every objective from the same base on the same pairs with the same budget, over ``seeds``.
    Base and tuned models are scored on the same ``eval_prompts`` x ``eval_seeds`` samples (same starting
    noise); each gain gets a 95% paired bootstrap interval over those samples (``precise.gain``) beside the
    spread over training seeds. ``curve_every``: also score a checkpoint every that many steps on the target
    metric (the first ``curve_prompts`` held-out prompts x ``curve_seeds`` samples) and report the steps each
    objective needs to reach the first objective's final mean gain there."""
    from ..training import train

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    names = list(ORACLES) + ["toy_aesthetic"] + (["toy_clip"] if clip_path else [])
    rs = load_rewards(names, clip_path)
    protocol = precise.Protocol.of(eval_prompts, eval_seeds, steps=sample_steps, guidance=guidance)
    base_scores = score_model(base, None, protocol, rs)
    before = precise.means(base_scores)
    results: dict[str, Any] = {"target_metric": target, "base": before, "objectives": {}, "settings": {
        "steps": steps, "batch_size": batch_size, "lr": lr or {o: TOY_LR.get(o) for o in objectives},
        "seeds": seeds, "eval_prompts": len(eval_prompts), "eval_samples": protocol.n,
        "eval_seeds": eval_seeds, "sample_steps": sample_steps, "guidance": guidance, "pairs": str(pairs)}}
    if curve_every:
        n_curve = min(curve_prompts, len(eval_prompts))
        results["settings"]["curve_samples"] = f"{n_curve} prompts x {curve_seeds} samples per point"
    for obj in objectives:
        runs, run_scores = [], []
        for s in range(seeds):
            run_dir = out / f"{obj}_seed{s}"
            t0 = time.time()
            cfg = run_config(base, pairs, run_dir, obj, seed=s, steps=steps, batch_size=batch_size, lr=lr,
                             checkpoint_every=curve_every, experts=experts)
            if curve_every:
                cfg.train.keep_checkpoints = 0  # keep them all for the curve
            res = train(cfg, resume="auto")  # an interrupted bench continues its runs
            wall = time.time() - t0
            scores = score_model(base, res["weights"], protocol, rs)
            run_scores.append(scores)
            run = {"seed": s, "after": precise.means(scores), "train_seconds": wall, "seconds_per_step": wall / steps}
            if curve_every:
                run["curve"] = reward_curve(base, run_dir, eval_prompts[:curve_prompts], {target: rs[target]},
                                            sample_steps, guidance, seeds=curve_seeds)
            runs.append(run)
        summary = {}
        intervals = precise.gains(base_scores, run_scores)
        for m in before:
            gains = [r["after"][m] - before[m] for r in runs]
            mu, sd = mean_std(gains)
            summary[m] = {"gain_mean": mu, "gain_std": sd, "after_mean": mean_std([r["after"][m] for r in runs])[0],
                          "ci_low": intervals[m]["low"], "ci_high": intervals[m]["high"]}
        summary["train_seconds"] = dict(zip(("mean", "std"), mean_std([r["train_seconds"] for r in runs]), strict=True))
        results["objectives"][obj] = {"runs": runs, "summary": summary}
    if curve_every:
        _add_steps_to_reach(results, target)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "results.md").write_text(results_table(results))
    plot_bench(results, out / "results.png")
    if curve_every:
        plot_reach(results, out / "results_curves.png")
    return results


def results_table(results: dict[str, Any]) -> str:
    base = results["base"]
    metrics = list(base)
    st = results["settings"]
    lines = [f"target metric: `{results['target_metric']}`; gains are after - base on {st.get('eval_samples', '?')} "
             f"held-out samples (same noise), mean [95% paired bootstrap interval over samples] ± std over "
             f"{st['seeds']} training seeds; {st['steps']} steps each", ""]
    reach = results.get("reach")
    extra = " s/step |" + (" steps to reach |" if reach else "")
    lines.append("| objective | " + " | ".join(metrics) + " |" + extra)
    lines.append("|---" * (len(metrics) + 2 + bool(reach)) + "|")
    lines.append("| base (value) | " + " | ".join(f"{base[m]:.3f}" for m in metrics) + " | - |" + (" - |" if reach else ""))
    for obj, r in results["objectives"].items():
        s = r["summary"]
        cells = [f"{s[m]['gain_mean']:+.3f}" + (f" [{s[m]['ci_low']:+.3f}, {s[m]['ci_high']:+.3f}]" if "ci_low" in s[m]
                                                else "") + f" ± {s[m]['gain_std']:.3f}" for m in metrics]
        per_step = s["train_seconds"]["mean"] / results["settings"]["steps"]
        row = f"| {obj} (gain) | " + " | ".join(cells) + f" | {per_step:.3f} |"
        if reach:
            row += " " + ", ".join("never" if v is None else str(v) for v in s.get("steps_to_reach", [])) + " |"
        lines.append(row)
    if reach:
        lines.append("")
        lines.append(f"steps to reach: the first checkpoint (per training seed) whose `{reach['metric']}` on the held-out "
                     f"prompts ({st.get('curve_samples', 'one sample each')}) reaches {reach['level']:.3f}, the final "
                     f"mean of `{reach['reference']}` "
                     f"on the same curve (base {reach['base']:.3f}); 'never' = not within the budget.")
    return "\n".join(lines) + "\n"


def plot_bench(results: dict[str, Any], path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = list(results["base"])
    objs = list(results["objectives"])
    fig, ax = plt.subplots(figsize=(1.2 * len(metrics) + 2, 3.6))
    w = 0.8 / max(1, len(objs))
    for i, o in enumerate(objs):
        s = results["objectives"][o]["summary"]
        xs = [j + i * w for j in range(len(metrics))]
        ax.bar(xs, [s[m]["gain_mean"] for m in metrics], w, yerr=[s[m]["gain_std"] for m in metrics], label=o, capsize=3)
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xticks([j + 0.4 - w / 2 for j in range(len(metrics))], metrics, rotation=30, ha="right")
    ax.set_ylabel("gain over base (held-out)")
    ax.set_title(f"toy world, target {results['target_metric']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def _add_steps_to_reach(results: dict[str, Any], target: str) -> None:
    """Per objective: steps for each seed's curve to reach the first objective's mean final curve gain."""
    objs = results["objectives"]
    first = next(iter(objs))
    curves = [r["curve"] for r in objs[first]["runs"]]
    start = statistics.fmean(c[0][target] for c in curves)
    level = statistics.fmean(c[-1][target] for c in curves)
    results["reach"] = {"reference": first, "metric": target, "base": start, "level": level}
    for o in objs.values():
        reached = [steps_to_reach(r["curve"], target, level) for r in o["runs"]]
        o["summary"]["steps_to_reach"] = reached


def plot_reach(results: dict[str, Any], path: str | Path) -> Path:
    """The target metric against training step, mean over seeds (thin lines: each seed), with the level
    that 'steps to reach' uses."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = results["reach"]["metric"]
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for i, (name, o) in enumerate(results["objectives"].items()):
        color = f"C{i}"
        curves = [r["curve"] for r in o["runs"]]
        steps = [p["step"] for p in curves[0]]
        for c in curves:
            ax.plot(steps, [p[metric] for p in c], color=color, lw=0.6, alpha=0.35)
        ax.plot(steps, [statistics.fmean(c[j][metric] for c in curves) for j in range(len(steps))], color=color,
                lw=2, marker="o", ms=3, label=name)
    ax.axhline(results["reach"]["level"], color="k", ls="--", lw=0.8, label=f"{results['reach']['reference']} final")
    ax.set_xlabel("training step")
    ax.set_ylabel(f"held-out {metric}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def run_bench(objectives: list[str], seeds: int, out: str | Path, *, base: str | Path | None = None,
              pairs: str | Path | None = None, reward: str = "toy_shape", target: str = "toy_shape",
              clip: str | None = None, pair_prompts: int = 1024, pair_seed: int = 0, k: int = 4, steps: int = 400,
              curve_every: int = 0, batch_size: int = 16, lr: float | None = None, eval_prompts: int = 256,
              eval_seeds: int = 4) -> dict[str, Any]:
    """``diffalign bench alignment``: sample pairs from the toy SD base (unless ``pairs`` is given),
    train each objective over ``seeds`` and compare them on held-out prompts."""
    import rewards

    base, out = find_base(base), Path(out)
    pairs_dir = Path(pairs) if pairs else out / "pairs"
    labeller = rewards.from_spec(reward, paths={"toy_clip": clip})
    if not pairs and not (pairs_dir / "pairs.jsonl").exists():
        make_pairs(load_backbone(base / "sd"), shapes.prompts("train", n=pair_prompts, seed=pair_seed),
                   labeller, pairs_dir, k=k, seed=pair_seed)
    experts = toy_experts(pairs_dir, labeller) if "dro" in objectives else None
    return bench_alignment(
        base / "sd", pairs_dir / "pairs.jsonl", objectives, seeds, out, shapes.eval_prompts(eval_prompts, seed=1),
        target=target, steps=steps, batch_size=batch_size, lr=lr, eval_seeds=eval_seeds, clip_path=clip,
        curve_every=curve_every, experts=experts,
    )
