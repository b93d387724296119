"""Run configuration: YAML validated into typed models.

An unknown or ill-typed key is a ``ConfigError`` that names the key and the file. Command-line
overrides ``--section.key value`` are parsed as YAML scalars (``--train.lr 1e-4``,
``--model.lora_targets "[to_q, to_v]"``) and validated the same way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, model_validator

from .objectives import OBJECTIVES, options_model


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    path: str = Field(description="diffusers pipeline folder, tiny:FAMILY (sd15, sd2v, sdxl, sd3, flux), or arch:NAME (sd15, sdxl, sd3: the real architecture, random weights)")
    resolution: int | None = None
    lora: bool = True
    lora_rank: int = Field(8, ge=1)
    lora_alpha: float | None = None
    lora_targets: list[str] = ["to_q", "to_k", "to_v", "to_out.0"]
    lora_init: str = "gaussian"
    attention: Literal["sdpa", "xformers", "auto"] = "sdpa"
    gradient_checkpointing: bool | Literal["selective"] = Field(
        False, description="recompute activations in the backward: true (every block), selective (keep the "
        "convolutions' and attention's outputs, recompute the rest), false")
    channels_last: bool = Field(False, description="the UNet's weights and inputs in channels-last memory format")
    compile: bool = Field(False, description="torch.compile the denoiser (in place; the first steps compile)")
    compile_backend: str = Field("inductor", description="torch.compile backend (inductor; aot_eager to debug)")
    frozen_dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    embedded_guidance: float = 3.5
    max_sequence_length: int | None = None


class DataConfig(_Section):
    train: str = Field(description="Pick-a-Pic pairs: .jsonl/.parquet file or folder; for online objectives "
                       "a prompt source: .txt (one per line), .jsonl (prompt/caption), toy:train[:N]")
    image_root: str | None = None
    cache_dir: str | None = None
    ties: Literal["drop", "keep"] = "drop"
    on_bad_row: Literal["error", "skip"] = "error"
    random_flip: bool = True
    random_crop: bool = False
    prompt_dropout: float = Field(0.2, ge=0, le=1)
    num_workers: int = Field(0, ge=0)
    limit: int | None = None


def _objective_name(v: Any) -> str:
    """The objective's ``name`` picks its section model; a section without a name is DPO."""
    return v.get("name", "dpo") if isinstance(v, dict) else getattr(v, "name", "dpo")


# One section model per registered objective, generated from the objective's own fields
# (diffalign/objectives/base.py): options are declared once, in the objective's file.
ObjectiveConfig = Annotated[
    Union[tuple(Annotated[options_model(cls), Tag(name)] for name, cls in OBJECTIVES.items())],  # noqa: UP007
    Discriminator(_objective_name),
]


class RewardConfig(_Section):
    train: str | None = Field(
        None, description="the training reward of online objectives, as rewards.from_spec reads it: NAME, "
        "NAME=PATH, NAME[=PATH]:WEIGHT,... (an Ensemble)")
    reference_faces: str | None = Field(
        None, description="reference image file or folder (one size) for identity rewards (identity, toy_identity): "
        "every training image is compared with them; a prompt .jsonl row's own \"reference\" wins over it")
    # reward-hacking guard (training/gold.py): held-out "gold" rewards beside the training reward
    gold: list[str] = Field([], description="gold rewards (each a rewards.from_spec spec), scored on gold_prompts")
    gold_every: int = Field(0, ge=0, description="score the gold rewards every N optimizer steps (0: never)")
    gold_prompts: str | None = Field(None, description="held-out prompt source (a .txt/.jsonl file, toy:heldout:N)")
    early_stop_on_gold_drop: float | None = Field(
        None, ge=0, description="stop when a gold reward falls more than this below its best so far")

    @model_validator(mode="after")
    def _gold_complete(self) -> RewardConfig:
        if self.gold_every and not self.gold_prompts:
            raise ValueError("reward.gold_prompts: reward.gold_every is set; name the held-out prompts to score")
        if self.early_stop_on_gold_drop is not None and not (self.gold and self.gold_every):
            raise ValueError("reward.early_stop_on_gold_drop: needs reward.gold rewards and reward.gold_every > 0")
        return self


class TrainConfig(_Section):
    output_dir: str = "runs/run"
    seed: int = Field(0, ge=0)
    steps: int = Field(1000, ge=1)
    batch_size: int = Field(1, ge=1, description="per process")
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(1e-5, gt=0)
    scale_lr: bool = False
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine"] = "constant_with_warmup"
    warmup_steps: int = Field(0, ge=0)
    optimizer: Literal["adamw", "adafactor", "adamw8bit"] = Field(
        "adamw", description="adamw8bit: bitsandbytes' 8-bit AdamW (CUDA; an error when bitsandbytes is missing)")
    adam_impl: Literal["default", "foreach", "fused"] = Field(
        "default", description="torch AdamW's implementation: default (torch picks), foreach, or fused (one kernel)")
    weight_decay: float = Field(1e-2, ge=0)
    adam_betas: tuple[float, float] = (0.9, 0.999)
    max_grad_norm: float | None = Field(1.0, gt=0)
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    cpu_keep_freed_memory: bool = Field(
        False, description="CPU runs on Linux: glibc keeps the memory torch frees for the next step (no mmap, no "
        "trimming): fewer page faults, the RSS of the steps stays level; sample grids run with the defaults")
    ema: bool = False
    ema_decay: float = Field(0.999, ge=0, le=1)
    checkpoint_every: int = Field(500, ge=0, description="0: only at the end")
    keep_checkpoints: int = Field(3, ge=0, description="0: keep all")
    checkpoint_checksums: bool = Field(True, description="SHA-256 of every checkpoint file, verified on resume")
    max_nonfinite_steps: int = Field(
        5, ge=1, description="stop after this many consecutive steps with a non-finite loss or gradient"
    )
    rng: Literal["stream", "per_batch"] = Field(
        "stream",
        description="stream: one random stream per process, saved in checkpoints. per_batch: the noise of each "
        "micro-batch is seeded by (seed, global micro-batch index), so P processes x grad_accum A draw what "
        "1 process x P*A draws, and processes draw different noise",
    )
    log_every: int = Field(10, ge=1)
    sample_every: int = Field(500, ge=0, description="0: only at the end")
    sample_prompts: list[str] = ["a red circle", "a blue square at the top"]
    sample_steps: int = Field(20, ge=1)
    sample_guidance: float = 5.0
    progress: bool = True


class RunConfig(_Section):
    model: ModelConfig
    data: DataConfig
    objective: ObjectiveConfig = Field(default_factory=lambda: options_model(OBJECTIVES["dpo"])())
    reward: RewardConfig = RewardConfig()
    train: TrainConfig = TrainConfig()

    @model_validator(mode="after")
    def _reward_for_online(self) -> RunConfig:
        if OBJECTIVES[self.objective.name].needs_reward and not self.reward.train:
            raise ValueError(f"reward.train: objective {self.objective.name!r} trains on a reward; name one "
                             "(e.g. reward.train: toy_shape)")
        return self


class ConfigError(ValueError):
    """A config file or override that does not validate; the message names the key and the file."""


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid config"]
    for e in err.errors():
        loc = list(e["loc"])
        if loc[:1] == ["objective"] and len(loc) > 1 and loc[1] in OBJECTIVES:
            loc.pop(1)  # the union's tag: "objective.beta", not "objective.dro.beta"
        key = ".".join(str(p) for p in loc) or "<root>"
        if e["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key")
        elif e["type"] == "missing":
            lines.append(f"  {key}: required key is missing")
        else:
            got = e.get("input")
            hint = " (YAML reads no/yes/off/on as booleans: quote the word)" if isinstance(got, bool) else ""
            lines.append(f"  {key}: {e['msg']} (got {got!r}){hint}")
    return "\n".join(lines)


def _wants_string(parts: list[str]) -> bool:
    """Whether the config key ``parts`` takes only text (str, a Literal of strings, optionally None): its
    override value is then the word as typed, so ``--train.mixed_precision no`` is "no", not YAML's False."""
    import types
    import typing

    if len(parts) != 2 or parts[0] not in RunConfig.model_fields:
        return False
    section = RunConfig.model_fields[parts[0]].annotation
    models = [section] if isinstance(section, type) else [
        a for a in _flat_args(section) if isinstance(a, type) and issubclass(a, BaseModel)]
    for model in models:
        field = model.model_fields.get(parts[1])
        if field is None:
            continue
        kinds = [a for a in _flat_args(field.annotation) if a is not type(None)]
        return bool(kinds) and all(
            a is str or (typing.get_origin(a) is Literal and all(isinstance(v, str) for v in typing.get_args(a)))
            for a in kinds) and not any(isinstance(a, types.GenericAlias) for a in kinds)
    return False


def _flat_args(t: Any) -> list[Any]:
    """The members of a (possibly Annotated, nested) Union; a plain type is its own member."""
    import types
    import typing

    origin = typing.get_origin(t)
    if origin is Annotated:
        return _flat_args(typing.get_args(t)[0])
    if origin in (Union, types.UnionType):
        return [m for a in typing.get_args(t) for m in _flat_args(a)]
    return [t]


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """``["--train.lr", "1e-4", "--train.ema=true"]`` -> nested dict of YAML-typed values (the word as
    typed for a text-only key: ``--train.mixed_precision no`` is "no"; ``null`` stays None)."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(args):
        a = args[i]
        if not a.startswith("--") or "." not in a.split("=")[0]:
            raise ConfigError(f"override {a!r}: expected --section.key VALUE (e.g. --train.lr 1e-4)")
        if "=" in a:
            key, raw = a[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(args):
                raise ConfigError(f"override {a!r} has no value")
            key, raw = a[2:], args[i + 1]
            i += 2
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        if raw != "" and _wants_string(parts) and raw not in ("null", "~"):
            node[parts[-1]] = raw
        else:
            node[parts[-1]] = yaml.safe_load(raw) if raw != "" else ""
    return out


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(path: str | Path, overrides: list[str] | dict[str, Any] | None = None) -> RunConfig:
    """Read ``path`` (YAML), apply overrides, validate. Errors name the key and the file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: config file not found")
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: top level must be a mapping of sections, got {type(raw).__name__}")
    over = parse_overrides(overrides) if isinstance(overrides, list) else (overrides or {})
    try:
        RunConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, str(p))) from None
    try:
        return RunConfig.model_validate(_merge(raw, over))
    except ValidationError as e:
        raise ConfigError(_format_errors(e, f"{p} (with command-line overrides)")) from None


def dump_config(cfg: RunConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
