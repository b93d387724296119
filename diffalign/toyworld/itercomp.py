"""IterComp's iterative loop (Zhang et al., ICLR 2025; arXiv 2410.07171) in the toy world: a gallery of models
ranks, the composition reward heads are refined on the rankings, the policy is tuned by reward feedback on the
refined heads, and the tuned policy joins the gallery of the next round.

Round r (folder ``OUT/round_r``; a finished round has ``round.json`` and is skipped on a rerun):

1. gallery: the base model and the policy of every earlier round (each a diffusers folder; a policy is its
   round's starting model with the round's LoRA fused in, ``round_k/policy_model``) sample
   ``samples_per_model`` images of each of ``gallery_prompts`` train prompts (noise seeded by round and model).
2. rankings: per prompt, all the gallery's images ranked per head by its annotator (the pixel oracles,
   ``toy_composition.ANNOTATORS``: the toy stand-in for IterComp's human / expert rankings), ``rankings.pt``;
   the same for ``eval_prompts_heads`` held-out prompts, ``eval_rankings.pt`` (never trained on).
3. heads: the previous round's heads (round 1: freshly initialised, seeded) are refined with the
   Bradley-Terry loss on the rankings (``toy_composition.refine``), ``heads/``. Their ranking accuracy on the
   held-out rankings is measured before and after.
4. policy: the training config's objective (ReFL or DRaFT, ``objectives/reward_feedback.py``) runs through
   ``diffalign.training.train`` from the previous round's policy with ``reward.train`` = the refined heads
   (``toy_composition=ROUND/heads``), into ``policy/`` (resumable: ``resume="auto"``), then the LoRA is fused
   into ``policy_model/``.
5. evaluation: composition accuracy of the policy by the pixel oracles (shape = attribute binding,
   position = spatial, count; and their mean) on held-out prompts, same noise every round, ``eval.pt``.

Every stage writes its result before the next starts and is reused when present, so a killed run resumes
at the stage it was in (the policy training itself from its last checkpoint).
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from rewards.toy_composition import ANNOTATORS, HEADS, CompositionHeads, Rankings, ranking_accuracy, refine

from ..bench import precise
from ..config import RunConfig
from .pairs import TOY_GUIDANCE

logger = logging.getLogger(__name__)

ORACLE_OF = {"attribute": "toy_shape", "spatial": "toy_position", "count": "toy_count"}


@dataclass
class IterCompSettings:
    gallery_prompts: int = 128
    samples_per_model: int = 2
    eval_prompts_heads: int = 32
    refine_steps: int = 200
    refine_lr: float = 1e-3
    score_l2: float = 0.01
    pairs_per_step: int = 512
    eval_prompts: int = 64
    eval_seeds: int = 2
    sample_steps: int = 20
    guidance: float = TOY_GUIDANCE
    seed: int = 0
    annotators: dict[str, str] = field(default_factory=lambda: dict(ANNOTATORS))


def _save_atomic(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


def _cached(path: Path, make: Any) -> Any:
    if path.exists():
        return torch.load(path, weights_only=True)
    obj = make()
    _save_atomic(obj, path)
    return obj


def _load(model_dir: Path) -> Any:
    from ..backbones import load_backbone

    return load_backbone(str(model_dir))


def _annotate(images: torch.Tensor, prompts: list[str], annotators: dict[str, str]) -> dict[str, torch.Tensor]:
    import rewards

    out = {}
    for h in HEADS:
        r = rewards.load(annotators[h])
        out[h] = torch.cat([r(images[i : i + 256], prompts[i : i + 256]).detach().float().cpu()
                            for i in range(0, len(images), 256)])
    return out


def gallery_rankings(gallery: list[Path], captions: list[str], s: IterCompSettings, noise_seed: int,
                     desc: str) -> Rankings:
    """Every gallery model samples ``samples_per_model`` images per caption; one group per caption."""
    imgs, prompts, groups = [], [], []
    for m, model_dir in enumerate(gallery):
        proto = precise.Protocol.of(captions, s.samples_per_model, steps=s.sample_steps, guidance=s.guidance,
                                    noise_seed=noise_seed * 1000 + m)
        imgs.append(precise.sample_images(_load(model_dir), proto, progress=True, desc=f"{desc}: {model_dir.name}"))
        prompts += proto.captions()
        groups.append(torch.arange(len(captions)).repeat_interleave(s.samples_per_model))
    images = torch.cat(imgs)
    return Rankings(images, prompts, torch.cat(groups), _annotate(images, prompts, s.annotators))


def fuse_lora_into(model_dir: Path, lora_dir: Path, out: Path) -> Path:
    """``model_dir`` with the LoRA at ``lora_dir`` fused into its denoiser, saved as a diffusers folder."""
    from ..backbones.lora import load_lora

    bb = _load(model_dir)
    load_lora(bb, lora_dir)
    bb.pipe.fuse_lora()
    bb.pipe.unload_lora_weights()
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    bb.pipe.save_pretrained(str(tmp))
    tmp.replace(out)
    return out


def eval_protocol(s: IterCompSettings) -> precise.Protocol:
    return precise.Protocol(prompts=s.eval_prompts, seeds=s.eval_seeds, steps=s.sample_steps, guidance=s.guidance)


def composition_scores(model_dir: Path, s: IterCompSettings, cache: Path) -> dict[str, torch.Tensor]:
    """Per-sample oracle scores on the held-out protocol, with ``composition`` = mean of the three aspects
    (the images, uint8, are kept beside them: ``CACHE.images.pt``)."""
    import rewards

    def make() -> dict[str, torch.Tensor]:
        proto = eval_protocol(s)
        images = precise.sample_images(_load(model_dir), proto, progress=True, desc=f"evaluating {model_dir.name}")
        _save_atomic((images.clamp(0, 1) * 255).round().to(torch.uint8), cache.with_name(cache.stem + ".images.pt"))
        caps = proto.captions()
        out = {o: rewards.load(o)(images, caps).float().cpu() for o in ORACLE_OF.values()}
        out["composition"] = sum(out[o] for o in ORACLE_OF.values()) / len(ORACLE_OF)
        return out

    return _cached(cache, make)


def _materialise_base(cfg: RunConfig, out: Path) -> Path:
    """The base model as a folder: the config's ``model.path``, or a built tiny pipeline saved once."""
    path = cfg.model.path
    if not path.startswith("tiny:"):
        return Path(path)
    target = out / "base_model"
    if not (target / "model_index.json").exists():
        from ..backbones.tiny import build_tiny_pipeline

        tmp = target.with_name("base_model.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        build_tiny_pipeline(path.split(":", 1)[1], seed=cfg.train.seed).save_pretrained(str(tmp))
        tmp.replace(target)
    return target


def run_itercomp(cfg: RunConfig, rounds: int, out: str | Path, settings: IterCompSettings | None = None,
                 stop_after: int | None = None) -> dict[str, Any]:
    """Run (or continue) ``rounds`` IterComp rounds into ``out``; ``stop_after`` ends the call after that round
    (the next call continues). Returns ``{"base": ..., "rounds": [...]}`` (also ``out/itercomp.json``)."""
    from ..training import train
    from .shapes import eval_prompts, prompts

    s = settings or IterCompSettings()
    if cfg.objective.name not in ("refl", "draft", "alignprop"):
        raise ValueError(f"itercomp: objective.name must be a reward-feedback objective (refl, draft, alignprop), "
                         f"got {cfg.objective.name!r}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"settings": asdict(s), "config": cfg.model_dump(mode="json")}
    meta_file = out / "itercomp_settings.json"
    if meta_file.exists():
        old = json.loads(meta_file.read_text())
        if old != json.loads(json.dumps(meta)):
            changed = sorted(k for k in old["settings"] if old["settings"][k] != meta["settings"].get(k))
            raise ValueError(f"{meta_file}: this folder holds an IterComp run with other settings "
                             f"({', '.join(changed) or 'the training config'} differ); use another --out")
    else:
        meta_file.write_text(json.dumps(meta, indent=2))

    base = _materialise_base(cfg, out)
    base_scores = composition_scores(base, s, out / "base_eval.pt")
    report: dict[str, Any] = {"base": precise.means(base_scores), "rounds": []}
    train_caps = prompts("train", n=s.gallery_prompts, seed=s.seed)
    heldout_caps = eval_prompts(s.eval_prompts_heads, seed=s.seed + 1)
    prev_policy, prev_heads = base, None
    gallery = [base]
    for r in range(1, rounds + 1):
        rd = out / f"round_{r}"
        rd.mkdir(exist_ok=True)
        done = rd / "round.json"
        if not done.exists():
            _run_round(cfg, r, rd, gallery, prev_policy, prev_heads, train_caps, heldout_caps, base_scores, s, train)
        res = json.loads(done.read_text())
        report["rounds"].append(res)
        prev_policy, prev_heads = rd / "policy_model", rd / "heads"
        gallery = [*gallery, prev_policy]
        (out / "itercomp.json").write_text(json.dumps(report, indent=2))
        if stop_after is not None and r >= stop_after:
            break
    return report


def _run_round(cfg: RunConfig, r: int, rd: Path, gallery: list[Path], prev_policy: Path, prev_heads: Path | None,
               train_caps: list[str], heldout_caps: list[str], base_scores: dict[str, torch.Tensor],
               s: IterCompSettings, train: Any) -> None:
    logger.info("IterComp round %d: gallery %s", r, [g.name for g in gallery])
    rk = Rankings.from_state(_cached(rd / "rankings.pt", lambda: gallery_rankings(
        gallery, train_caps, s, noise_seed=2 * r + 100 * s.seed, desc=f"round {r} gallery").state_dict()))
    ev = Rankings.from_state(_cached(rd / "eval_rankings.pt", lambda: gallery_rankings(
        gallery, heldout_caps, s, noise_seed=2 * r + 1 + 100 * s.seed, desc=f"round {r} held-out gallery").state_dict()))

    # heads: refine the previous round's on this round's rankings (Bradley-Terry)
    heads_dir, acc_file = rd / "heads", rd / "heads_accuracy.json"
    if not (heads_dir / "heads.safetensors").exists():
        torch.manual_seed(s.seed)
        heads = CompositionHeads.load(prev_heads) if prev_heads else CompositionHeads()
        before = ranking_accuracy(heads, ev)
        losses = refine(heads, rk, steps=s.refine_steps, lr=s.refine_lr, pairs_per_step=s.pairs_per_step,
                        seed=s.seed + r, score_l2=s.score_l2, progress=True)
        after = ranking_accuracy(heads, ev)
        acc_file.write_text(json.dumps({"before": before, "after": after, "train_after": ranking_accuracy(heads, rk),
                                        "bt_loss_first": losses[0] if losses else None,
                                        "bt_loss_last": losses[-1] if losses else None,
                                        "pairs": {h: len(rk.pairs(h)) for h in HEADS},
                                        "eval_pairs": {h: len(ev.pairs(h)) for h in HEADS}}))
        tmp = rd / "heads.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        heads.save(tmp)
        tmp.replace(heads_dir)
    acc = json.loads(acc_file.read_text())

    # policy: reward feedback on the refined heads, from the previous round's policy
    policy_model = rd / "policy_model"
    if not (policy_model / "model_index.json").exists():
        raw = cfg.model_dump(mode="json")
        raw["model"]["path"] = str(prev_policy)
        raw["reward"]["train"] = f"toy_composition={heads_dir}"
        raw["train"]["output_dir"] = str(rd / "policy")
        raw["train"]["seed"] = cfg.train.seed + r + 1000 * s.seed
        result = train(RunConfig.model_validate(raw), resume="auto")
        if result.get("status") not in ("completed", "early_stopped"):
            raise RuntimeError(f"itercomp round {r}: policy training {result.get('status')}; rerun to resume")
        fuse_lora_into(prev_policy, Path(result["weights"]), policy_model)

    scores = composition_scores(policy_model, s, rd / "eval.pt")
    gains = precise.gains(base_scores, [scores], n_boot=1000)
    heads_gain = _heads_reward_gain(heads_dir, rd / "eval.images.pt", rd.parent / "base_eval.images.pt", s)
    res = {"round": r, "gallery": [str(g) for g in gallery], "heads_accuracy": acc,
           "policy": precise.means(scores),
           "gain_vs_base": {k: {"mean": v["mean"], "low": v["low"], "high": v["high"]} for k, v in gains.items()},
           "heads_reward_gain": heads_gain}
    (rd / "round.json").write_text(json.dumps(res, indent=2))


@torch.no_grad()
def _heads_reward_gain(heads_dir: Path, policy_images: Path, base_images: Path, s: IterCompSettings) -> dict[str, Any] | None:
    """The round's refined heads (the reward its policy was tuned on, mean of the heads) on the held-out
    evaluation images of the policy and of the base (same noise): does the policy step climb its own
    reward on held-out prompts? ``None`` when an image file is missing (runs from before they were kept)."""
    if not (policy_images.exists() and base_images.exists()):
        return None
    from rewards.toy_composition import ToyCompositionReward

    r = ToyCompositionReward(CompositionHeads.load(heads_dir))
    caps = eval_protocol(s).captions()

    def score(path: Path) -> torch.Tensor:
        imgs = torch.load(path, weights_only=True).float() / 255
        return torch.cat([r(imgs[i : i + 256], caps[i : i + 256]).float() for i in range(0, len(caps), 256)])

    b, p = score(base_images), score(policy_images)
    g = precise.gain(b, [p], n_boot=1000)
    return {"base": float(b.mean()), "policy": float(p.mean()), "mean": g["mean"], "low": g["low"], "high": g["high"]}


def table(report: dict[str, Any]) -> str:
    """A markdown table: per round, the oracles' composition accuracy and the heads' ranking accuracy."""
    keys = ["toy_shape", "toy_position", "toy_count", "composition"]
    lines = ["| round | shape (attribute) | position (spatial) | count | composition (mean) | "
             "heads' ranking acc. before -> after refinement (attribute / spatial / count) |",
             "|---|---|---|---|---|---|",
             "| 0 (base) | " + " | ".join(f"{report['base'][k]:.3f}" for k in keys) + " | - |"]
    for res in report["rounds"]:
        g = res["gain_vs_base"]
        cells = [f"{res['policy'][k]:.3f} ({g[k]['mean']:+.3f} [{g[k]['low']:+.3f}, {g[k]['high']:+.3f}])" for k in keys]
        a = res["heads_accuracy"]
        accs = " / ".join(f"{a['before'][h]:.2f} -> {a['after'][h]:.2f}" for h in HEADS)
        lines.append(f"| {res['round']} | " + " | ".join(cells) + f" | {accs} |")
    return "\n".join(lines) + "\n"
