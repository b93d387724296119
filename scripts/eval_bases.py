"""Score toy base models on the precise held-out protocol and compare them sample by sample.

    OMP_NUM_THREADS=1 python scripts/eval_bases.py --out runs/eval_bases NAME=DIR [NAME=DIR ...]

Writes ``OUT/NAME.pt`` (per-sample scores, reused when present) and ``OUT/bases.json``/``bases.md``: each
model's mean with a 95% bootstrap interval, and the paired difference of every model from the first one
(meaningful between models of one latent space and protocol: same prompts, same starting noise).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from diffalign.bench import precise
from diffalign.bench.experiment import ORACLES, load_rewards
from diffalign.bench.precise import Protocol
from diffalign.toyworld.shapes import POSITION_PHRASE, RELATIONS

POSITION_WORDS = tuple(POSITION_PHRASE.values())


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+", help="NAME=DIR pairs; the first is the reference")
    ap.add_argument("--out", required=True)
    ap.add_argument("--prompts", type=int, default=256)
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--no-more-samples", action="store_true",
                    help="score what NAME.partial.pt holds (a stopped run) instead of sampling the rest")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    from diffalign.backbones import load_backbone

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    proto = Protocol(prompts=args.prompts, seeds=args.seeds)
    rs = load_rewards([*ORACLES, "toy_aesthetic"])
    scores = {}
    for spec in args.models:
        name, folder = spec.split("=", 1)
        path = out / f"{name}.pt"
        if not path.exists() or args.no_more_samples and (out / f"{name}.partial.pt").exists():
            # batch by batch into NAME.partial.pt, so a stopped run keeps its samples
            part = out / f"{name}.partial.pt"
            done = torch.load(part, weights_only=True) if part.exists() else {"images": torch.empty(0)}
            bb = load_backbone(folder)
            caps = proto.captions()
            for i in range(len(done["images"]), 0 if args.no_more_samples else proto.n, proto.batch_size):
                imgs = precise.sample_images(bb, proto, start=i, stop=i + proto.batch_size)
                done = {"images": torch.cat([done["images"], imgs])}
                torch.save(done, part)
                print(f"{name}: {len(done['images'])}/{proto.n} samples", flush=True)
            imgs = done["images"]
            torch.save(precise.score_images(imgs, caps[: len(imgs)], rs, proto.seeds), path)
        scores[name] = torch.load(path, weights_only=True)
    # a model stopped early has fewer samples: compare every model on the samples all of them have
    n = min(len(s["toy_color"]) for s in scores.values())
    scores = {k: {m: v[: n // proto.seeds] if m == "diversity" else v[:n] for m, v in s.items()}
              for k, s in scores.items()}
    ref = next(iter(scores))
    report = {"protocol": proto.as_dict(), "models": {}}
    report["samples_compared"] = n
    lines = [f"{proto.prompts} held-out prompts x {proto.seeds} seeds = {proto.n} samples ({n} compared); mean [95% bootstrap "
             f"interval]; 'vs {ref}': paired difference", "",
             "| model | " + " | ".join(scores[ref]) + " |", "|---" * (len(scores[ref]) + 1) + "|"]
    for name, s in scores.items():
        row = {m: precise.curve_band([(0, v)])[0] for m, v in s.items()}
        diff = {m: precise.gain(scores[ref][m], [v]) for m, v in s.items()} if name != ref else {}
        report["models"][name] = {"mean": row, f"vs_{ref}": diff}
        lines.append(f"| {name} | " + " | ".join(f"{row[m]['mean']:.3f} [{row[m]['low']:.3f}, {row[m]['high']:.3f}]"
                                                 for m in s) + " |")
        if diff:
            lines.append(f"| {name} vs {ref} | " + " | ".join(precise.fmt_gain(diff[m]) for m in s) + " |")
    # position split by prompt kind: a position word on one object ("... on the left") or a relation
    # between two objects ("... left of ..."); chance is about 1/5 for the first
    caps = proto.captions()[:n]
    word = torch.tensor([any(w in c for w in POSITION_WORDS) for c in caps])
    rel = torch.tensor([any(f" {r} " in f" {c} " for r in RELATIONS) for c in caps])
    lines += ["", f"toy_position by prompt kind ({int(word.sum())} samples with a position word, {int(rel.sum())} "
              "with a relation):", "", "| model | position word | relation |", "|---|---|---|"]
    for name, s in scores.items():
        cells = []
        for mask in (word, rel):
            b = precise.curve_band([(0, s["toy_position"][mask])])[0]
            cells.append(f"{b['mean']:.3f} [{b['low']:.3f}, {b['high']:.3f}]")
            report["models"][name].setdefault("position_by_kind", []).append(b)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    (out / "bases.json").write_text(json.dumps(report, indent=2))
    (out / "bases.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
