"""The denoiser read a slice of its file at a time, straight into bf16 (``backbones/streaming.py``), is the model
diffusers' ``from_pretrained(torch_dtype=bf16)`` gives, bit for bit, on every family; where it cannot be
(fp32, .bin weights, keys that differ) diffusers loads the component as before."""

import diffusers
import pytest
import torch
from safetensors.torch import load_file, save_file

from diffalign.backbones import load_backbone, streaming
from diffalign.backbones.tiny import build_tiny_pipeline


def _same(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype, k
        assert torch.equal(sa[k], sb[k]), k
    for (na, ba), (nb, bb) in zip(a.named_buffers(), b.named_buffers(), strict=True):  # non-persistent ones too
        assert na == nb and ba.dtype == bb.dtype and torch.equal(ba, bb), na


@pytest.mark.parametrize("family", ["sd15", "sd2v", "sdxl", "sd3", "flux"])
def test_streamed_denoiser_equals_from_pretrained_in_bf16(tmp_path, family, monkeypatch):
    path = tmp_path / family
    build_tiny_pipeline(family).save_pretrained(path)
    comp = "unet" if family in ("sd15", "sd2v", "sdxl") else "transformer"
    cls_name = type(getattr(build_tiny_pipeline(family), comp)).__name__
    monkeypatch.setattr(streaming, "GROUP_BYTES", 4096)  # many groups: the file is reopened between them
    got = streaming.load_denoiser_lowmem(path / comp, cls_name, torch.bfloat16, max_bytes=4096)
    assert got is not None and not got.training
    want = getattr(diffusers, cls_name).from_pretrained(path / comp, torch_dtype=torch.bfloat16)
    _same(got, want)
    assert any(p.dtype == torch.bfloat16 for p in got.parameters())

    # and through load_backbone: the pipeline takes the streamed denoiser, the rest as diffusers loads it
    calls = []
    orig = streaming.load_denoiser_lowmem
    monkeypatch.setattr(streaming, "load_denoiser_lowmem", lambda *a, **k: calls.append(a[1]) or orig(*a, **k))
    bb = load_backbone(path, dtype=torch.bfloat16)
    assert calls == [cls_name]
    _same(bb.denoiser, want)


def test_groups_stay_under_the_limit(tmp_path):
    from safetensors import safe_open

    f = tmp_path / "w.safetensors"
    save_file({f"t{i}": torch.zeros(256) for i in range(10)}, str(f))  # 1 KiB each in fp32
    with safe_open(str(f), framework="pt") as h:
        groups = streaming._groups(h, 3 * 1024)
    assert [len(g) for g in groups] == [3, 3, 3, 1]
    assert sorted(k for g in groups for k in g) == sorted(f"t{i}" for i in range(10))


def test_falls_back_where_it_would_not_be_the_same_model(tmp_path):
    path = tmp_path / "sd15"
    build_tiny_pipeline("sd15").save_pretrained(path)
    unet = path / "unet"
    assert streaming.load_denoiser_lowmem(unet, "UNet2DConditionModel", torch.float32) is None  # nothing to save
    assert streaming.load_denoiser_lowmem(unet, "NoSuchModel", torch.bfloat16) is None
    # a key the model does not have (an older layout diffusers renames on load): diffusers loads it
    w = unet / "diffusion_pytorch_model.safetensors"
    sd = load_file(str(w))
    sd["extra.weight"] = torch.zeros(1)
    save_file(sd, str(w))
    assert streaming.load_denoiser_lowmem(unet, "UNet2DConditionModel", torch.bfloat16) is None
    # a damaged file: diffusers loads it and says what is wrong, as without this path
    w.write_bytes(b"not a safetensors file")
    assert streaming.load_denoiser_lowmem(unet, "UNet2DConditionModel", torch.bfloat16) is None
    # .bin weights only: diffusers loads it
    w.unlink()
    torch.save({}, unet / "diffusion_pytorch_model.bin")
    assert streaming.load_denoiser_lowmem(unet, "UNet2DConditionModel", torch.bfloat16) is None
