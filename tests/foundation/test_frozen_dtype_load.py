"""``model.frozen_dtype`` with a LoRA: a pipeline folder is loaded straight in that dtype (no fp32 copy of the
frozen weights at any time), with the same weights as loading in fp32 and casting, and the LoRA in fp32."""

from pathlib import Path

import diffusers
import pytest
import torch

from diffalign.backbones import load_backbone
from diffalign.backbones.tiny import build_tiny_pipeline
from diffalign.config import RunConfig
from diffalign.training.deferred import DeferredModule
from diffalign.training.setup import build_backbone


def _cfg(tmp_path: Path, model: Path, **model_kw) -> RunConfig:
    return RunConfig.model_validate({
        "model": {"path": str(model), "resolution": 32, "lora_rank": 4, "frozen_dtype": "bfloat16", **model_kw},
        "data": {"train": str(tmp_path / "pairs")},
        "objective": {"name": "dpo"},
        "train": {"output_dir": str(tmp_path / "run"), "steps": 1},
    })


@pytest.fixture
def model(tmp_path):
    path = tmp_path / "model"
    build_tiny_pipeline("sd15").save_pretrained(path)
    return path


@pytest.fixture
def loads(monkeypatch):
    """The ``torch_dtype`` of every pipeline ``from_pretrained`` call."""
    seen = []
    orig = diffusers.StableDiffusionPipeline.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        seen.append(kwargs.get("torch_dtype"))
        return orig(cls, *args, **kwargs)

    monkeypatch.setattr(diffusers.StableDiffusionPipeline, "from_pretrained", classmethod(spy))
    return seen


@pytest.mark.parametrize("deferred", [False, True])
def test_frozen_bf16_loads_in_bf16_with_the_weights_of_fp32_then_cast(tmp_path, model, loads, deferred):
    cfg = _cfg(tmp_path, model)
    bb = build_backbone(cfg, defer_frozen=deferred)
    assert loads == [torch.bfloat16]  # one load, in bf16: the fp32 copy of the frozen weights never exists
    ref = load_backbone(model)  # fp32, cast afterwards: what build_backbone did before
    want = {n: p.to(torch.bfloat16) for n, p in ref.denoiser.named_parameters()}
    got = dict(bb.denoiser.named_parameters())
    lora = [n for n in got if "lora_" in n]
    assert lora and all(got[n].dtype == torch.float32 and got[n].requires_grad for n in lora)
    for n, p in got.items():
        if "lora_" in n:
            continue
        key = n.replace(".base_layer", "")
        assert p.dtype == torch.bfloat16 and not p.requires_grad, n
        assert torch.equal(p, want[key]), n
    vae = bb.pipe.vae
    if deferred:
        assert isinstance(vae, DeferredModule) and not vae.loaded
        assert vae.dtype == torch.bfloat16
    for name, p in vae.named_parameters():  # a deferred VAE loads here, in its dtype
        assert p.dtype == torch.bfloat16
        assert torch.equal(p, dict(ref.pipe.vae.named_parameters())[name].to(torch.bfloat16)), name


def test_full_fine_tune_keeps_its_denoiser_in_fp32(tmp_path, model, loads):
    bb = build_backbone(_cfg(tmp_path, model, lora=False), defer_frozen=False)
    assert loads == [None]
    assert all(p.dtype == torch.float32 for p in bb.denoiser.parameters())
    assert all(p.dtype == torch.bfloat16 for p in bb.pipe.vae.parameters())
