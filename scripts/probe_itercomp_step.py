"""Probe of IterComp's policy step alone: ReFL from the toy SD base on FIXED composition heads (one round's
``heads/`` folder) at several (lr, steps, KL weight), each scored on held-out prompts by the pixel oracles
and by the heads themselves (the reward it was tuned on), paired with the base on the same noise.

    OMP_NUM_THREADS=1 python scripts/probe_itercomp_step.py --heads RUN/round_1/heads --out runs/probe \\
        1e-4_60_1 3e-4_60_1 1e-3_60_1 1e-3_200_0

Each SPEC is LR_STEPS_BETAKL; the rest of the ReFL settings come from --config (configs/toy_itercomp.yaml).
Per-sample scores are cached in OUT/<spec>.pt; the report is OUT/probe.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("specs", nargs="+", help="LR_STEPS_BETAKL, e.g. 3e-4_60_1")
    ap.add_argument("--heads", required=True, help="a heads folder written by the IterComp loop (ROUND/heads)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--config", default="configs/toy_itercomp.yaml")
    ap.add_argument("--eval-prompts", type=int, default=128)
    ap.add_argument("--eval-seeds", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    import rewards
    from diffalign.backbones import load_backbone
    from diffalign.backbones.lora import load_lora
    from diffalign.bench import precise
    from diffalign.config import RunConfig, load_config
    from diffalign.training import train

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = load_config(args.config, [])
    proto = precise.Protocol(prompts=args.eval_prompts, seeds=args.eval_seeds)
    caps = proto.captions()
    oracles = {o: rewards.load(o) for o in ("toy_shape", "toy_position", "toy_count")}
    heads = rewards.from_spec(f"toy_composition={args.heads}")

    def score(bb, tag: str) -> dict[str, torch.Tensor]:
        f = out / f"{tag}.pt"
        if f.exists():
            return torch.load(f, weights_only=True)
        imgs = precise.sample_images(bb, proto)
        s = {k: r(imgs, caps).float() for k, r in oracles.items()}
        s["composition"] = sum(s.values()) / 3
        with torch.no_grad():
            s["heads"] = torch.cat([heads(imgs[i : i + 128], caps[i : i + 128]).float() for i in range(0, len(caps), 128)])
        torch.save(s, f)
        return s

    base = score(load_backbone(cfg.model.path), "base")
    report = {"heads": args.heads, "protocol": proto.as_dict(), "base": precise.means(base), "runs": {}}
    for spec in args.specs:
        lr, steps, kl = spec.split("_")
        raw = cfg.model_dump(mode="json")
        raw["reward"]["train"] = f"toy_composition={args.heads}"
        raw["train"].update(output_dir=str(out / spec), lr=float(lr), steps=int(steps), checkpoint_every=1000,
                            progress=False)
        raw["objective"]["beta_kl"] = float(kl)
        t = time.time()
        if (out / f"{spec}.pt").exists():  # scored before: no retraining
            scores = score(None, spec)
        else:
            res = train(RunConfig.model_validate(raw), resume="auto")
            bb = load_backbone(cfg.model.path)
            load_lora(bb, res["weights"])
            scores = score(bb, spec)
        g = precise.gains(base, [scores], n_boot=2000)
        report["runs"][spec] = {k: {"mean": v["mean"], "low": v["low"], "high": v["high"]} for k, v in g.items()}
        print(spec, f"{time.time() - t:.0f}s", {k: precise.fmt_gain(v) for k, v in g.items()}, flush=True)
        (out / "probe.json").write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
