"""PPD objective: DPO with the user embedding in the policy only; starts at z = 0 exactly; only the injection trains."""

import math

import pytest
import torch

from diffalign.backbones import load_backbone
from diffalign.backbones.lora import add_lora
from diffalign.backbones.tiny import build_tiny_pipeline
from diffalign.objectives.ppd import PersonalizedDPO
from diffalign.personalization.inject import injection_parameters, with_user

D = 8


def _batch(bb, b=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    lw = torch.randn(bb.latent_shape(b), generator=g)
    ll = torch.randn(bb.latent_shape(b), generator=g)
    cond = with_user(bb.encode_prompts(["a red circle", "a blue square"][:b]), torch.randn(b, D, generator=g))
    return {"latents_w": lw, "latents_l": ll, "cond": cond, "weight": None}


@pytest.mark.parametrize(("family", "lora"), [("sd15", False), ("sd3", True), ("flux", False)])
def test_ppd_starts_at_the_reference_and_trains_only_the_injection(family, lora):
    bb = load_backbone(build_tiny_pipeline(family))
    bb.resolution = 32
    if lora:
        add_lora(bb, rank=2)
    else:
        bb.denoiser.requires_grad_(False)
    obj = PersonalizedDPO(beta=1000.0, embed_dim=D, tokens=2)
    obj.setup(bb)
    trainable = {id(p) for p in bb.trainable_parameters()}
    assert trainable == {id(p) for p in injection_parameters(bb)}
    torch.manual_seed(0)
    loss, m = obj.loss(_batch(bb), bb)
    assert abs(float(m["logit"])) == 0.0 and math.isclose(float(loss.detach()), math.log(2), rel_tol=1e-6)
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in injection_parameters(bb))
    opt = torch.optim.AdamW(injection_parameters(bb), lr=1e-2)
    opt.step()
    torch.manual_seed(0)
    _, m2 = obj.loss(_batch(bb), bb)
    assert float(m2["logit"]) != 0.0  # the policy moved, the reference did not


def test_ppd_needs_user_embeddings_and_an_encoder():
    bb = load_backbone(build_tiny_pipeline("sd15"))
    bb.resolution = 32
    with pytest.raises(ValueError, match="objective.embed_dim"):
        PersonalizedDPO().setup(bb)
    obj = PersonalizedDPO(embed_dim=D)
    obj.setup(bb)
    batch = _batch(bb)
    batch["cond"] = bb.encode_prompts(["a red circle", "a blue square"])
    with pytest.raises(ValueError, match="no user embedding"):
        obj.loss(batch, bb)
    with pytest.raises(ValueError, match="embedding_dropout"):
        PersonalizedDPO(embedding_dropout=1.0)
