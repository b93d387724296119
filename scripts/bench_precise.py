"""Toy-world alignment bench with the precise evaluation (``diffalign.bench.precise``).

Every objective from one base, on one pair sample, with one budget, scored on >= 1024 held-out samples
(the same prompts and starting noise for every model) with paired bootstrap intervals of each gain.
Every per-sample score tensor is cached under ``--out`` (``scores/*.pt``), so an interrupted bench
continues where it stopped and a table can be rebuilt without sampling again.

Objectives: ``dpo``, ``mapo``, ``inpo``, ``dro`` (experts: the best base sample of each train prompt by
the labelling reward), ``seppo`` (the winners of the decided pairs only, DPO's winners), and two that are given ground truth instead of a reward:
``dro_render`` (experts: the generator's renders of the train prompts, off the base's distribution) and
``dpo_render`` (pairs: the render wins over one base sample of the same prompt, no reward involved).

``--curve OBJ,...``: those objectives also save a checkpoint every ``--curve-every`` steps and each is
scored on a smaller protocol (``--curve-prompts`` x ``--curve-seeds``); the report gives each curve with
a bootstrap band and the steps each objective needs to reach the first curve objective's final level,
with a bootstrap interval.

Example (the SD3-style flow base, labelled and scored by shape)::

    OMP_NUM_THREADS=1 python scripts/bench_precise.py --base diffalign/toyworld/base/sd3 \
        --objectives dpo,mapo,inpo,dro --seeds 2 --out runs/precise_sd3
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from diffalign.bench import precise
from diffalign.bench.alignment import TOY_LR, pair_winners, run_config, toy_experts
from diffalign.bench.experiment import ORACLES, load_rewards
from diffalign.bench.precise import Protocol
from diffalign.toyworld.pairs import make_pairs

METRICS = [*ORACLES, "toy_aesthetic"]


def _scores(path: Path, make: Any) -> dict[str, torch.Tensor]:
    if path.exists():
        return torch.load(path, weights_only=True)
    s = make()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(s, path)
    return s


def _backbone(base: Path, lora: Path | None) -> Any:
    from diffalign.backbones import load_backbone
    from diffalign.backbones.lora import load_lora

    bb = load_backbone(base)
    if lora is not None:
        load_lora(bb, lora)
    return bb


def render_data(pairs_dir: Path, out: Path, seed: int = 0) -> tuple[Path, Path]:
    """Ground-truth data for ``dro_render`` / ``dpo_render`` from the pair sample's train prompts:
    ``out/experts`` (one render per prompt) and ``out/pairs`` (render vs the prompt's first base sample,
    the render labelled the winner; the winner side is drawn at random)."""
    from PIL import Image

    from diffalign.toyworld.pairs import write_pairs
    from diffalign.toyworld.shapes import render_captions

    experts, pairs = out / "experts", out / "pairs"
    rows = [json.loads(x) for x in (pairs_dir / "rankings.jsonl").read_text().splitlines()]
    captions = [r["caption"] for r in rows]
    renders = render_captions(captions, seed=seed)
    if not (experts / "experts.jsonl").exists():
        from torchvision.utils import save_image

        experts.mkdir(parents=True, exist_ok=True)
        with open(experts / "experts.jsonl", "w") as f:
            for i, c in enumerate(captions):
                save_image(renders[i], experts / f"{i:06d}.png")
                (experts / f"{i:06d}.txt").write_text(c)
                f.write(json.dumps({"image": f"{i:06d}.png", "caption": c}) + "\n")
    if not (pairs / "pairs.jsonl").exists():
        import numpy as np

        samples = torch.stack([
            torch.from_numpy(np.asarray(Image.open(pairs_dir / r["images"][0]).convert("RGB"), dtype=np.float32) / 255)
            .permute(2, 0, 1) for r in rows
        ])
        g = torch.Generator().manual_seed(seed)
        render_first = torch.rand(len(rows), generator=g) < 0.5
        i0 = torch.where(render_first[:, None, None, None], renders, samples)
        i1 = torch.where(render_first[:, None, None, None], samples, renders)
        write_pairs(pairs, captions, i0, i1, render_first.float())
    return experts, pairs


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True, help="a toy base pipeline folder (e.g. diffalign/toyworld/base/sd3)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--pairs", default=None, help="pair folder (default OUT/pairs, sampled from the base when missing)")
    ap.add_argument("--label", default="toy_shape", help="labelling reward of the pairs and DRO's expert selection")
    ap.add_argument("--target", default=None, help="target metric of the report (default: --label)")
    ap.add_argument("--pair-prompts", type=int, default=1024)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--objectives", default="dpo,mapo,inpo,dro",
                    help="comma-separated; NAME:N trains that objective with N seeds instead of --seeds")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=None, help="one lr for all (default: each objective's TOY_LR)")
    ap.add_argument("--eval-prompts", type=int, default=256)
    ap.add_argument("--eval-seeds", type=int, default=4)
    ap.add_argument("--curve", default="", help="objectives scored every --curve-every steps")
    ap.add_argument("--curve-every", type=int, default=10)
    ap.add_argument("--curve-prompts", type=int, default=64)
    ap.add_argument("--curve-seeds", type=int, default=4)
    ap.add_argument("--curve-seed-runs", type=int, default=1, help="training seeds with curves (the first N)")
    ap.add_argument("--boot", type=int, default=2000)
    ap.add_argument("--compare", default="", help="A:B,... paired differences A - B of the seed-averaged models "
                    "on the same samples (default: every X_render against X when both ran)")
    args = ap.parse_args(argv)
    n_seeds: dict[str, int] = {}
    for spec in (o for o in args.objectives.split(",") if o):
        name, _, n = spec.partition(":")
        if n and not (n.isdigit() and int(n) > 0):
            ap.error(f"--objectives: {spec!r}: the seed count after ':' must be a positive integer")
        n_seeds[name] = int(n) if n else args.seeds
    compare: list[tuple[str, str]] = []
    for spec in (c for c in args.compare.split(",") if c):
        a, sep, b = spec.partition(":")
        if not sep or a not in n_seeds or b not in n_seeds:
            ap.error(f"--compare: {spec!r} must be A:B with A and B among --objectives ({', '.join(n_seeds)})")
        compare.append((a, b))
    compare = compare or [(o, o.removesuffix("_render")) for o in n_seeds
                          if o.endswith("_render") and o.removesuffix("_render") in n_seeds]
    torch.set_num_threads(1)

    from diffalign.training import train

    base, out = Path(args.base), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    target = args.target or args.label
    proto = Protocol(prompts=args.eval_prompts, seeds=args.eval_seeds)
    curve_proto = Protocol(prompts=args.curve_prompts, seeds=args.curve_seeds)
    rs = load_rewards(METRICS)
    pairs_dir = Path(args.pairs) if args.pairs else out / "pairs"
    t0 = time.time()
    if not (pairs_dir / "pairs.jsonl").exists():
        from diffalign.toyworld.shapes import prompts

        print(f"sampling pairs into {pairs_dir}", flush=True)
        make_pairs(_backbone(base, None), prompts("train", n=args.pair_prompts, seed=0), rs[args.label], pairs_dir,
                   k=args.k, seed=0)
    objectives = list(n_seeds)
    curves = [o for o in args.curve.split(",") if o]
    experts_best = out / "experts_best"
    if any(o == "dro" for o in objectives) and not (experts_best / "experts.jsonl").exists():
        toy_experts(pairs_dir, rs[args.label], out=experts_best)
    if any(o.startswith("seppo") for o in objectives):  # SePPO: the pairs' winners only (DPO trains on the same pairs)
        seppo_winners = pair_winners(pairs_dir, out / "winners")
    if any(o.endswith("_render") for o in objectives):
        render_experts, render_pairs = render_data(pairs_dir, out / "render")

    base_scores = _scores(out / "scores" / "base.pt", lambda: precise.sample_scores(
        _backbone(base, None), proto, rs, progress=True, desc="base"))
    results: dict[str, Any] = {
        "base_dir": str(base), "pairs": str(pairs_dir), "label": args.label, "target": target,
        "protocol": proto.as_dict(), "steps": args.steps, "seeds": args.seeds,
        "base": precise.means(base_scores), "objectives": {},
    }
    curve_data: dict[str, list[tuple[list[int], torch.Tensor]]] = {}
    seed_scores: dict[str, list[dict[str, torch.Tensor]]] = {}
    for obj in objectives:
        kind = obj.removesuffix("_render")
        runs, seconds = [], []
        for s in range(n_seeds[obj]):
            run_dir = out / f"{obj}_seed{s}"
            want_curve = obj in curves and s < args.curve_seed_runs
            data = pairs_dir / "pairs.jsonl"
            experts = experts_best
            if obj == "dpo_render":
                data = render_pairs / "pairs.jsonl"
            if obj == "dro_render":
                experts = render_experts
            if obj.startswith("seppo"):
                experts = seppo_winners
            lr = args.lr if args.lr is not None else TOY_LR.get(kind)
            cfg = run_config(base, data, run_dir, kind, seed=s, steps=args.steps, lr=lr,
                             batch_size=args.batch_size, checkpoint_every=args.curve_every if want_curve else 0, experts=experts)
            if want_curve:
                cfg.train.keep_checkpoints = 0
            t = time.time()
            if not (run_dir / "final" / "lora").exists():
                print(f"training {obj} seed {s}", flush=True)
                train(cfg, resume="auto")
            seconds.append(time.time() - t)
            lora = run_dir / "final" / "lora"
            runs.append(_scores(out / "scores" / f"{obj}_seed{s}.pt", lambda lora=lora, obj=obj, s=s: precise.sample_scores(
                _backbone(base, lora), proto, rs, progress=True, desc=f"{obj} seed {s}")))
            if want_curve:
                curve_data.setdefault(obj, []).append(_curve(base, run_dir, out, obj, s, curve_proto, rs[target], target))
        seed_scores[obj] = runs
        results["objectives"][obj] = {
            "lr": lr, "seeds": n_seeds[obj], "after": {m: sum(precise.means(r)[m] for r in runs) / len(runs) for m in base_scores},
            "gains": precise.gains(base_scores, runs, n_boot=args.boot),
            "target_by_scene": precise.gain_by_scene(base_scores[target], [r[target] for r in runs], proto, args.boot),
            "train_seconds": seconds,
        }
        _write(out, results)
    for a, b in compare:
        results.setdefault("compare", {})[f"{a} - {b}"] = {
            m: precise.gain(_mean_scores(seed_scores[b], m), [_mean_scores(seed_scores[a], m)], n_boot=args.boot)
            for m in (target, "toy_oracle")}
    if curves:
        results["curves"] = _curve_report(curve_data, curves[0], args.boot)
        _plot_curves(results["curves"], out / "curves.png", target)
    results["wall_minutes"] = (time.time() - t0) / 60
    _write(out, results)
    print(table(results))
    return results


def _curve(base: Path, run_dir: Path, out: Path, obj: str, seed: int, proto: Protocol, reward: Any,
           target: str) -> tuple[list[int], torch.Tensor]:
    """Per-sample target scores at step 0 (the base) and at every checkpoint: ``(steps, [S, N])``."""
    from diffalign.training.checkpoints import list_checkpoints

    def score(lora: Path | None, name: str) -> torch.Tensor:
        return _scores(out / "scores" / "curve" / f"{name}.pt", lambda: precise.sample_scores(
            _backbone(base, lora), proto, {target: reward}, desc=name))[target]

    steps, rows = [0], [score(None, "base")]
    for ck in list_checkpoints(run_dir):
        step = int(json.loads((ck / "diffalign_checkpoint.json").read_text())["step"])
        steps.append(step)
        rows.append(score(ck / "lora", f"{obj}_seed{seed}_step{step}"))
    return steps, torch.stack(rows)


def _curve_report(data: dict[str, list[tuple[list[int], torch.Tensor]]], reference: str, n_boot: int) -> dict[str, Any]:
    rep: dict[str, Any] = {"reference": reference, "objectives": {}}
    ref_steps, ref = data[reference][0][0], torch.stack([c for _, c in data[reference]]).mean(0)
    for obj, runs in data.items():
        steps = runs[0][0]
        n = min(len(s) for s, _ in runs)
        curve = torch.stack([c[:n] for _, c in runs]).mean(0)  # seed-averaged, [S, N]
        rep["objectives"][obj] = {
            "steps": steps[:n],
            "band": precise.curve_band(list(zip(steps[:n], curve, strict=True)), n_boot=min(n_boot, 1000)),
            "reach": precise.reach_interval(steps[:n], curve, ref[len(ref_steps) - 1], n_boot=min(n_boot, 1000)),
        }
    rep["level"] = float(ref[-1].double().mean())
    return rep


def _plot_curves(rep: dict[str, Any], path: Path, target: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for i, (name, o) in enumerate(rep["objectives"].items()):
        b = o["band"]
        x = [p["step"] for p in b]
        ax.plot(x, [p["mean"] for p in b], color=f"C{i}", lw=1.8, label=name)
        ax.fill_between(x, [p["low"] for p in b], [p["high"] for p in b], color=f"C{i}", alpha=0.2)
    ax.axhline(rep["level"], color="k", ls="--", lw=0.8, label=f"{rep['reference']} final")
    ax.set_xlabel("training step")
    ax.set_ylabel(f"held-out {target}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def table(results: dict[str, Any]) -> str:
    metrics = list(results["base"])
    p = results["protocol"]
    lines = [f"base `{results['base_dir']}`, pairs labelled by `{results['label']}`, {results['steps']} steps, "
             f"{results['seeds']} training seeds unless the row says otherwise; held-out {p['prompts']} prompts x {p['seeds']} seeds = "
             f"{p['samples']} samples, same noise for every model. Gain: mean over seeds [95% paired bootstrap "
             "interval over samples] ±std over training seeds.", "",
             "| objective | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 1) + "|",
             "| base (value) | " + " | ".join(f"{results['base'][m]:.3f}" for m in metrics) + " |"]
    for obj, r in results["objectives"].items():
        seeds = r.get("seeds", results["seeds"])
        name = obj if seeds == results["seeds"] else f"{obj} ({seeds} seeds)"
        lines.append(f"| {name} | " + " | ".join(precise.fmt_gain(r["gains"][m]) for m in metrics) + " |")
    lines += ["", f"{results['target']} gain by scene (held-out samples of one-object / two-object prompts):"]
    for obj, r in results["objectives"].items():
        parts = [f"{k} (n={g['n']}): {precise.fmt_gain(g)}" for k, g in r.get("target_by_scene", {}).items()]
        lines.append(f"- {obj}: " + "; ".join(parts))
    for name, g in results.get("compare", {}).items():
        lines.append(f"- paired, {name}: " + "; ".join(f"{m} {precise.fmt_gain(v)}" for m, v in g.items()))
    if "curves" in results:
        c = results["curves"]
        lines += ["", f"steps to reach {c['reference']}'s final level ({c['level']:.3f}):"]
        for obj, o in c["objectives"].items():
            r = o["reach"]
            lines.append(f"- {obj}: {r['steps']} [{r['low']:.0f}, {r['high']:.0f}], not reached in "
                         f"{r['never_fraction']:.0%} of resamples")
    return "\n".join(lines) + "\n"


def _mean_scores(runs: list[dict[str, torch.Tensor]], metric: str) -> torch.Tensor:
    return torch.stack([r[metric].double() for r in runs]).mean(0)


def _write(out: Path, results: dict[str, Any]) -> None:
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "results.md").write_text(table(results))


if __name__ == "__main__":
    main()
