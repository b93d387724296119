"""With the latent + text-embedding cache, the VAE and text encoders are not constructed while training,
and the results are identical to a run that loads them."""

from pathlib import Path

import torch
from safetensors.torch import load_file

from diffalign.backbones.tiny import build_tiny_pipeline
from diffalign.config import RunConfig
from diffalign.data.cache import build_cache
from diffalign.data.pairs import PreferencePairs
from diffalign.objectives import DiffusionDPO
from diffalign.training import deferred, train
from diffalign.training.batches import model_inputs
from diffalign.training.deferred import DeferredModule
from diffalign.training.setup import build_backbone, build_dataset

from ..helpers import write_pairs
from .conftest import perturb_lora


def _setup(tmp_path: Path) -> RunConfig:
    model = tmp_path / "model"
    build_tiny_pipeline("sd15").save_pretrained(model)
    pairs = write_pairs(tmp_path / "pairs", n=8)
    cfg = RunConfig.model_validate({
        "model": {"path": str(model), "resolution": 32, "lora_rank": 4},
        "data": {"train": str(pairs), "random_flip": False, "cache_dir": str(tmp_path / "cache")},
        "objective": {"name": "dpo"},
        "train": {"output_dir": str(tmp_path / "run"), "batch_size": 4, "lr": 1e-3, "steps": 3, "log_every": 1,
                  "checkpoint_every": 0, "sample_every": 0, "sample_steps": 2, "progress": False,
                  "checkpoint_checksums": False},
    })
    bb = build_backbone(cfg, defer_frozen=False)
    build_cache(PreferencePairs(str(pairs), resolution=32, random_flip=False), bb, tmp_path / "cache",
                progress=False, dtype="float32")
    return cfg


def _loss(cfg: RunConfig, defer: bool):
    torch.manual_seed(0)
    bb = build_backbone(cfg, defer_frozen=defer)
    perturb_lora(bb)
    ds, collate, empty = build_dataset(cfg, bb)
    torch.manual_seed(0)
    batch = collate([ds[i] for i in range(4)])
    inputs = model_inputs(batch, bb, 0.3, empty)
    loss, _ = DiffusionDPO(beta=5000).loss(inputs, bb)
    return bb, loss


def test_cached_dpo_loss_is_identical_without_vae_and_text_encoder(tmp_path):
    cfg = _setup(tmp_path)
    bb, loss = _loss(cfg, defer=True)
    eager, base = _loss(cfg, defer=False)
    for name in ("vae", "text_encoder"):
        comp = bb.pipe.components[name]
        assert isinstance(comp, DeferredModule) and not comp.loaded, name
    assert not isinstance(eager.pipe.vae, DeferredModule)
    assert torch.equal(loss, base)
    # first use (a sample grid): the real component is loaded and gives the same images and embeddings
    z = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    assert torch.equal(bb.decode_latents(z), eager.decode_latents(z))
    assert torch.equal(bb.encode_prompts(["a red circle"]).tensors["encoder_hidden_states"],
                       eager.encode_prompts(["a red circle"]).tensors["encoder_hidden_states"])
    assert bb.pipe.components["vae"].loaded and bb.pipe.components["text_encoder"].loaded


def test_cached_training_run_never_builds_them_and_ends_with_the_same_weights(tmp_path, monkeypatch):
    cfg = _setup(tmp_path)
    from diffalign.training import loop

    seen = []
    real_grid = loop.sample_grid

    def grid(backbone, cfg_, path, seed=0):  # the final grid is the first use
        seen.append({n: c.loaded for n, c in backbone.pipe.components.items() if isinstance(c, DeferredModule)})
        return real_grid(backbone, cfg_, path, seed)

    monkeypatch.setattr(loop, "sample_grid", grid)
    train(cfg)
    assert seen == [{"vae": False, "text_encoder": False}]
    lora = load_file(str(tmp_path / "run" / "final" / "lora" / "pytorch_lora_weights.safetensors"))

    monkeypatch.setattr(deferred, "load_pipeline_deferred", None)  # would fail if called
    monkeypatch.setattr("diffalign.training.setup.can_defer", lambda path: False)
    eager = cfg.model_copy(update={"train": cfg.train.model_copy(update={"output_dir": str(tmp_path / "eager")})})
    train(eager)
    assert seen[-1] == {}
    base = load_file(str(tmp_path / "eager" / "final" / "lora" / "pytorch_lora_weights.safetensors"))
    assert base.keys() == lora.keys()
    for k in lora:
        assert torch.equal(lora[k], base[k]), k
