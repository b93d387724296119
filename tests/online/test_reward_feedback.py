"""Reward feedback objectives (ReFL, DRaFT-K, DRaFT-LV, AlignProp) on the five tiny families."""

import pytest
import torch

from diffalign.backbones.lora import add_lora
from diffalign.objectives import OBJECTIVES, build_objective
from diffalign.objectives.reward_feedback import AlignProp, DRaFT, ReFL
from tests.online.conftest import FAMILIES, PROMPTS, Brightness, ZeroReward, tiny

SMALL = {  # 3-step chains keep the tests fast
    "refl": dict(steps=3, k_lo=1, k_hi=2, guidance_scale=3.0),
    "draft": dict(steps=3, k=2, guidance_scale=3.0),
    "draft_lv": dict(steps=3, lv_copies=2, guidance_scale=3.0),
    "alignprop": dict(steps=3, k_mean=2, k_std=1, guidance_scale=3.0),
}


def build(method, **kw):
    return build_objective("draft" if method == "draft_lv" else method, **{**SMALL[method], **kw})


def batch_for(bb):
    return {"prompts": list(PROMPTS), "cond": bb.encode_prompts(PROMPTS)}


def grads(bb):
    return [p.grad for p in bb.denoiser.parameters() if p.requires_grad]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", list(SMALL))
def test_every_method_runs_and_reaches_the_lora(family, method):
    bb = tiny(family, lora=True)
    obj = build(method, beta_kl=0.1)
    obj.setup(bb, reward=Brightness())
    torch.manual_seed(0)
    loss, metrics = obj.loss(batch_for(bb), bb)
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert all(isinstance(v, torch.Tensor) and not v.requires_grad for v in metrics.values())
    assert {"loss", "reward", "reward_std", "kl"} <= set(metrics)
    loss.backward()
    g = grads(bb)
    assert g and any(x is not None and x.abs().sum() > 0 for x in g), f"{method} on {family}: no LoRA gradient"
    assert metrics["kl"] > 0  # the perturbed LoRA differs from the reference


@pytest.mark.parametrize("method", list(SMALL))
def test_constant_reward_gives_zero_gradient(method):
    bb = tiny("sd15", lora=True)
    obj = build(method)
    obj.setup(bb, reward=ZeroReward())
    torch.manual_seed(0)
    loss, _ = obj.loss(batch_for(bb), bb)
    loss.backward()
    assert all(x is None or x.abs().max() == 0 for x in grads(bb))


@pytest.mark.parametrize("family", ["sd15", "sd3"])
@pytest.mark.parametrize("method", list(SMALL))
def test_kl_is_zero_at_init(family, method):
    """A fresh LoRA (B = 0) is the reference: the KL term is exactly 0, and so is its gradient."""
    bb = tiny(family)
    add_lora(bb, rank=4)
    obj = build(method, beta_kl=1.0)
    obj.setup(bb, reward=ZeroReward())
    torch.manual_seed(0)
    loss, metrics = obj.loss(batch_for(bb), bb)
    assert metrics["kl"] == 0
    loss.backward()
    assert all(x is None or x.abs().max() == 0 for x in grads(bb))


def test_reward_gradient_has_the_right_sign():
    """A small step along -grad of the ReFL loss raises the reward of the same chain (same noise, same k)."""
    bb = tiny("sd15", lora=True)
    obj = ReFL(steps=3, k_lo=2, k_hi=2, guidance_scale=3.0, reward_scale=1.0)
    obj.setup(bb, reward=Brightness())
    batch = batch_for(bb)
    torch.manual_seed(0)
    loss, m0 = obj.loss(batch, bb)
    loss.backward()
    with torch.no_grad():
        for p in bb.denoiser.parameters():
            if p.requires_grad and p.grad is not None:
                p -= 1e-2 * p.grad / max(float(p.grad.norm()), 1e-12)
    torch.manual_seed(0)
    _, m1 = obj.loss(batch, bb)
    assert m1["reward"] > m0["reward"]


def test_refl_pretrain_loss():
    bb = tiny("sd15", lora=True)
    obj = ReFL(**SMALL["refl"], pretrain_weight=0.5)
    obj.setup(bb, reward=Brightness())
    batch = batch_for(bb)
    with pytest.raises(ValueError, match="latents"):
        obj.loss(batch, bb)
    batch["latents"] = torch.randn(bb.latent_shape(2))
    loss, m = obj.loss(batch, bb)
    assert m["pretrain_mse"] > 0 and torch.isfinite(loss)


def test_setup_and_options_errors():
    class NotDiff(Brightness):
        differentiable = False
        name = "toy_shape"

    bb = tiny("sd15", lora=True)
    with pytest.raises(ValueError, match="needs a reward"):
        AlignProp(steps=3).setup(bb, reward=None)
    with pytest.raises(ValueError, match="not differentiable"):
        DRaFT(steps=3).setup(bb, reward=NotDiff())
    with pytest.raises(ValueError, match="k_lo"):
        ReFL(steps=10, k_lo=8, k_hi=12)
    with pytest.raises(ValueError, match="DRaFT k"):
        DRaFT(steps=3, k=4)
    with pytest.raises(ValueError, match="truncation"):
        AlignProp(truncation="normal")
    assert ReFL.data_kind == "prompts" and ReFL.needs_reward and not ReFL(steps=3, k_lo=0, k_hi=1).stateful
    assert {OBJECTIVES[n] for n in ("refl", "draft", "alignprop")} == {ReFL, DRaFT, AlignProp}
    with pytest.raises(ValueError, match="objective.beta_kl"):
        build_objective("draft", beta_kl=-1.0)


def test_ensemble_members_are_logged():
    from rewards.ensemble import Ensemble

    bb = tiny("sd15", lora=True)
    obj = build("draft")
    obj.setup(bb, reward=Ensemble({"bright": Brightness(), "dark": Brightness(-1.0)}, {"bright": 1.0, "dark": 0.5}))
    torch.manual_seed(0)
    _, m = obj.loss(batch_for(bb), bb)
    torch.testing.assert_close(m["reward"], m["reward/bright"] + 0.5 * m["reward/dark"])
    torch.testing.assert_close(m["reward/dark"], -m["reward/bright"])


def test_reward_cap_stops_the_gradient_above_it():
    bb = tiny("sd15", lora=True)
    obj = build("draft", reward_cap=-1.0)  # brightness is >= 0 > cap: every sample is capped
    obj.setup(bb, reward=Brightness())
    torch.manual_seed(0)
    loss, m = obj.loss(batch_for(bb), bb)
    torch.testing.assert_close(loss, torch.tensor(1.0))
    loss.backward()
    assert all(x is None or x.abs().max() == 0 for x in grads(bb))
