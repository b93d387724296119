"""Build the pieces a run needs from its config: backbone (with LoRA or a frozen reference copy),
data set, objective, optimizer."""

from __future__ import annotations

import logging
from typing import Any

import torch

from ..backbones import Backbone, load_backbone
from ..backbones.checkpointing import enable_checkpointing
from ..backbones.lora import add_lora
from ..config import RunConfig
from .deferred import DeferredModule, can_defer, load_pipeline_deferred

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def build_backbone(cfg: RunConfig, device: torch.device | str = "cpu", *, defer_frozen: bool | None = None) -> Backbone:
    """``defer_frozen`` (default: when ``data.cache_dir`` is set and ``model.path`` is a SD/SDXL folder): the
    VAE and text encoders are not loaded until first used (``deferred.py``); the cache serves every step."""
    m = cfg.model
    frozen = DTYPES[m.frozen_dtype]
    # with a LoRA every weight of a pipeline folder is frozen: load it in that dtype, so the fp32 copy never
    # exists (peak memory); a full fine-tune keeps its denoiser in fp32 and casts only the frozen parts
    load_dtype = frozen if m.lora and frozen != torch.float32 else None
    if m.path.startswith("tiny:"):
        from ..backbones.tiny import build_tiny_pipeline

        source: Any = build_tiny_pipeline(m.path.split(":", 1)[1], seed=cfg.train.seed)
    elif m.path.startswith("arch:"):  # a real architecture with random weights (speed benchmarks)
        from ..backbones.arch import build_arch_pipeline

        source = build_arch_pipeline(m.path.split(":", 1)[1], seed=cfg.train.seed)
    else:
        source = m.path
        if defer_frozen is None:
            defer_frozen = bool(cfg.data.cache_dir)
        if defer_frozen and can_defer(m.path):
            source = load_pipeline_deferred(m.path, dtype=load_dtype)
    bb = load_backbone(
        source, dtype=load_dtype if isinstance(source, str) else None, resolution=m.resolution,
        max_sequence_length=m.max_sequence_length, embedded_guidance=m.embedded_guidance,
    )
    bb.to(device, frozen_dtype=None if frozen == torch.float32 else frozen)
    for comp in bb.pipe.components.values():  # Backbone.to moves modules only
        if isinstance(comp, DeferredModule):
            comp.to(device, dtype=frozen)
    if m.lora:
        if frozen != torch.float32:
            bb.denoiser.to(dtype=frozen)  # the base weights are frozen too
        try:
            n = add_lora(bb, rank=m.lora_rank, alpha=m.lora_alpha, targets=m.lora_targets, init=m.lora_init)
        except Exception as e:  # peft's errors name its own arguments, not our keys
            key = "model.lora_targets" if "target" in str(e).lower() else "model.lora_init / model.lora_rank"
            raise ValueError(f"{key}: peft refused the LoRA (lora_targets {list(m.lora_targets)}, lora_init "
                             f"{m.lora_init!r}, lora_rank {m.lora_rank}): {type(e).__name__}: {e}") from e
        for p in bb.trainable_parameters():  # LoRA weights train in fp32
            p.data = p.data.float()
        logger.info("LoRA rank %d on %s: %d trainable parameters", m.lora_rank, m.lora_targets, n)
    else:
        bb.enable_full_finetune()
        bb.ref_model.to(device)
    if m.gradient_checkpointing:
        enable_checkpointing(bb.denoiser, m.gradient_checkpointing)
    _set_attention(bb, m.attention)
    if m.channels_last:
        if bb.denoiser_name != "unet":
            raise ValueError(f"model.channels_last: only for UNets (convolutions); {m.path} has a {bb.denoiser_name}")
        bb.denoiser.to(memory_format=torch.channels_last)
        bb.channels_last = True
    if m.compile:
        try:  # in place: the module (and its LoRA parameters) stay the same objects
            bb.denoiser.compile(backend=m.compile_backend)
        except Exception as e:  # torch names its own argument, not our key
            raise ValueError(f"model.compile_backend {m.compile_backend!r}: torch.compile refused it: {e}") from e
    return bb


def _set_attention(bb: Backbone, attention: str) -> None:
    """SDPA is diffusers' default; xformers on request (error if missing) or with 'auto' when present on GPU."""
    if attention == "sdpa":
        return
    try:
        import xformers  # noqa: F401

        available = True
    except ImportError:
        available = False
    if attention == "xformers" and not available:
        raise RuntimeError("model.attention: xformers is not installed (pip install 'diffalign[xformers]')")
    if available and bb.device.type == "cuda":
        bb.denoiser.enable_xformers_memory_efficient_attention()
    elif attention == "xformers":
        raise RuntimeError("model.attention: xformers needs a CUDA device")


def build_dataset(cfg: RunConfig, backbone: Backbone, kind: str = "pairs") -> tuple[Any, Any, Any]:
    """(dataset, collate_fn, empty-prompt Cond or None): the latent cache when configured, else pixels.
    ``kind="experts"``: single demonstration images (Diffusion-DRO) instead of pairs; ``kind="prompts"``:
    prompts only (online objectives; ``data.train`` is a prompt source, see ``data.prompts``)."""
    d = cfg.data
    if kind == "prompts":  # online objectives: prompts only, the model makes the images
        from ..data.prompts import PromptDataset, collate_prompts

        ds = PromptDataset(d.train, references=_shared_references(cfg), encoder=_reference_encoder(cfg, backbone))
        if d.limit:
            ds.prompts = ds.prompts[: d.limit]
        return ds, collate_prompts, None
    if kind == "experts":
        from ..data.experts import ExpertImages, collate_experts

        if d.cache_dir:
            raise ValueError(f"data.cache_dir: the latent cache holds pairs; objective {cfg.objective.name!r} reads "
                             "expert images (leave data.cache_dir unset)")
        ds = ExpertImages(d.train, backbone.resolution, on_bad_row=d.on_bad_row, random_flip=d.random_flip,
                          limit=d.limit)
        return ds, collate_experts, None
    if kind == "user_pairs":  # multi-user pairs, each with its user's k-shot embedding (personalization)
        return _user_pairs(cfg, backbone), _collate_user_pairs(), None
    if d.cache_dir:
        from ..data.cache import CachedPairs, collate_cached

        ds = CachedPairs(d.cache_dir, hflip=d.random_flip)
        if ds.family != backbone.family:
            raise ValueError(f"data.cache_dir {d.cache_dir}: built for {ds.family!r}, model is {backbone.family!r}")
        return ds, collate_cached, ds.empty_cond
    from ..data.pairs import PreferencePairs, collate_pairs

    ds = PreferencePairs(
        d.train, resolution=backbone.resolution, image_root=d.image_root, ties=d.ties, on_bad_row=d.on_bad_row,
        random_flip=d.random_flip, random_crop=d.random_crop, limit=d.limit,
    )
    return ds, collate_pairs, None


def _shared_references(cfg: RunConfig) -> torch.Tensor | None:
    """``reward.reference_faces``: one set of reference images for every prompt (identity rewards)."""
    if not cfg.reward.reference_faces:
        return None
    from rewards.references import ReferenceError, load_reference_faces

    try:
        return load_reference_faces(cfg.reward.reference_faces, "reward.reference_faces")
    except ReferenceError as e:
        raise ValueError(str(e)) from None


def _reference_encoder(cfg: RunConfig, backbone: Backbone) -> Any:
    """``objective.encoder`` of an identity adapter (``idaligner`` with ``form: adapter``): reference images ->
    the embedding its decoupled cross-attention reads (``personalization.encoder.load_image_encoder``)."""
    o = cfg.objective
    if getattr(o, "form", None) != "adapter":
        return None
    from ..personalization.encoder import EncoderError, load_image_encoder

    try:
        enc = load_image_encoder(o.encoder, device=backbone.device)
    except EncoderError as e:
        raise ValueError(f"objective.encoder: {e}") from None
    if enc.dim != o.embed_dim:
        raise ValueError(f"objective.embed_dim is {o.embed_dim}, but the reference encoder {o.encoder} gives {enc.dim}")
    return enc


def _user_pairs(cfg: RunConfig, backbone: Backbone) -> Any:
    """``data.users.UserPairs`` over the pixel pairs, embedded by the objective's user encoder."""
    from ..data.pairs import PreferencePairs
    from ..data.users import UserPairs
    from ..personalization.encoder import load_encoder

    d, o = cfg.data, cfg.objective
    if d.cache_dir:
        raise ValueError(f"data.cache_dir: objective {o.name!r} reads pixel pairs with user ids (leave it unset)")
    if not o.encoder:
        raise ValueError(f"objective.encoder: objective {o.name!r} needs a user encoder spec (e.g. clip=DIR)")
    encoder = load_encoder(o.encoder, device=backbone.device)
    if encoder.dim != o.embed_dim:
        raise ValueError(f"objective.embed_dim is {o.embed_dim}, but the user encoder {o.encoder} gives {encoder.dim}")
    pairs = PreferencePairs(d.train, resolution=backbone.resolution, image_root=d.image_root, ties=d.ties,
                            on_bad_row=d.on_bad_row, random_flip=d.random_flip, random_crop=d.random_crop, limit=d.limit)
    return UserPairs(pairs, encoder, k=o.k, embedding_dropout=o.embedding_dropout)


def _collate_user_pairs() -> Any:
    from ..data.users import collate_user_pairs

    return collate_user_pairs


def build_optimizer(cfg: RunConfig, params: list[torch.nn.Parameter], num_processes: int = 1) -> torch.optim.Optimizer:
    t = cfg.train
    lr = t.lr * t.batch_size * t.grad_accum * num_processes if t.scale_lr else t.lr
    if t.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(params, lr=lr, scale_parameter=False, relative_step=False, warmup_init=False,
                         clip_threshold=1.0, weight_decay=t.weight_decay)
    if t.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as e:
            raise RuntimeError("train.optimizer adamw8bit: bitsandbytes is not installed (pip install bitsandbytes)") from e
        return bnb.optim.AdamW8bit(params, lr=lr, betas=t.adam_betas, weight_decay=t.weight_decay)
    impl = {"default": {}, "foreach": {"foreach": True}, "fused": {"fused": True}}[t.adam_impl]
    return torch.optim.AdamW(params, lr=lr, betas=t.adam_betas, weight_decay=t.weight_decay, **impl)


def build_reward(cfg: RunConfig, device: torch.device | str = "cpu") -> Any:
    """The training reward of an online objective (``reward.train``, in ``rewards.from_spec``'s grammar),
    on ``device``; objectives receive it built and never import ``rewards``."""
    import rewards

    if not cfg.reward.train:
        raise ValueError(f"reward.train: objective {cfg.objective.name!r} needs a reward")
    try:
        reward = rewards.from_spec(cfg.reward.train)
    except (KeyError, ValueError, FileNotFoundError) as e:
        raise ValueError(f"reward.train {cfg.reward.train!r}: {e}") from e
    return reward.to(device) if isinstance(reward, torch.nn.Module) else reward
