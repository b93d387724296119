"""Frozen pipeline components a cached run does not need, loaded only when first used.

With ``data.cache_dir`` every training step reads latents and prompt conditionings from the cache, so the
VAE and the text encoders do no work until the run draws its sample grid (or scores a gold reward) from the
trained model. :func:`load_pipeline_deferred` loads the pipeline folder without them and puts a
:class:`DeferredModule` in their place: it carries the component's config (what the backbone reads when it
is built: the VAE's scaling factor and channels) and loads the weights from the folder the first time
anything else is asked of it, onto the device and dtype it was moved to. A run that never samples never
constructs them: no time, no memory.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

FROZEN = ("vae", "text_encoder", "text_encoder_2", "text_encoder_3")
"""The pipeline components a latent + text-embedding cache stands in for."""


class DeferredModule:
    """Stands in for pipeline component ``name`` (class ``cls``, saved in ``folder``) until first used."""

    def __init__(self, name: str, cls: Any, folder: Path, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32) -> None:
        d = self.__dict__
        d["_name"], d["_cls"], d["_folder"], d["_module"] = name, cls, Path(folder), None
        d["_device"], d["_dtype"] = torch.device(device), dtype
        if hasattr(cls, "load_config"):  # diffusers: a FrozenDict with attribute access, as model.config is
            from diffusers.configuration_utils import FrozenDict

            d["config"] = FrozenDict(cls.load_config(str(folder)))
        else:  # transformers
            d["config"] = cls.config_class.from_pretrained(str(folder))

    @property
    def loaded(self) -> bool:
        return self._module is not None

    @property
    def dtype(self) -> torch.dtype:
        return self._module.dtype if self._module is not None else self._dtype

    @property
    def device(self) -> torch.device:
        return self._module.device if self._module is not None else self._device

    def module(self) -> torch.nn.Module:
        """The real component, loaded now if it was not yet."""
        if self._module is None:
            from ..backbones.quiet import quiet_loading

            logger.info("loading the deferred %s from %s (first use)", self._name, self._folder)
            kw = {"torch_dtype": self._dtype} if self._dtype is not None else {}  # no fp32 copy first
            with quiet_loading():
                m = self._cls.from_pretrained(str(self._folder), local_files_only=True, **kw)
            self.__dict__["_module"] = m.requires_grad_(False).eval().to(self._device, dtype=self._dtype)
        return self._module

    def to(self, device: Any = None, dtype: torch.dtype | None = None, **_: Any) -> DeferredModule:
        if isinstance(device, torch.dtype):
            device, dtype = None, device
        if device is not None:
            self.__dict__["_device"] = torch.device(device)
        if dtype is not None:
            self.__dict__["_dtype"] = dtype
        if self._module is not None:
            self._module.to(self._device, dtype=self._dtype)
        return self

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.module()(*args, **kwargs)

    def __getattr__(self, attr: str) -> Any:  # only for names not found above: the real module's
        if attr.startswith("__"):
            raise AttributeError(attr)
        return getattr(self.module(), attr)

    def __setattr__(self, attr: str, value: Any) -> None:
        setattr(self.module(), attr, value)

    def __repr__(self) -> str:
        state = "loaded" if self.loaded else "not loaded"
        return f"DeferredModule({self._name}: {self._cls.__name__} from {self._folder}, {state})"


def load_pipeline_deferred(path: str | Path, dtype: torch.dtype | None = None) -> Any:
    """The diffusers pipeline in folder ``path`` with its VAE and text encoders as :class:`DeferredModule`s
    (the same checks as :func:`diffalign.backbones.load_backbone`: no remote code, complete folders);
    ``dtype``: the loaded components' dtype (the deferred ones take theirs when the caller moves them)."""
    import diffusers
    import transformers

    from ..backbones.loading import UNET_PIPELINES, _check_components, _read_index, _refuse_custom_code
    from ..backbones.quiet import quiet_loading
    from ..backbones.streaming import lowmem_denoisers

    path = Path(path)
    index = path / "model_index.json"
    meta = _read_index(index)
    name = meta.get("_class_name", "?")
    if name not in UNET_PIPELINES:  # flow pipelines read their text encoders' configs in other ways
        raise ValueError(f"{index}: deferred loading is for {', '.join(UNET_PIPELINES)}, not {name!r}")
    _refuse_custom_code(index, meta)
    _check_components(path, meta)
    skip = {k: meta[k] for k in FROZEN if isinstance(meta.get(k), list) and meta[k][0] is not None}
    kw: dict[str, Any] = {"local_files_only": True, **dict.fromkeys(skip)}
    if dtype is not None:
        kw["torch_dtype"] = dtype
    if name == "StableDiffusionPipeline":
        kw.update(safety_checker=None, requires_safety_checker=False)
    with quiet_loading():
        if dtype is not None:  # the denoiser read straight into dtype: no fp32 copy of it at the peak
            kw.update(lowmem_denoisers(path, meta, dtype))
        pipe = getattr(diffusers, name).from_pretrained(str(path), **kw)
    for comp, (library, cls_name) in skip.items():
        cls = getattr(diffusers if library == "diffusers" else transformers, cls_name)
        setattr(pipe, comp, DeferredModule(comp, cls, path / comp))
    return pipe


def can_defer(path: str | Path) -> bool:
    """Whether ``path`` is a pipeline folder :func:`load_pipeline_deferred` handles (SD / SDXL)."""
    from ..backbones.loading import UNET_PIPELINES

    index = Path(path) / "model_index.json"
    if not index.is_file():
        return False
    try:
        import json

        return json.loads(index.read_text(encoding="utf-8")).get("_class_name") in UNET_PIPELINES
    except (OSError, ValueError):
        return False  # load_backbone reports it
