"""Pretrain the toy world's two tiny base models on CPU, with the project's own backbone code.

``build_toyworld(out_dir)`` writes two standard diffusers folders that ``load_backbone`` (and stock
diffusers) load, plus a report::

    out_dir/sd/                StableDiffusionPipeline: AutoencoderKL, UNet2DConditionModel (epsilon),
                               DDIMScheduler (scaled_linear 0.00085..0.012), CLIPTextModel + CLIP BPE
    out_dir/sd3/               StableDiffusion3Pipeline: the same VAE weights (shift_factor set),
                               SD3Transformer2DModel, FlowMatchEulerDiscreteScheduler,
                               two CLIPTextModelWithProjection and a tiny T5 encoder (toy-word tokenizer)
    out_dir/base_report.json   configs, parameter counts, losses, timings, CPU load and the oracle
                               accuracies on train and held-out prompts

Stages (every one deterministic in ``seed``):

1. Data: ``make_dataset(n_images, seed, "train")`` rendered once (32x32 RGB) for the denoisers, and
   ``make_dataset(vae_images, seed + 1, "all")`` for the VAE: the VAE is a generic image codec and must
   represent the held-out colour-shape pairs too (trained on the train split only, it reconstructs
   held-out images badly, which would cap every held-out score); captions never reach it.
2. VAE: AutoencoderKL 32x32x3 -> 4x8x8 in the SD3 configuration (no quant convs), trained briefly on
   reconstruction MSE + a tiny KL + a small penalty on the per-channel latent mean (so the latents are
   centred for both pipelines). ``scaling_factor = 1/std`` of the training latents; the SD3 copy also
   gets ``shift_factor = mean`` (the SD pipeline ignores shift_factor, so the SD copy leaves it unset).
   The training set is encoded once (posterior mean and std through the backbone's
   ``encode_images_dist``) and the denoisers train on posterior samples of those latents.
3. SD: UNet and CLIP text encoder trained jointly from scratch (the text encoder gets gradient from the
   denoising loss) with caption dropout, loss ``mse(bb.predict(bb.add_noise(x0, n, t), t, c), bb.target(x0, n, t))``
   per sample, weighted by Min-SNR-5 (``min(snr, 5) / snr``, Hang et al. 2023: it converges several
   times faster for epsilon prediction, which matters with a few minutes of CPU).
4. SD3: the transformer and all three text encoders, same loss through the FlowBackbone (logit-normal
   timesteps, shifted by the scheduler's ``shift``).
5. Evaluation: ``generate()`` on ``prompts("train", n)`` and ``eval_prompts(n)``, scored by the oracles.

Text conditioning with gradient: ``Backbone.encode_prompts`` runs under ``no_grad``, so the training
loops build the same tensors as the stock ``encode_prompt`` (checked against ``bb.encode_prompts``
after training, ``encode_check_max_abs`` in the report).

T5 in SD3: a pipeline saved with ``text_encoder_3=None`` only loads when ``from_pretrained`` is given
``text_encoder_3=None, tokenizer_3=None`` (diffusers does not list it as optional), which
``load_backbone`` does not pass; and without T5 the pipeline would feed 256 identical zero tokens
(the default ``max_sequence_length``), making every transformer call ~3x dearer on CPU. So SD3 gets a
tiny T5 encoder (2 layers, d_model = the joint attention width, ~50 word vocabulary from
``save_t5_tokenizer(TOY_WORDS)``) trained jointly like the CLIPs, and ``tokenizer_3`` has
``model_max_length = t5_tokens`` (16, enough for every toy caption), which ``FlowBackbone`` takes as its
sequence length: the context is 77 CLIP + 16 T5 tokens. The stock pipeline defaults to 256 T5 tokens
(T5 runs without an attention mask in SD3, so padding changes the context): call it with
``max_sequence_length=16`` to reproduce ``generate()``.

Threads: the build runs torch on one thread (``threads=1``). On a small shared machine, two OpenMP
threads are ~1.6x faster when the cores are idle but ~50x slower (measured: 11 s instead of 0.23 s per
UNet step) as soon as another process takes a core, because libgomp's worker threads spin at every
barrier; ``OMP_WAIT_POLICY=PASSIVE`` (set before torch starts) avoids the collapse but is then no
faster than one thread. One thread is also bitwise reproducible whatever the machine's load.

CLI: ``python -m diffalign.toyworld.pretrain OUT_DIR [--seed S] [--minutes M]``.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .shapes import COLORS, POSITION_PHRASE, RELATIONS, SHAPES, SIZES, make_dataset, prompts

TOY_WORDS: list[str] = sorted(
    {"a", "an", "of"} | set(COLORS) | set(SHAPES) | set(SIZES)
    | {w for p in POSITION_PHRASE.values() for w in p.split()} | {w for r in RELATIONS for w in r.split()}
)
"""Every word of the toy grammar (the T5 tokenizer's vocabulary)."""


@dataclass
class PretrainConfig:
    """Sizes, steps and sampling settings of the toy-world base models (defaults: the shipped build)."""

    n_images: int = 30_000
    vae_images: int = 10_000
    # VAE: 32x32x3 -> latent_channels x 8 x 8
    vae_blocks: tuple[int, ...] = (8, 16, 32)
    vae_groups: int = 4
    latent_channels: int = 4
    vae_steps: int = 400
    vae_batch: int = 32
    vae_lr: float = 3e-3
    vae_kl: float = 1e-7
    vae_center: float = 1e-2
    # text encoders (CLIP, real 49,408-token BPE vocabulary)
    clip_hidden: int = 32
    clip_hidden_2: int = 16  # SD3's second encoder (smaller, as CLIP-G / CLIP-L are unequal in SD3)
    clip_layers: int = 2
    clip_heads: int = 2
    # SD: UNet
    unet_blocks: tuple[int, ...] = (32, 64)  # attention at the 4x4 level and the mid block only
    unet_head_dim: int = 8
    sd_min_snr: float | None = 5.0
    sd_steps: int = 1600
    sd_batch: int = 64
    sd_lr: float = 1e-3
    # SD3: transformer
    flow_layers: int = 4
    flow_heads: int = 4
    flow_head_dim: int = 16
    flow_patch: int = 1
    flow_shift: float = 1.0
    t5_tokens: int = 16
    t5_layers: int = 2
    flow_steps: int = 1000
    flow_batch: int = 48
    flow_lr: float = 1e-3
    # training
    caption_dropout: float = 0.15
    warmup: int = 50
    weight_decay: float = 0.01
    # evaluation
    eval_prompts: int = 128
    eval_steps: int = 20
    sd_guidance: float = 5.0
    flow_guidance: float = 5.0
    eval_seed: int = 0
    progress: bool = True
    threads: int | None = 1  # torch threads during the build (None: leave as is); see the module docstring
    budget_fractions: dict[str, float] = field(default_factory=lambda: {"vae": 0.12, "sd": 0.36, "sd3": 0.36})


def build_toyworld(
    out_dir: str | Path,
    seed: int = 0,
    minutes_budget: float = 15.0,
    config: PretrainConfig | None = None,
) -> dict[str, Any]:
    """Train and save the toy world's base models; return (and write) ``base_report.json``.

    Step counts are fixed by ``config`` so the build is deterministic in ``seed``; ``minutes_budget`` is
    a safety cap: a training stage that overruns its share of it stops early and the report says so
    (``truncated``), which is the only way the result can depend on the machine's speed.
    """
    cfg = config or PretrainConfig()
    threads_before = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        return _build(Path(out_dir), seed, minutes_budget, cfg)
    finally:
        torch.set_num_threads(threads_before)


def _build(out: Path, seed: int, minutes_budget: float, cfg: PretrainConfig) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    report: dict[str, Any] = {
        "seed": seed,
        "minutes_budget": minutes_budget,
        "config": _jsonable(asdict(cfg)),
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "loadavg_start": list(os.getloadavg()),
        "truncated": {},
        "timings_s": {},
    }

    def deadline(stage: str) -> float:
        return time.time() + 60.0 * minutes_budget * cfg.budget_fractions.get(stage, 1.0)

    t = time.time()
    images, captions = make_dataset(cfg.n_images, seed=seed, split="train")
    vae_images, _ = make_dataset(cfg.vae_images, seed=seed + 1, split="all")
    report["timings_s"]["data"] = time.time() - t

    tok_dir = Path(tempfile.mkdtemp(prefix="diffalign_toytok_"))
    clip_tok, t5_tok = _tokenizers(tok_dir, cfg)

    # --- VAE ---------------------------------------------------------------------------------------
    t = time.time()
    torch.manual_seed(seed)
    vae = _make_vae(cfg)
    vae_log = _train_vae(vae, vae_images, cfg, seed, deadline("vae"))
    report["truncated"]["vae"] = vae_log.pop("truncated")
    vae.eval().requires_grad_(False)
    stats = _latent_stats(vae, images)
    report["vae"] = {**vae_log, **stats, "params": _count(vae)}
    report["timings_s"]["vae"] = time.time() - t

    # --- SD (UNet, epsilon) -----------------------------------------------------------------------
    t = time.time()
    sd_pipe = _make_sd_pipeline(cfg, seed, vae, stats, clip_tok)
    sd_log = _train_denoiser("sd", sd_pipe, images, captions, cfg, seed, deadline("sd"))
    report["truncated"]["sd"] = sd_log.pop("truncated")
    sd_pipe.save_pretrained(str(out / "sd"), safe_serialization=True)
    report["timings_s"]["sd_train"] = time.time() - t

    # --- SD3 (flow matching) ----------------------------------------------------------------------
    t = time.time()
    sd3_pipe = _make_sd3_pipeline(cfg, seed, vae, stats, clip_tok, t5_tok)
    sd3_log = _train_denoiser("sd3", sd3_pipe, images, captions, cfg, seed, deadline("sd3"))
    report["truncated"]["sd3"] = sd3_log.pop("truncated")
    sd3_pipe.save_pretrained(str(out / "sd3"), safe_serialization=True)
    report["timings_s"]["sd3_train"] = time.time() - t
    report["train_minutes"] = (time.time() - t_start) / 60.0

    # --- evaluation of the saved folders -----------------------------------------------------------
    t = time.time()
    report["vae_ceiling"] = _vae_ceiling(sd_pipe, cfg)
    for name, log, scale in (("sd", sd_log, cfg.sd_guidance), ("sd3", sd3_log, cfg.flow_guidance)):
        report[name] = {**log, **_evaluate_folder(out / name, cfg, scale), "folder_mb": _folder_mb(out / name)}
    report["timings_s"]["eval"] = time.time() - t
    report["total_minutes"] = (time.time() - t_start) / 60.0
    report["loadavg_end"] = list(os.getloadavg())
    (out / "base_report.json").write_text(json.dumps(_jsonable(report), indent=2))
    return report


# ------------------------------------------------------------------------------------------ parts


def _tokenizers(tmp: Path, cfg: PretrainConfig) -> tuple[Any, Any]:
    from transformers import AutoTokenizer

    from ..backbones.tokenizers import load_clip_tokenizer, save_clip_tokenizer, save_t5_tokenizer

    clip = load_clip_tokenizer(save_clip_tokenizer(tmp / "clip"))
    t5_dir = save_t5_tokenizer(tmp / "t5", TOY_WORDS, model_max_length=cfg.t5_tokens)
    t5 = AutoTokenizer.from_pretrained(str(t5_dir), local_files_only=True)
    return clip, t5


def _make_vae(cfg: PretrainConfig, **extra: Any) -> nn.Module:
    from diffusers import AutoencoderKL

    n = len(cfg.vae_blocks)
    return AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=tuple(cfg.vae_blocks), latent_channels=cfg.latent_channels,
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        layers_per_block=1, norm_num_groups=cfg.vae_groups, sample_size=32, mid_block_add_attention=False,
        use_quant_conv=False, use_post_quant_conv=False, **extra,
    )


def _lr_lambda(total: int, warmup: int) -> Callable[[int], float]:
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        p = (step - warmup) / max(1, total - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, p)))

    return f


def _train_vae(vae: nn.Module, images: torch.Tensor, cfg: PretrainConfig, seed: int, stop_at: float) -> dict[str, Any]:
    vae.train().requires_grad_(True)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg.vae_steps, min(cfg.warmup, cfg.vae_steps // 10)))
    g = torch.Generator().manual_seed(seed + 11)
    losses: list[float] = []
    truncated = False
    bar = tqdm(range(cfg.vae_steps), desc="vae", disable=not cfg.progress)
    for step in bar:
        idx = torch.randint(0, len(images), (cfg.vae_batch,), generator=g)
        x = images[idx] * 2 - 1
        dist = vae.encode(x).latent_dist
        z = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=g)
        rec = vae.decode(z).sample
        mse = F.mse_loss(rec, x)
        center = dist.mean.mean((0, 2, 3)).pow(2).sum()
        loss = mse + cfg.vae_kl * dist.kl().mean() + cfg.vae_center * center
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(mse.item())
        if step % 10 == 0:
            bar.set_postfix(mse=f"{_tail_mean(losses):.4f}")
        if time.time() > stop_at:
            truncated = True
            break
    bar.close()
    return {"steps": len(losses), "final_mse": _tail_mean(losses), "truncated": truncated}


@torch.no_grad()
def _latent_stats(vae: nn.Module, images: torch.Tensor, n: int = 4096) -> dict[str, float]:
    """Mean and std of the posterior means of (up to) ``n`` training images, raw latent units."""
    x = images[:n] * 2 - 1
    mu = torch.cat([vae.encode(x[i : i + 512]).latent_dist.mean for i in range(0, len(x), 512)])
    mean = float(mu.mean())
    # raw_rms: the spread about 0 (the SD pipeline has no shift_factor), latent_std: about the mean (SD3)
    return {"latent_mean": mean, "latent_std": float((mu - mean).std()), "raw_rms": float(mu.pow(2).mean().sqrt())}


def _clip_config(hidden: int, layers: int, heads: int) -> Any:
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=49408, hidden_size=hidden, intermediate_size=hidden * 4, num_attention_heads=heads,
        num_hidden_layers=layers, max_position_embeddings=77, projection_dim=hidden,
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, hidden_act="quick_gelu",
    )


def _make_sd_pipeline(cfg: PretrainConfig, seed: int, vae: nn.Module, stats: dict[str, float], tok: Any) -> Any:
    import diffusers as d
    from transformers import CLIPTextModel

    sd_vae = _make_vae(cfg, scaling_factor=1.0 / stats["raw_rms"])
    sd_vae.load_state_dict(vae.state_dict())
    torch.manual_seed(seed + 1)
    n = len(cfg.unet_blocks)
    unet = d.UNet2DConditionModel(
        sample_size=8, in_channels=cfg.latent_channels, out_channels=cfg.latent_channels,
        block_out_channels=tuple(cfg.unet_blocks), layers_per_block=1,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (n - 1) + ("UpBlock2D",),
        cross_attention_dim=cfg.clip_hidden, attention_head_dim=cfg.unet_head_dim, norm_num_groups=16,
    )
    torch.manual_seed(seed + 2)
    te = CLIPTextModel(_clip_config(cfg.clip_hidden, cfg.clip_layers, cfg.clip_heads))
    sched = d.DDIMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
    )
    return d.StableDiffusionPipeline(
        vae=sd_vae, text_encoder=te, tokenizer=tok, unet=unet, scheduler=sched, safety_checker=None,
        feature_extractor=None, image_encoder=None, requires_safety_checker=False,
    )


def _make_sd3_pipeline(
    cfg: PretrainConfig, seed: int, vae: nn.Module, stats: dict[str, float], tok: Any, t5_tok: Any
) -> Any:
    import diffusers as d
    from transformers import CLIPTextModelWithProjection, T5Config, T5EncoderModel

    sd3_vae = _make_vae(cfg, scaling_factor=1.0 / stats["latent_std"], shift_factor=stats["latent_mean"])
    sd3_vae.load_state_dict(vae.state_dict())
    joint = cfg.clip_hidden + cfg.clip_hidden_2
    torch.manual_seed(seed + 3)
    tr = d.SD3Transformer2DModel(
        sample_size=8, patch_size=cfg.flow_patch, in_channels=cfg.latent_channels, out_channels=cfg.latent_channels,
        num_layers=cfg.flow_layers, attention_head_dim=cfg.flow_head_dim, num_attention_heads=cfg.flow_heads,
        caption_projection_dim=cfg.flow_heads * cfg.flow_head_dim, joint_attention_dim=joint,
        pooled_projection_dim=joint, pos_embed_max_size=8 // cfg.flow_patch,
    )
    torch.manual_seed(seed + 4)
    te = CLIPTextModelWithProjection(_clip_config(cfg.clip_hidden, cfg.clip_layers, cfg.clip_heads))
    te2 = CLIPTextModelWithProjection(_clip_config(cfg.clip_hidden_2, cfg.clip_layers, cfg.clip_heads))
    te3 = T5EncoderModel(T5Config(
        vocab_size=len(t5_tok), d_model=joint, d_kv=8, d_ff=joint * 2, num_layers=cfg.t5_layers, num_heads=2,
        relative_attention_num_buckets=8, relative_attention_max_distance=32, feed_forward_proj="gated-gelu",
        dense_act_fn="gelu_new", is_encoder_decoder=False, dropout_rate=0.0, pad_token_id=0, eos_token_id=1,
        decoder_start_token_id=0,
    ))
    return d.StableDiffusion3Pipeline(
        transformer=tr, scheduler=d.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=cfg.flow_shift),
        vae=sd3_vae, text_encoder=te, tokenizer=tok, text_encoder_2=te2, tokenizer_2=tok,
        text_encoder_3=te3, tokenizer_3=t5_tok,
    )


class _PromptEncoder:
    """The stock pipelines' prompt encoding, with gradient to the text encoders.

    Captions are tokenized once (a table of unique captions plus ""), batches index into it.
    """

    def __init__(self, pipe: Any, captions: list[str], max_sequence_length: int) -> None:
        self.pipe = pipe
        self.is_sd3 = type(pipe).__name__ == "StableDiffusion3Pipeline"
        uniq = sorted(set(captions))
        self.table = [*uniq, ""]
        self.empty = len(uniq)
        pos = {c: i for i, c in enumerate(uniq)}
        self.index = torch.tensor([pos[c] for c in captions])
        tok = pipe.tokenizer
        self.ids = tok(self.table, padding="max_length", max_length=tok.model_max_length, truncation=True,
                       return_tensors="pt").input_ids
        self.encoders: list[nn.Module] = [pipe.text_encoder]
        if self.is_sd3:
            self.encoders += [pipe.text_encoder_2, pipe.text_encoder_3]
            self.t5_ids = pipe.tokenizer_3(self.table, padding="max_length", max_length=max_sequence_length,
                                           truncation=True, add_special_tokens=True, return_tensors="pt").input_ids

    def __call__(self, rows: torch.Tensor) -> Any:
        from ..backbones.base import Cond

        ids = self.ids[rows]
        if not self.is_sd3:
            return Cond({"encoder_hidden_states": self.pipe.text_encoder(ids)[0]})
        hidden, pooled = [], []
        for te in self.encoders[:2]:
            o = te(ids, output_hidden_states=True)
            pooled.append(o[0])
            hidden.append(o.hidden_states[-2])
        clip = torch.cat(hidden, -1)
        joint = self.pipe.transformer.config.joint_attention_dim
        clip = F.pad(clip, (0, joint - clip.shape[-1]))
        t5 = self.encoders[2](self.t5_ids[rows])[0]
        return Cond({"encoder_hidden_states": torch.cat([clip, t5], 1), "pooled_projections": torch.cat(pooled, -1)})


def _train_denoiser(
    name: str, pipe: Any, images: torch.Tensor, captions: list[str], cfg: PretrainConfig, seed: int, stop_at: float
) -> dict[str, Any]:
    """Joint training of the denoiser and the text encoder(s) through the backbone contract."""
    from ..backbones import load_backbone
    from ..backbones.base import per_sample_mse

    bb = load_backbone(pipe)  # freezes everything; we unfreeze what trains
    steps, batch, lr = (
        (cfg.sd_steps, cfg.sd_batch, cfg.sd_lr) if name == "sd" else (cfg.flow_steps, cfg.flow_batch, cfg.flow_lr)
    )
    encoder = _PromptEncoder(pipe, captions, getattr(bb, "max_sequence_length", 0))
    # latents of the whole training set, once: posterior mean and std, scaled (and shifted)
    t = time.time()
    means, stds = [], []
    for i in range(0, len(images), 512):
        m, s = bb.encode_images_dist(images[i : i + 512])
        means.append(m)
        stds.append(s)
    lat_mean, lat_std = torch.cat(means), torch.cat(stds)
    encode_s = time.time() - t

    trainable = [bb.denoiser, *encoder.encoders]
    for m in trainable:
        m.train().requires_grad_(True)
    decay, no_decay = [], []
    for m in trainable:
        for pname, p in m.named_parameters():
            (no_decay if p.ndim < 2 or "embed" in pname else decay).append(p)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=lr
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(steps, min(cfg.warmup, steps // 10)))
    g = torch.Generator().manual_seed(seed + (21 if name == "sd" else 31))
    params = [p for m in trainable for p in m.parameters()]
    losses: list[float] = []
    truncated = False
    t = time.time()
    bar = tqdm(range(steps), desc=name, disable=not cfg.progress)
    for step in bar:
        idx = torch.randint(0, len(images), (batch,), generator=g)
        x0 = lat_mean[idx] + lat_std[idx] * torch.randn(lat_mean[idx].shape, generator=g)
        rows = encoder.index[idx]
        drop = torch.rand(batch, generator=g) < cfg.caption_dropout
        rows = torch.where(drop, torch.full_like(rows, encoder.empty), rows)
        noise = torch.randn(x0.shape, generator=g)
        tt = bb.sample_timesteps(batch, generator=g)
        cond = encoder(rows)
        pred = bb.predict(bb.add_noise(x0, noise, tt), tt, cond)
        per = per_sample_mse(pred, bb.target(x0, noise, tt))
        if name == "sd" and cfg.sd_min_snr:
            snr = (bb.alpha(tt) / bb.sigma(tt)).pow(2)
            per = per * snr.clamp(max=cfg.sd_min_snr) / snr
        loss = per.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % 10 == 0:
            bar.set_postfix(loss=f"{_tail_mean(losses):.4f}")
        if time.time() > stop_at:
            truncated = True
            break
    bar.close()
    train_s = time.time() - t
    for m in trainable:
        m.eval().requires_grad_(False)
    # the training conditioning must equal the backbone's (stock pipeline) encoding
    probe = [captions[0], captions[1], ""]
    with torch.no_grad():
        mine = encoder(torch.tensor([encoder.table.index(c) for c in probe]))
    ref = bb.encode_prompts(probe)
    err = max(float((mine.tensors[k] - ref.tensors[k]).abs().max()) for k in ref.tensors)
    if err > 1e-4:
        raise RuntimeError(f"{name}: training prompt encoding differs from the backbone's by {err:.2e}")
    return {
        "steps": len(losses),
        "batch": batch,
        "final_loss": _tail_mean(losses),
        "first_loss": float(sum(losses[:20]) / max(1, len(losses[:20]))),
        "train_s": train_s,
        "encode_latents_s": encode_s,
        "encode_check_max_abs": err,
        "params": {k: _count(v) for k, v in pipe.components.items() if isinstance(v, nn.Module)},
        "truncated": truncated,
    }


def _score(images: torch.Tensor, texts: list[str]) -> dict[str, float]:
    from .oracles import evaluate

    ev = evaluate(images, texts)
    return {k: round(float(v.mean()), 4) for k, v in ev.items()}


def _eval_sets(cfg: PretrainConfig) -> dict[str, list[str]]:
    from .shapes import eval_prompts

    return {"train": prompts("train", n=cfg.eval_prompts, seed=0), "heldout": eval_prompts(cfg.eval_prompts, seed=0)}


@torch.no_grad()
def _vae_ceiling(pipe: Any, cfg: PretrainConfig) -> dict[str, dict[str, float]]:
    """Oracle scores of rendered ground truth after a VAE round trip: what a perfect denoiser would get."""
    from ..backbones import load_backbone
    from .shapes import render_captions

    bb = load_backbone(pipe)
    out = {}
    for split, texts in _eval_sets(cfg).items():
        imgs = render_captions(texts, seed=cfg.eval_seed)
        out[split] = _score(bb.decode_latents(bb.encode_images(imgs, sample=False)), texts)
    return out


@torch.no_grad()
def _evaluate_folder(folder: Path, cfg: PretrainConfig, guidance: float) -> dict[str, Any]:
    from ..backbones import load_backbone
    from ..sampling.solvers import generate

    bb = load_backbone(folder)
    res: dict[str, Any] = {"sampling": {"steps": cfg.eval_steps, "guidance_scale": guidance, "seed": cfg.eval_seed,
                                        "prompts_per_split": cfg.eval_prompts, "negative_prompt": ""}}
    t = time.time()
    for split, texts in _eval_sets(cfg).items():
        imgs = torch.cat([
            generate(bb, texts[i : i + 64], steps=cfg.eval_steps, guidance_scale=guidance, seed=cfg.eval_seed + i)
            for i in range(0, len(texts), 64)
        ])
        res[split] = _score(imgs, texts)
    res["eval_s"] = time.time() - t
    return res


def _count(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def _folder_mb(path: Path) -> float:
    return round(sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20, 2)


def _tail_mean(values: list[float], n: int = 50) -> float:
    tail = values[-n:]
    return float(sum(tail) / max(1, len(tail)))


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float):
        return round(obj, 6)
    return obj
