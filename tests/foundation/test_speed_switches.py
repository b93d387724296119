"""Every speed switch gives the same loss (or the same update) as the run without it."""

import pytest
import torch

from diffalign.backbones.lora import _adapters_disabled_peft, _tuner_layers, adapters_disabled
from diffalign.config import RunConfig
from diffalign.objectives import DiffusionDPO
from diffalign.training.batches import model_inputs
from diffalign.training.setup import build_backbone, build_dataset, build_optimizer

from ..helpers import write_pairs
from .conftest import perturb_lora


def _cfg(tmp_path, model=None, train=None, family="sd15"):
    pairs = write_pairs(tmp_path / "pairs", n=8)
    return RunConfig.model_validate({
        "model": {"path": f"tiny:{family}", "resolution": 32, "lora_rank": 4, **(model or {})},
        "data": {"train": str(pairs), "random_flip": False},
        "train": {"output_dir": str(tmp_path / "run"), "batch_size": 4, "lr": 1e-3, **(train or {})},
    })


def _dpo_loss(cfg, perturb=True):
    bb = build_backbone(cfg)
    if perturb:
        perturb_lora(bb)
    ds, collate, empty = build_dataset(cfg, bb)
    batch = collate([ds[i] for i in range(4)])
    torch.manual_seed(0)
    inputs = model_inputs(batch, bb, 0.0, empty)
    loss, metrics = DiffusionDPO(beta=5000).loss(inputs, bb)
    return bb, loss, metrics


def _same(fast, base, mf, mb):
    """The per-sample errors agree to float32 round-off (a convolution in another memory format sums in
    another order); the loss multiplies their differences by beta/2 = 2500, so it agrees to 1e-4."""
    torch.testing.assert_close(mf["model_mse"], mb["model_mse"], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(fast, base, rtol=1e-4, atol=1e-5)


def test_channels_last_gives_the_same_loss(tmp_path):
    _, base, mb = _dpo_loss(_cfg(tmp_path))
    bb, fast, mf = _dpo_loss(_cfg(tmp_path, {"channels_last": True}))
    conv = next(m for m in bb.denoiser.modules() if isinstance(m, torch.nn.Conv2d) and m.weight.ndim == 4
                and m.weight.shape[-1] > 1)
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    _same(fast, base, mf, mb)


def test_channels_last_is_refused_for_a_transformer(tmp_path):
    with pytest.raises(ValueError, match="model.channels_last: only for UNets"):
        build_backbone(_cfg(tmp_path, {"channels_last": True}, family="sd3"))


def test_compiled_denoiser_gives_the_same_loss(tmp_path):
    _, base, mb = _dpo_loss(_cfg(tmp_path))
    # aot_eager traces forward and backward through dynamo and AOTAutograd as inductor does, without the
    # C++ compile time (the speed bench measures inductor)
    _, compiled, mc = _dpo_loss(_cfg(tmp_path, {"compile": True, "compile_backend": "aot_eager"}))
    _same(compiled, base, mc, mb)


@pytest.mark.parametrize("impl", ["foreach", "fused"])
def test_adamw_implementations_take_the_same_step(tmp_path, impl):
    params = {}
    for name in ("default", impl):
        cfg = _cfg(tmp_path, train={"adam_impl": name})
        bb, loss, _ = _dpo_loss(cfg)
        opt = build_optimizer(cfg, bb.trainable_parameters())
        loss.backward()
        opt.step()
        params[name] = [p.detach().clone() for p in bb.trainable_parameters()]
    moved = [(a - b).abs().max() for a, b in zip(params["default"], params[impl], strict=True)]
    assert max(moved) < 1e-6


def test_8bit_adamw_without_bitsandbytes_is_a_clear_error(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails as if not installed
    cfg = _cfg(tmp_path, train={"optimizer": "adamw8bit"})
    with pytest.raises(RuntimeError, match="train.optimizer adamw8bit: bitsandbytes is not installed"):
        build_optimizer(cfg, [torch.nn.Parameter(torch.zeros(2))])


def test_cached_reference_switch_equals_peft_switch_and_keeps_requires_grad(tmp_path):
    bb, _, _ = _dpo_loss(_cfg(tmp_path))
    x = torch.randn(bb.latent_shape(2))
    t = torch.tensor([100, 700])
    c = bb.encode_prompts(["a red circle", "a blue square"])
    model = bb.denoiser
    with torch.no_grad():
        policy = bb.predict(x, t, c)
        with _adapters_disabled_peft(model):
            peft_ref = bb.predict(x, t, c)
        with adapters_disabled(model):
            cached_ref = bb.predict(x, t, c)
        again = bb.predict(x, t, c)
    assert torch.equal(cached_ref, peft_ref)
    assert not torch.allclose(policy, peft_ref)  # the LoRA was perturbed: the reference differs
    assert torch.equal(again, policy)  # the adapters are back on after the block
    assert all(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)
    assert len(_tuner_layers(model)) > 0
    # the layers are found once: a second call returns the same list object
    assert _tuner_layers(model) is _tuner_layers(model)


def test_a_bad_compile_backend_is_an_error_naming_the_key(tmp_path):
    with pytest.raises(ValueError, match="model.compile_backend 'nonsense'"):
        build_backbone(_cfg(tmp_path, {"compile": True, "compile_backend": "nonsense"}))


@pytest.mark.parametrize("family", ["sd15", "sd2v", "sdxl", "sd3", "flux"])
@pytest.mark.parametrize("mode", [True, "selective"])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(tmp_path, family, mode, monkeypatch):
    """Full and selective checkpointing run the blocks again in the backward: same loss, same LoRA gradients,
    and the checkpoint function is really what the blocks ran through."""
    import torch.utils.checkpoint as tuc

    from diffalign.backbones import checkpointing

    calls = []
    orig = tuc.checkpoint
    monkeypatch.setattr(tuc, "checkpoint", lambda *a, **k: calls.append(k.get("context_fn")) or orig(*a, **k))
    runs = []
    for m in ({}, {"gradient_checkpointing": mode}):
        calls.clear()
        bb, loss, metrics = _dpo_loss(_cfg(tmp_path / str(len(runs)), m, family=family))
        loss.backward()
        grads = {n: p.grad.clone() for n, p in bb.denoiser.named_parameters() if p.requires_grad}
        runs.append((loss.detach(), metrics, grads, list(calls)))
    (base, mb, gb, cb), (fast, mf, gf, cf) = runs
    assert not cb and cf  # the blocks ran through torch's checkpoint only with the switch on
    assert all((c is not None) == (mode == "selective") for c in cf)  # selective: torch's SAC context
    _same(fast, base, mf, mb)
    assert gf.keys() == gb.keys() and gb
    for n in gb:
        torch.testing.assert_close(gf[n], gb[n], rtol=1e-4, atol=1e-6, msg=n)
    if mode == "selective":
        names = {getattr(op, "__name__", str(op)) for op in checkpointing.kept_ops()}
        assert any("convolution" in n for n in names) and any("scaled_dot_product" in n for n in names)


def test_a_bad_gradient_checkpointing_value_names_the_key(tmp_path):
    with pytest.raises(ValueError, match="gradient_checkpointing"):
        _cfg(tmp_path, {"gradient_checkpointing": "some"})
