"""Load a backbone from a local diffusers folder or a pipeline object in memory (never the network)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from .base import Backbone
from .quiet import install_filters, quiet_loading
from .streaming import lowmem_denoisers

UNET_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline")
FLOW_PIPELINES = ("StableDiffusion3Pipeline", "FluxPipeline")


def load_backbone(
    source: str | Path | Any,
    *,
    dtype: torch.dtype | None = None,
    resolution: int | None = None,
    max_sequence_length: int | None = None,
    embedded_guidance: float = 3.5,
    trust_remote_code: bool = False,
) -> Backbone:
    """Build the backbone for ``source``: a diffusers pipeline folder, or a pipeline object.

    The family is read from ``model_index.json``'s ``_class_name``. Nothing is downloaded, and code
    shipped with a model (a component whose class lives in a ``.py`` file of the folder or on the Hub)
    is refused unless ``trust_remote_code=True``. Weights load through safetensors, or through
    ``torch.load(weights_only=True)`` for ``.bin`` files (diffusers' and transformers' default).
    """
    pipe = source
    if isinstance(source, (str, Path)):
        path = Path(source)
        index = path / "model_index.json"
        if not index.is_file():
            raise FileNotFoundError(
                f"{path}: not a diffusers pipeline folder (no model_index.json). Save one with "
                "`pipe.save_pretrained(dir)` or build a tiny one with `diffalign tiny FAMILY DIR`."
            )
        meta = _read_index(index)
        name = meta.get("_class_name", "?")
        if name not in UNET_PIPELINES + FLOW_PIPELINES:
            raise ValueError(f"{index}: pipeline class {name!r} is not supported; expected one of "
                             f"{', '.join(UNET_PIPELINES + FLOW_PIPELINES)}")
        import diffusers

        if not trust_remote_code:
            _refuse_custom_code(index, meta)
        cls = getattr(diffusers, name)
        kw: dict[str, Any] = {"local_files_only": True, "trust_remote_code": trust_remote_code}
        if name == "StableDiffusionPipeline":
            kw.update(safety_checker=None, requires_safety_checker=False)
        if dtype is not None:
            kw["torch_dtype"] = dtype
        for key, value in meta.items():  # components saved as absent (e.g. SD3 without T5) stay absent
            if isinstance(value, list) and value == [None, None]:
                kw[key] = None
        _check_components(path, meta)
        try:
            with quiet_loading():
                if dtype is not None:  # the denoiser read straight into dtype: no fp32 copy of it at the peak
                    kw.update(lowmem_denoisers(path, meta, dtype))
                pipe = cls.from_pretrained(str(path), **kw)
        except (OSError, ValueError, RuntimeError, KeyError) as e:
            raise ModelLoadError(f"{path}: cannot load the {name} pipeline: {_first_line(e)}") from e
    install_filters()
    name = type(pipe).__name__
    if name in UNET_PIPELINES:
        from .unet import UNetBackbone

        bb: Backbone = UNetBackbone(pipe)
    elif name in FLOW_PIPELINES:
        from .flow import FlowBackbone

        bb = FlowBackbone(pipe, max_sequence_length=max_sequence_length, embedded_guidance=embedded_guidance)
    else:
        raise ValueError(f"pipeline class {name!r} is not supported")
    for comp in pipe.components.values():
        if isinstance(comp, torch.nn.Module):
            comp.requires_grad_(False).eval()
    if resolution:
        bb.resolution = resolution
    return bb


class ModelLoadError(ValueError):
    """A model folder that cannot be loaded; the message names the folder or file."""


WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json")


def _read_index(index: Path) -> dict[str, Any]:
    try:
        meta = json.loads(index.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{index}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    except UnicodeDecodeError as e:
        raise ModelLoadError(f"{index}: not UTF-8 text (byte offset {e.start})") from None
    if not isinstance(meta, dict):
        raise ModelLoadError(f"{index}: expected a JSON object, got {type(meta).__name__}")
    return meta


def _check_components(path: Path, meta: dict[str, Any]) -> None:
    """Each listed component has its folder, and each model component (one with a config.json) a
    weights file, so a missing file is named here rather than as the ``.bin`` diffusers last tried."""
    for comp, value in meta.items():
        if comp.startswith("_") or not isinstance(value, list) or len(value) != 2 or value[0] is None:
            continue
        folder = path / comp
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder}: missing (model_index.json lists the component {comp!r}, {value[1]})")
        config = folder / "config.json"
        if config.is_file() and not any(next(folder.glob(pat), None) for pat in WEIGHT_PATTERNS):
            raise FileNotFoundError(
                f"{folder}: no weights file for {value[1]} (expected diffusion_pytorch_model.safetensors or "
                "model.safetensors, or a .bin); the model folder is incomplete"
            )
        try:
            if config.is_file():
                json.loads(config.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ModelLoadError(f"{config}: not valid JSON ({e})") from None


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return f"{type(e).__name__}: {lines[0] if lines else ''}"[:500]


def _refuse_custom_code(index: Path, meta: dict[str, Any]) -> None:
    """Every component must be a class of diffusers or transformers (or a diffusers pipeline module,
    as the original SD1.5 safety checker is); anything else would import code from the model folder."""
    import importlib.util

    for comp, value in meta.items():
        if comp.startswith("_") or not isinstance(value, list) or len(value) != 2 or value[0] is None:
            continue
        library = value[0]
        if library in ("diffusers", "transformers"):
            continue
        if isinstance(library, str) and library.isidentifier() and importlib.util.find_spec(f"diffusers.pipelines.{library}"):
            continue
        raise ValueError(
            f"{index}: component {comp!r} is {value[1]!r} from {library!r}, which is not diffusers or transformers: "
            "loading it would run code shipped with the model. diffalign does not run such code unless asked "
            "(load_backbone(..., trust_remote_code=True))"
        )
