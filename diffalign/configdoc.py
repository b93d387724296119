"""``diffalign config``: every config key with its type, default and meaning, read from the pydantic
models of diffalign/config.py (so the list cannot drift from what the loader accepts). A field's own
``Field(description=...)`` wins; the texts below fill in the rest."""

from __future__ import annotations

import types
import typing
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

DESCRIPTIONS = {
    "model.resolution": "training and sampling side in pixels (default: the model's own)",
    "model.lora": "train a LoRA adapter (true) or the full denoiser (false, with a frozen reference copy)",
    "model.lora_rank": "LoRA rank r",
    "model.lora_alpha": "LoRA alpha (default: the rank, i.e. scale 1)",
    "model.lora_targets": "denoiser module names that get LoRA layers",
    "model.lora_init": "LoRA initialisation, as peft's init_lora_weights (gaussian, default, pissa, ...)",
    "model.attention": "attention backend: sdpa, xformers (error if missing) or auto",
    "model.gradient_checkpointing": "recompute activations in the backward pass (less memory, slower): true, "
    "or selective (keep the convolutions' and attention's outputs, recompute the rest)",
    "model.frozen_dtype": "dtype of the frozen weights (LoRA weights always train in float32)",
    "model.embedded_guidance": "FLUX-dev guidance embedding value",
    "model.max_sequence_length": "T5 token limit for SD3/FLUX (default: the model's)",
    "data.image_root": "folder that relative image paths are resolved against (default: the data file's)",
    "data.cache_dir": "latent cache built by `diffalign cache` (skips the VAE and text encoders)",
    "data.ties": "label_0 == 0.5 pairs: drop, or keep both orders at weight 0.5",
    "data.on_bad_row": "a bad row stops the run naming file and row (error), or is skipped and counted (skip)",
    "data.random_flip": "random horizontal flip, shared by the two images of a pair",
    "data.random_crop": "random instead of center crop",
    "data.prompt_dropout": "fraction of captions replaced by the empty prompt, in [0, 1]",
    "data.num_workers": "DataLoader worker processes",
    "data.limit": "use only the first N source rows",
    "train.output_dir": "run folder: config.yaml, metrics.jsonl, checkpoints/, samples/, final/ (one run at a time)",
    "train.seed": "seed of the data order, noise and LoRA init",
    "train.steps": "optimizer steps (may be raised on resume)",
    "train.grad_accum": "micro-batches per optimizer step",
    "train.lr": "learning rate",
    "train.scale_lr": "multiply lr by batch_size x grad_accum x processes",
    "train.lr_scheduler": "learning-rate schedule",
    "train.warmup_steps": "linear warm-up steps",
    "train.optimizer": "adamw or adafactor",
    "train.weight_decay": "decoupled weight decay",
    "train.adam_betas": "AdamW betas",
    "train.max_grad_norm": "gradient-norm clip (null: none)",
    "train.mixed_precision": "no, fp16 or bf16 (accelerate)",
    "train.ema": "keep an exponential moving average of the trained weights (exported at the end)",
    "train.ema_decay": "EMA decay",
    "train.sample_prompts": "prompts of the sample grids",
    "train.sample_steps": "sampling steps of the sample grids",
    "train.sample_guidance": "CFG scale of the sample grids",
    "train.progress": "progress bar",
    "train.log_every": "steps between metric lines in metrics.jsonl and TensorBoard",
    "reward.train": "the training reward of online objectives (NAME, NAME=PATH, NAME[=PATH]:WEIGHT,...)",
}


def _type_name(t: Any) -> str:
    origin = typing.get_origin(t)
    args = typing.get_args(t)
    if origin is typing.Literal:
        return " | ".join(repr(a) if not isinstance(a, str) else a for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join("null" if a is type(None) else _type_name(a) for a in args)
    if origin is typing.Annotated:
        return _type_name(args[0])
    if origin in (list, tuple):
        inner = ", ".join(_type_name(a) for a in args if a is not Ellipsis)
        return f"{origin.__name__}[{inner}]"
    return getattr(t, "__name__", str(t))


def _constraints(field: Any) -> str:
    out = []
    for m in field.metadata:
        for attr, sym in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
            v = getattr(m, attr, None)
            if v is not None:
                out.append(f"{sym} {v}")
    return f" ({', '.join(out)})" if out else ""


def _default(field: Any) -> str:
    if field.default is PydanticUndefined and field.default_factory is None:
        return "required"
    value = field.default_factory() if field.default_factory is not None else field.default
    if isinstance(value, BaseModel):
        return "(section)"
    return "null" if value is None else repr(value) if isinstance(value, str) else str(value)


def _section_models(t: Any) -> list[type[BaseModel]]:
    """The section model(s) behind a field annotation (a union of objective sections gives several)."""
    if isinstance(t, type) and issubclass(t, BaseModel):
        return [t]
    out: list[type[BaseModel]] = []
    for a in typing.get_args(t):
        out += _section_models(a)
    return out


def config_keys(root: type[BaseModel] | None = None) -> list[dict[str, str]]:
    """``[{"key", "type", "default", "description", "section"}]`` for every key of the run config."""
    if root is None:
        from .config import RunConfig as root
    rows = []
    for section, sfield in root.model_fields.items():
        for model in _section_models(sfield.annotation):
            name = model.model_fields.get("name")
            label = section
            if name is not None and section == "objective":
                tag = typing.get_args(name.annotation)
                label = (f"objective (name: {tag[0] if tag else _default(name)}; the loss and its options: "
                         f"diffalign/objectives/)")
            for key, f in model.model_fields.items():
                full = f"{section}.{key}"
                desc = f.description or DESCRIPTIONS.get(full, "")
                default = _default(f)
                if name is not None and key == "name":  # the tag that picks this section
                    default, desc = typing.get_args(f.annotation)[0], desc or "picks the objective"
                rows.append({"section": label, "key": full, "type": _type_name(f.annotation) + _constraints(f),
                             "default": default, "description": desc})
    return rows


def format_keys(rows: list[dict[str, str]] | None = None) -> str:
    rows = config_keys() if rows is None else rows
    lines, section = [], None
    width = max(len(r["key"]) for r in rows) + 2
    for r in rows:
        if r["section"] != section:
            section = r["section"]
            lines.append(f"\n{section}:")
        lines.append(f"  {r['key']:<{width}}{r['type']} = {r['default']}")
        if r["description"]:
            lines.append(f"  {'':<{width}}{r['description']}")
    return "\n".join(lines).lstrip("\n") + "\n\nSet keys in the YAML file or override them: --section.key VALUE\n"
