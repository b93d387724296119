"""Turn a data batch (pixels, or cached latents and embeddings) into the objective's model inputs:
``{"latents_w", "latents_l", "cond", "weight"}`` for pairs, ``{"latents", "cond"}`` for expert
images, ``{"prompts", "cond"}`` for prompts (online objectives), on the backbone's device."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Any

import torch

from ..backbones.base import Backbone, Cond, apply_prompt_dropout


def model_inputs(batch: dict[str, Any], backbone: Backbone, prompt_dropout: float, empty_cond: Cond | None) -> dict:
    dev = backbone.device
    if "prompts" in batch:  # online: {"prompts", "cond"}; no prompt dropout (the reward scores the prompt)
        out = {"prompts": list(batch["prompts"]), "cond": backbone.encode_prompts(batch["prompts"])}
        if "references" in batch:  # reference images for an identity reward (ID-Aligner)
            out["references"] = batch["references"].to(dev)
        if batch.get("cond_extra"):  # reference embeddings for an identity adapter
            out["cond"] = Cond({**out["cond"].tensors, **{k: v.to(dev) for k, v in batch["cond_extra"].items()}})
        return out
    if "pixels" in batch:  # expert demonstrations (single images)
        with torch.no_grad():
            latents = backbone.encode_images(batch["pixels"].to(dev))
        return {"latents": latents, "cond": backbone.encode_prompts(batch["captions"], dropout=prompt_dropout)}
    if "latents_w" in batch:  # cached: no VAE or text-encoder call
        cond = batch["cond"].to(dev)
        if empty_cond is not None:
            cond = apply_prompt_dropout(cond, empty_cond.to(dev), prompt_dropout)
        lw, ll = batch["latents_w"].to(dev), batch["latents_l"].to(dev)
    else:
        with torch.no_grad():
            b = batch["pixels_w"].shape[0]
            lat = backbone.encode_images(torch.cat([batch["pixels_w"], batch["pixels_l"]]).to(dev))
            lw, ll = lat[:b], lat[b:]
        cond = backbone.encode_prompts(batch["captions"], dropout=prompt_dropout)
    if batch.get("cond_extra"):  # more conditioning tensors from the data (e.g. user embeddings, personalization)
        cond = Cond({**cond.tensors, **{k: v.to(dev) for k, v in batch["cond_extra"].items()}})
    weight = batch.get("weight")
    return {"latents_w": lw, "latents_l": ll, "cond": cond, "weight": None if weight is None else weight.to(dev)}


class SeededItems(torch.utils.data.Dataset):
    """Wrap a dataset so each item's random augmentation is seeded by (seed, epoch, index) and never
    touches the global RNG: data prefetching then cannot shift the objective's noise, and a resumed
    run draws exactly what an uninterrupted one draws."""

    def __init__(self, dataset: Any, seed: int) -> None:
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> Any:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((self.seed * 1_000_003 + self.epoch) * 1_000_033 + int(i))
            return self.dataset[i]


def batch_seed(seed: int, index: int) -> int:
    """The seed of global micro-batch ``index`` (``train.rng: per_batch``)."""
    h = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") >> 1


def endless_batches(loader: Any, dataset: SeededItems, first_micro_step: int = 0) -> Iterator[dict]:
    """Endless batches; epoch e is shuffled by (seed, e), so a resumed run sees the same order."""
    from accelerate import skip_first_batches

    n = len(loader)
    epoch, skip = divmod(first_micro_step, n)
    while True:
        loader.set_epoch(epoch)
        dataset.epoch = epoch
        yield from (skip_first_batches(loader, skip) if skip else loader)
        epoch, skip = epoch + 1, 0
