"""Library messages that carry no information for a diffalign user, silenced where we cause them.

- diffusers' ``ModelMixin.to(dtype)`` warns "There are modules in AutoencoderKL that should be kept in
  float32: []" on every dtype cast, even when the list is empty (it tests ``[] is not None``). The
  record is dropped only when the list is empty; a non-empty list still warns.
- Loading a pipeline draws "Loading pipeline components..." and transformers' "Loading weights" bars
  for a few seconds; :func:`quiet_loading` turns both libraries' bars off for the duration of our
  load and restores the user's setting afterwards.
- ``pipe.load_lora_weights`` warns "No LoRA keys associated to CLIPTextModel found ... open an issue"
  for every text encoder when the adapter holds only denoiser weights, which is every adapter
  diffalign writes. :func:`quiet_loading` drops that record while our load runs (the check that the
  adapter fits the denoiser stays in ``backbones.lora``).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

_EMPTY_FP32 = "that should be kept in float32: []"
_NO_LORA_KEYS = "No LoRA keys associated to"


class _DropMessages(logging.Filter):
    def __init__(self, *needles: str) -> None:
        super().__init__()
        self.needles = needles

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not any(n in msg for n in self.needles)


_EMPTY_FP32_FILTER = _DropMessages(_EMPTY_FP32)


def install_filters() -> None:
    """Drop diffusers' empty float32-modules warning (idempotent; other records pass)."""
    log = logging.getLogger("diffusers.models.modeling_utils")
    if _EMPTY_FP32_FILTER not in log.filters:
        log.addFilter(_EMPTY_FP32_FILTER)


@contextlib.contextmanager
def quiet_loading() -> Iterator[None]:
    """No diffusers/transformers progress bars and no "No LoRA keys" warning inside the block."""
    install_filters()
    restore = []
    try:
        from diffusers.utils import logging as dlog

        if dlog.is_progress_bar_enabled():
            dlog.disable_progress_bar()
            restore.append(dlog.enable_progress_bar)
    except ImportError:  # pragma: no cover
        pass
    try:
        from transformers.utils import logging as tlog

        if tlog.is_progress_bar_enabled():
            tlog.disable_progress_bar()
            restore.append(tlog.enable_progress_bar)
    except ImportError:  # pragma: no cover
        pass
    lora_log = logging.getLogger("diffusers.loaders.lora_base")
    no_keys = _DropMessages(_NO_LORA_KEYS)
    lora_log.addFilter(no_keys)
    try:
        yield
    finally:
        lora_log.removeFilter(no_keys)
        for enable in restore:
            enable()
