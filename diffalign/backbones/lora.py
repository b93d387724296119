"""LoRA on the denoiser's attention projections (peft), the adapter-disabled reference, and saving
adapters in the layout stock diffusers loads with ``pipe.load_lora_weights(dir)``."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from .modules import unwrap

if TYPE_CHECKING:
    from .base import Backbone

DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def has_adapter(model: nn.Module) -> bool:
    return bool(getattr(model, "peft_config", None))


def add_lora(
    backbone: Backbone,
    rank: int = 8,
    alpha: float | None = None,
    targets: tuple[str, ...] | list[str] = DEFAULT_TARGETS,
    init: str = "gaussian",
    dropout: float = 0.0,
) -> int:
    """Attach a LoRA adapter named "default" (B = 0, so the policy starts equal to the base).

    Only the LoRA weights are trainable afterwards. Returns the number of trainable parameters.
    """
    from peft import LoraConfig

    model = unwrap(backbone.denoiser)
    if has_adapter(model):
        raise ValueError("the denoiser already has a LoRA adapter")
    cfg = LoraConfig(
        r=rank, lora_alpha=alpha if alpha is not None else rank, init_lora_weights=init,
        target_modules=list(targets), lora_dropout=dropout,
    )
    model.requires_grad_(False)
    model.add_adapter(cfg)
    for n, p in model.named_parameters():
        p.requires_grad_("lora_" in n)
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if n == 0:
        raise ValueError(f"LoRA targets {list(targets)} matched no module of {type(model).__name__}")
    return n


def _tuner_layers(model: nn.Module) -> list[nn.Module]:
    """peft's adapter layers of ``model``, found once per adapter set and kept on the model, so the
    reference forward of every training step does not walk every module (536 in the tiny UNet)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    key = tuple(sorted(getattr(model, "peft_config", {})))
    cached = model.__dict__.get("_diffalign_tuner_layers")
    if cached is None or cached[0] != key:
        cached = (key, [m for m in model.modules() if isinstance(m, BaseTunerLayer)])
        model.__dict__["_diffalign_tuner_layers"] = cached  # a plain attribute, not a registered submodule
    return cached[1]


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run ``model`` as its base network: every LoRA adapter is disabled inside the block.

    The adapter layers are switched off through their own flag (what peft's ``disable_adapters`` sets),
    on a cached list of them; requires_grad is left as it is (the reference runs without grad). A merged
    adapter takes peft's own path (it unmerges)."""
    if not has_adapter(model):
        raise RuntimeError(
            "no reference model: the denoiser has no LoRA adapter to disable and no frozen copy was made "
            "(use LoRA, or full fine-tuning, which keeps a frozen reference copy)"
        )
    layers = _tuner_layers(model)
    if any(getattr(m, "merged", False) for m in layers):
        with _adapters_disabled_peft(model):
            yield model
        return
    before = [m._disable_adapters for m in layers]
    for m in layers:
        m._disable_adapters = True
    try:
        yield model
    finally:
        for m, b in zip(layers, before, strict=True):
            m._disable_adapters = b


@contextlib.contextmanager
def _adapters_disabled_peft(model: nn.Module) -> Iterator[nn.Module]:
    """peft's model-wide switch (walks every module and resets requires_grad on the way back)."""
    frozen = [p for n, p in model.named_parameters() if "lora_" in n and not p.requires_grad]
    model.disable_adapters()
    try:
        yield model
    finally:
        model.enable_adapters()  # peft sets requires_grad=True on every adapter weight here ...
        for p in frozen:  # ... so a LoRA that was frozen (e.g. PPD trains only its injection) stays frozen
            p.requires_grad_(False)


def lora_state_dict(backbone: Backbone, state_dict: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The adapter's weights in diffusers' key layout (no "default" adapter names); from ``state_dict``
    (a full state dict of the denoiser, e.g. gathered by FSDP) when given, else from the model."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    return convert_state_dict_to_diffusers(get_peft_model_state_dict(unwrap(backbone.denoiser), state_dict=state_dict))


def save_lora(backbone: Backbone, out_dir: str | Path, state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Write ``pytorch_lora_weights.safetensors`` (with rank/alpha metadata) for ``pipe.load_lora_weights``.
    ``state_dict``: take the weights from this full denoiser state dict instead of the model (FSDP)."""
    model = unwrap(backbone.denoiser)
    if not has_adapter(model):
        raise RuntimeError("the denoiser has no LoRA adapter to save (full fine-tuning saves the whole model)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = model.peft_config["default"].to_dict()
    meta = {k: (sorted(v) if isinstance(v, set) else v) for k, v in meta.items()}
    sd = lora_state_dict(backbone, state_dict)
    sd = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in sd.items()}
    name = backbone.denoiser_name
    type(backbone.pipe).save_lora_weights(
        str(out), **{f"{name}_lora_layers": sd, f"{name}_lora_adapter_metadata": meta}, safe_serialization=True
    )
    return out


def load_lora(backbone: Backbone, lora_dir: str | Path, adapter_name: str = "default") -> None:
    """Load a saved adapter into the backbone's denoiser (as stock diffusers does), enabled."""
    from safetensors import safe_open

    from .quiet import quiet_loading

    path = Path(lora_dir)
    weights = path / "pytorch_lora_weights.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"{path}: no pytorch_lora_weights.safetensors (save one with diffalign's save_lora)")
    try:  # the header and the data size, before diffusers reads it
        with safe_open(str(weights), framework="pt") as fh:
            list(fh.keys())
    except Exception as e:  # safetensors' SafetensorError is no OSError/ValueError
        raise ValueError(f"{weights}: not a readable safetensors file, damaged or truncated ({type(e).__name__}: "
                         f"{str(e)[:200]})") from None
    try:
        with quiet_loading():  # no "No LoRA keys ... text_encoder" warning: our adapters hold the denoiser only
            backbone.pipe.load_lora_weights(str(path), adapter_name=adapter_name)
    except (ValueError, RuntimeError, KeyError) as e:
        raise ValueError(
            f"{path}: this LoRA does not fit the {backbone.family} denoiser "
            f"({type(e).__name__}: {str(e)[:300]})"
        ) from e
    if adapter_name not in (getattr(unwrap(backbone.denoiser), "peft_config", None) or {}):
        # diffusers only warns when no key matches (e.g. an SD LoRA given to FLUX)
        raise ValueError(f"{path}: this LoRA does not fit the {backbone.family} denoiser (no key matched its layers)")
