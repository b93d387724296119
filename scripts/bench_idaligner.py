"""ID-Aligner in the toy world: identity similarity and the aesthetic proxy before/after, LoRA and adapter.

Toy identities (``diffalign.toyworld.identity``): 12 named characters, a head shape above a body shape.
Training reward: ``toy_identity:1,toy_aesthetic:1`` (the paper's L_id_sim + L_id_aes), ReFL-style
(``objective idaligner``), on the toy SD-style base.

* LoRA form: one LoRA per character (``--lora-chars``), prompt "a portrait of NAME", the character's 4
  reference renders as ``reward.reference_faces`` and L_id_lora (``--lora-weight``). Evaluated on the same
  prompt: before = the base model, after = with the LoRA, same starting noise (paired).
* Adapter form: one adapter (decoupled cross-attention, only its projections train), prompt "a portrait",
  each row a random identity with a fresh set of 4 reference renders (their toy-identity embedding is the
  adapter's input), drawn from every head/body combination except the 4 HELD-OUT characters
  (``--adapter-pool all``, 266 identities) or from the 8 named TRAIN characters only (``named``); evaluated
  on the 4 HELD-OUT characters (never seen in adapter training): before = the base model on "a portrait"
  (no reference), after = the adapter fed the held-out reference; also on the 8 named train characters.

Scores per sample: toy_identity against the character's evaluation references (4 renders, seed 0; training
drew its references from other seeds), identity_acc (1 when the sample's nearest of the 12 characters, by
the identity network, is the asked-for one; chance 1/12) and toy_aesthetic; gains with a paired bootstrap 95% interval
(``diffalign.bench.stats.paired_bootstrap``), per seed and pooled over seeds. Grids (seed-wise PNGs): per
character its 4 references, 6 samples before, 6 after. Results are cached per
(form, seed) in ``--out`` so an interrupted run continues.

    OMP_NUM_THREADS=1 python scripts/bench_idaligner.py --seeds 0,1,2 --out runs/bench_idaligner
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

import rewards
from diffalign.backbones import load_backbone
from diffalign.backbones.lora import add_lora
from diffalign.backbones.user_attention import injection_parameters, with_user
from diffalign.bench.stats import paired_bootstrap
from diffalign.objectives import build_objective
from diffalign.personalization.encoder import load_image_encoder
from diffalign.personalization.inject import generate_personalized
from diffalign.toyworld.bases import find_base
from diffalign.toyworld.identity import (
    CHARACTERS,
    HELDOUT_CHARACTERS,
    TRAIN_CHARACTERS,
    all_identities,
    character,
    portrait_prompt,
    reference_images,
)
from diffalign.toyworld.pairs import seeded_latents
from diffalign.toyworld.shapes import Scene, render

K = 4  # reference renders per character


def objective(args, form: str):
    opts = dict(steps=args.chain_steps, k_lo=args.k_lo, k_hi=args.k_hi, guidance_scale=args.guidance)
    if form == "lora":
        return build_objective("idaligner", form="lora", lora_weight=args.lora_weight, **opts)
    return build_objective("idaligner", form="adapter", embed_dim=32, tokens=4, **opts)


def score(reward, images, refs):
    ctx = {"reference_faces": refs}
    with torch.no_grad():
        m = reward.member_scores(images, [""] * len(images), ctx)
    return {k: v.float().cpu() for k, v in m.items()}


def sample(bb, prompts, emb, seed):
    lat = seeded_latents(bb, len(prompts), seed, offset=0)
    return generate_personalized(bb, prompts, emb, latents=lat, steps=20, guidance_scale=args_g(), negative="zero")


def args_g():
    return ARGS.guidance


def train_lora(args, model_dir, name: str, seed: int, reward, log):
    torch.manual_seed(seed)
    bb = load_backbone(model_dir)
    add_lora(bb, rank=args.rank)
    obj = objective(args, "lora")
    obj.setup(bb, reward=reward)
    params = bb.trainable_parameters()
    opt = torch.optim.AdamW(params, lr=args.lr_lora, weight_decay=1e-4)
    refs = reference_images(name, K, seed=1000 + seed)[None]  # [1,K,...]: not the evaluation renders
    prompts = [portrait_prompt(name)] * args.batch
    for step in tqdm(range(args.steps), desc=f"lora {name} seed {seed}", leave=False):
        batch = {"prompts": prompts, "cond": bb.encode_prompts(prompts), "references": refs}
        loss, m = obj.loss(batch, bb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        log.append({"form": "lora", "char": name, "seed": seed, "step": step + 1, **{k: float(v) for k, v in m.items()}})
    return bb


def train_adapter(args, model_dir, seed: int, reward, encoder, log):
    torch.manual_seed(seed)
    bb = load_backbone(model_dir)
    obj = objective(args, "adapter")
    obj.setup(bb, reward=reward)  # installs the adapter; the denoiser is frozen
    bb.denoiser.requires_grad_(False)
    for p in injection_parameters(bb):
        p.requires_grad_(True)
    params = injection_parameters(bb)
    opt = torch.optim.AdamW(params, lr=args.lr_adapter, weight_decay=1e-4)
    rng = random.Random(seed)
    nrng = np.random.default_rng(seed)
    pool = adapter_pool(args.adapter_pool)
    for step in tqdm(range(args.adapter_steps), desc=f"adapter seed {seed}", leave=False):
        scenes = [rng.choice(pool) for _ in range(args.batch)]
        refs = torch.stack([torch.from_numpy(np.stack([render(sc, nrng) for _ in range(K)])) for sc in scenes])
        emb = torch.stack([encoder(r) for r in refs])
        prompts = ["a portrait"] * args.batch
        batch = {"prompts": prompts, "cond": with_user(bb.encode_prompts(prompts), emb), "references": refs}
        loss, m = obj.loss(batch, bb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        log.append({"form": "adapter", "seed": seed, "step": step + 1, **{k: float(v) for k, v in m.items()}})
    return bb


def adapter_pool(kind: str) -> list[Scene]:
    """What the adapter trains on: the 8 named TRAIN characters, or every head/body combination except the
    4 HELD-OUT characters' (266 identities; the held-out ones stay unseen either way)."""
    held = {(character(n).head, character(n).body) for n in HELDOUT_CHARACTERS}
    if kind == "named":
        return [character(n).scene() for n in TRAIN_CHARACTERS]
    if kind == "all":
        return [Scene((h, b), relation="above") for h, b in all_identities() if (h, b) not in held]
    raise SystemExit(f"--adapter-pool: named or all, got {kind!r}")


def identity_accuracy(reward, images, name) -> torch.Tensor:
    """1 where the image's nearest character (cosine to each of the 12 characters' mean reference embedding)
    is ``name``, else 0: the identity as a 12-way recognition."""
    net = reward.members["toy_identity"].net
    with torch.no_grad():
        refs = torch.stack([torch.nn.functional.normalize(net(reference_images(c, K, seed=0)).mean(0), dim=-1)
                            for c in CHARACTERS])
        nearest = (net(images) @ refs.T).argmax(1)
    return (nearest == list(CHARACTERS).index(name)).float()


def evaluate_chars(bb, names, prompt_of, emb_of, reward, n, seed, shown=None):
    """Per character n samples (noise seeded by seed), scored against its evaluation references; the first
    6 samples of each go into ``shown[name]`` when given (for the grids)."""
    out = {"toy_identity": [], "toy_aesthetic": [], "identity_acc": []}
    for name in names:
        refs = reference_images(name, K, seed=0)[None]
        imgs = sample(bb, [prompt_of(name)] * n, emb_of(name), seed)
        s = score(reward, imgs, refs)
        s["identity_acc"] = identity_accuracy(reward, imgs, name)
        for k in out:
            out[k].append(s[k])
        if shown is not None:
            shown[name] = imgs[:6]
    return {k: torch.cat(v) for k, v in out.items()}


def save_rows(path: Path, names, before: dict, after: dict) -> None:
    """One row per character: its 4 evaluation references, 6 samples before, 6 after (same noise)."""
    from diffalign.utils.images import save_grid

    rows = [torch.cat([reference_images(n, K, seed=0), before[n], after[n]]) for n in names]
    save_grid(torch.cat(rows), path, nrow=4 + 6 + 6, upscale=2)


def summarize(before, after, seed=0):
    res = {}
    for k in before:
        ci = paired_bootstrap(before[k], after[k], seed=seed)
        res[k] = {"before": float(before[k].mean()), "after": float(after[k].mean()), "gain": ci.mean,
                  "ci95": [ci.low, ci.high], "n": len(before[k])}
    return res


def main() -> None:
    global ARGS
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", default="0")
    p.add_argument("--forms", default="lora,adapter")
    p.add_argument("--lora-chars", default="Ada,Ivo")
    p.add_argument("--steps", type=int, default=200, help="LoRA training steps per character")
    p.add_argument("--adapter-steps", type=int, default=600)
    p.add_argument("--adapter-pool", default="all", help="named: the 8 TRAIN characters; all: every head/body "
                   "combination except the 4 HELD-OUT characters'")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--lr-lora", type=float, default=1e-3)
    p.add_argument("--lr-adapter", type=float, default=1e-3)
    p.add_argument("--lora-weight", type=float, default=0.1)
    p.add_argument("--chain-steps", type=int, default=10)
    p.add_argument("--k-lo", type=int, default=5)
    p.add_argument("--k-hi", type=int, default=9)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--eval-n", type=int, default=32, help="samples per character")
    p.add_argument("--base", default=None)
    p.add_argument("--out", default="runs/bench_idaligner")
    p.add_argument("--identity-net", default=None, help="toy identity network folder of the training reward and the "
                   "adapter's input embedding (default: the shipped one, trained on all 270 identities)")
    p.add_argument("--eval-identity-net", default=None, help="the network that scores the samples (default: "
                   "--identity-net)")
    args = ARGS = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model_dir = find_base(args.base) / "sd"
    net = f"toy_identity={args.identity_net}" if args.identity_net else "toy_identity"
    reward = rewards.from_spec(f"{net}:1,toy_aesthetic:1")
    encoder = load_image_encoder(net)
    eval_net = args.eval_identity_net or args.identity_net
    judge = rewards.from_spec(f"toy_identity={eval_net}:1,toy_aesthetic:1") if eval_net else reward
    base = load_backbone(model_dir)
    for seed in [int(s) for s in args.seeds.split(",")]:
        for form in args.forms.split(","):
            f = out / f"{form}_seed{seed}.json"
            if f.exists():
                print(f"{f} exists: skipped", flush=True)
                continue
            log: list[dict] = []
            t0, c0 = time.time(), time.process_time()
            res: dict = {"form": form, "seed": seed, "settings": vars(args)}
            if form == "lora":
                res["chars"] = {}
                shown_b, shown_a = {}, {}
                for name in args.lora_chars.split(","):
                    tuned = train_lora(args, model_dir, name, seed, reward, log)
                    before = evaluate_chars(base, [name], portrait_prompt, lambda n: None, judge, args.eval_n,
                                            777 + seed, shown_b)
                    after = evaluate_chars(tuned, [name], portrait_prompt, lambda n: None, judge, args.eval_n,
                                           777 + seed, shown_a)
                    res["chars"][name] = {"summary": summarize(before, after, seed),
                                          "before": {k: v.tolist() for k, v in before.items()},
                                          "after": {k: v.tolist() for k, v in after.items()}}
                save_rows(out / f"lora_seed{seed}.png", list(shown_b), shown_b, shown_a)
            else:
                tuned = train_adapter(args, model_dir, seed, reward, encoder, log)
                res["splits"] = {}
                for split, names in (("heldout", HELDOUT_CHARACTERS), ("train", TRAIN_CHARACTERS)):
                    shown_b, shown_a = {}, {}
                    before = evaluate_chars(base, names, lambda n: "a portrait", lambda n: None, judge,
                                            args.eval_n, 777 + seed, shown_b)
                    after = evaluate_chars(tuned, names, lambda n: "a portrait",
                                           lambda n: encoder(reference_images(n, K, seed=0)), judge,
                                           args.eval_n, 777 + seed, shown_a)
                    save_rows(out / f"adapter_{split}_seed{seed}.png", names, shown_b, shown_a)
                    res["splits"][split] = {"summary": summarize(before, after, seed),
                                            "before": {k: v.tolist() for k, v in before.items()},
                                            "after": {k: v.tolist() for k, v in after.items()}}
            res["wall_s"], res["cpu_s"] = time.time() - t0, time.process_time() - c0
            (out / f"{form}_seed{seed}.log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
            f.write_text(json.dumps(res))
            short = res.get("chars") or res.get("splits")
            print(form, seed, {k: v["summary"] for k, v in short.items()}, f"wall {res['wall_s']:.0f}s", flush=True)
    pooled(out)


def pooled(out: Path) -> None:
    """Pool every cached seed: per form/group, the paired gain over all samples of all seeds."""
    groups: dict[str, dict[str, list]] = {}
    for f in sorted(out.glob("*_seed*.json")):
        r = json.loads(f.read_text())
        for g, d in (r.get("chars") or r.get("splits")).items():
            key = f"{r['form']}/{g}"
            acc = groups.setdefault(key, {"seeds": []})
            acc["seeds"].append(r["seed"])
            for k in d["before"]:
                acc.setdefault(("before", k), []).extend(d["before"][k])
                acc.setdefault(("after", k), []).extend(d["after"][k])
    table = {}
    for key, acc in groups.items():
        table[key] = {"seeds": acc["seeds"]}
        for k in ("toy_identity", "identity_acc", "toy_aesthetic"):
            if ("before", k) not in acc:
                continue
            b, a = torch.tensor(acc[("before", k)]), torch.tensor(acc[("after", k)])
            ci = paired_bootstrap(b, a, seed=0)
            table[key][k] = {"before": float(b.mean()), "after": float(a.mean()), "gain": ci.mean,
                             "ci95": [ci.low, ci.high], "n": len(b)}
    (out / "pooled.json").write_text(json.dumps(table, indent=1))
    for key, t in table.items():
        print(key, t, flush=True)


ARGS: argparse.Namespace

if __name__ == "__main__":
    main()
