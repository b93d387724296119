"""Load a pipeline's denoiser straight into a low-precision dtype, a slice of the file at a time.

diffusers' ``from_pretrained(torch_dtype=torch.bfloat16)`` first reads the whole fp32 state dict (3.4 GB for
SD1.5's UNet, 10 GB for SDXL's) and casts it afterwards, so the peak holds the fp32 weights and the bf16 model
together: 5.7 GB for SD1.5 at load, above the 512 px DPO step's own peak. Here the model is built on the
meta device and each tensor is read from the safetensors file and cast on its own; the file is reopened every
``GROUP_BYTES`` so that its memory map (whose pages count in the process's RSS) never holds more than one group.
The peak is the low-precision model plus one group.

Only where the result is the same model as diffusers would give (bit for bit, ``tests/foundation/
test_streaming_load.py``): safetensors weights whose keys are exactly the model's, and no module kept in fp32.
Anything else returns ``None`` and diffusers loads the component as usual.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

GROUP_BYTES = 256 * 2**20
DENOISERS = ("unet", "transformer")
_ITEM = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
         "F8_E4M3": 1, "F8_E5M2": 1}


def _weight_files(folder: Path) -> list[Path] | None:
    single = folder / "diffusion_pytorch_model.safetensors"
    if single.is_file():
        return [single]
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        return [folder / s for s in shards]
    return None


def _groups(handle: Any, max_bytes: int) -> list[list[str]]:
    groups: list[list[str]] = [[]]
    size = 0
    for key in handle.keys():
        s = handle.get_slice(key)
        n = _ITEM.get(s.get_dtype(), 8)
        for d in s.get_shape():
            n *= d
        if groups[-1] and size + n > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(key)
        size += n
    return groups


def load_denoiser_lowmem(folder: str | Path, class_name: str, dtype: torch.dtype | None,
                         max_bytes: int = GROUP_BYTES) -> torch.nn.Module | None:
    """The diffusers model ``class_name`` saved in ``folder``, its floating-point weights in ``dtype``, read
    ``max_bytes`` of the file at a time; ``None`` where this does not apply (see the module's docstring)."""
    import diffusers
    from accelerate import init_empty_weights
    from safetensors import safe_open

    if dtype is None or dtype == torch.float32:
        return None
    folder = Path(folder)
    cls = getattr(diffusers, class_name, None)
    files = _weight_files(folder)
    if cls is None or files is None or getattr(cls, "_keep_in_fp32_modules", None):
        return None
    try:
        with init_empty_weights():
            model = cls.from_config(cls.load_config(folder))
        expected = set(model.state_dict())
        state: dict[str, torch.Tensor] = {}
        for file in files:
            with safe_open(str(file), framework="pt") as handle:
                groups = _groups(handle, max_bytes)
            for group in groups:
                with safe_open(str(file), framework="pt") as handle:  # closing it unmaps the group's pages
                    for key in group:
                        t = handle.get_tensor(key)
                        state[key] = t.to(dtype) if t.is_floating_point() else t
    except Exception:  # a damaged file or config: diffusers loads it and names what is wrong, as before
        return None
    if set(state) != expected:
        return None
    model.load_state_dict(state, strict=True, assign=True)
    del state
    if any(t.is_meta for t in (*model.parameters(), *model.buffers())):
        return None
    torch.nn.Module.to(model, dtype)  # buffers not in the file, as from_pretrained(torch_dtype=...) casts them
    model.register_to_config(_name_or_path=str(folder))
    return model.eval()


def lowmem_denoisers(path: Path, meta: dict[str, Any], dtype: torch.dtype | None) -> dict[str, torch.nn.Module]:
    """``{component: model}`` for the denoiser of the pipeline folder ``path`` (model_index ``meta``) where
    :func:`load_denoiser_lowmem` applies, to pass to the pipeline's ``from_pretrained``."""
    out: dict[str, torch.nn.Module] = {}
    for comp in DENOISERS:
        value = meta.get(comp)
        if isinstance(value, list) and len(value) == 2 and value[0] == "diffusers":
            model = load_denoiser_lowmem(path / comp, value[1], dtype)
            if model is not None:
                out[comp] = model
    return out
