import math

import pytest
import torch

from diffalign.objectives import InPO
from diffalign.sampling.trajectories import ddim_invert

from .conftest import FAMILIES, perturb_lora


def _pairs(bb, b=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = bb.latent_shape(b)
    return {"latents_w": torch.randn(shape, generator=g), "latents_l": torch.randn(shape, generator=g),
            "cond": bb.encode_prompts(["a red circle", "a blue square"][:b])}


def _ideal_model(bb, x_star):
    """A deterministic model whose data distribution is the single point x_star: at (x, t) it predicts
    x0 = x_star and the noise that x implies, in the backbone's parametrisation. DDIM is exact for it."""

    def predict(x, t, cond, reference=False):
        a, s = bb._bcast(bb.alpha(t), x), bb._bcast(bb.sigma(t), x)
        eps = (x - a * x_star) / s
        return bb.target(x_star, eps, t)

    return predict


@pytest.mark.parametrize("family", ["sd15", "sd2v", "sd3"])
def test_inverse_step_then_forward_step_returns_the_start_latent(family, make_backbone):
    bb = make_backbone(family)
    g = torch.Generator().manual_seed(0)
    shape = bb.latent_shape(2)
    x_star, x = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    bb.predict = _ideal_model(bb, x_star)
    t, t_next = torch.tensor([200, 500]), torch.tensor([300, 700])
    up = bb.ddim_step(bb.predict(x, t, None), x, t, t_next)  # inversion: towards noise
    down = bb.ddim_step(bb.predict(up, t_next, None), up, t_next, t)  # the forward DDIM step back
    assert not torch.allclose(up, x, atol=1e-2)
    torch.testing.assert_close(down, x, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["sd15", "sd2v", "sd3", "flux"])
def test_inverse_step_is_nearly_reversible_for_a_real_model_over_a_small_step(family, make_backbone):
    bb = make_backbone(family)
    cond = bb.encode_prompts(["a red circle", "a blue square"])
    g = torch.Generator().manual_seed(1)
    x = torch.randn(bb.latent_shape(2), generator=g)
    t, t_next = torch.tensor([500, 500]), torch.tensor([502, 502])
    with torch.no_grad():
        up = bb.ddim_step(bb.predict(x, t, cond), x, t, t_next)
        down = bb.ddim_step(bb.predict(up, t_next, cond), up, t_next, t)
    moved = (up - x).abs().max()
    assert moved > 0
    assert (down - x).abs().max() < 0.1 * moved  # the round trip error is second order in the step


def test_inversion_uses_the_fixed_grid_and_lands_on_the_sampled_level(make_backbone):
    bb = make_backbone("sd15")
    g = torch.Generator().manual_seed(0)
    shape = bb.latent_shape(3)
    x_star = torch.randn(shape, generator=g)
    ideal = _ideal_model(bb, x_star)
    calls = []

    def counting(x, t, cond, reference=False):
        calls.append(t.tolist())
        return ideal(x, t, cond)

    bb.predict = counting
    t_s = torch.tensor([0, 250, 999])
    x_inv = ddim_invert(bb, x_star, None, t_s, steps=10, eta=0.0)
    # levels 0,100,200 (< 250) for sample 1 and 0..900 for sample 2: ten model calls, at the grid levels
    assert len(calls) == 10 and [c[2] for c in calls] == list(range(0, 1000, 100))
    assert torch.equal(x_inv[0], x_star[0])  # t_s = 0: nothing to invert
    # the ideal model's DDIM path from x_star keeps the noise it starts with (here 0 at level 0) ...
    a, s = bb.alpha(t_s), bb.sigma(t_s)
    eps = (x_inv - bb._bcast(a, x_inv) * x_star) / bb._bcast(s, x_inv)
    # ... so the implied eps~ at the landing level is the level-0 noise, carried exactly
    eps0 = (x_star - bb.alpha(torch.tensor([0])) * x_star) / bb.sigma(torch.tensor([0]))
    torch.testing.assert_close(eps[1:], eps0[1:].expand_as(eps[1:]), atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("family", FAMILIES)
def test_loss_is_ln2_when_policy_equals_reference(family, make_backbone):
    bb = make_backbone(family, lora=True)
    loss, m = InPO(beta=2000).loss(_pairs(bb), bb)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    assert m["logit"] == 0.0 and m["implicit_acc"] == 0.0


def test_winner_and_loser_get_different_inverted_noise_and_gradients_flow(make_backbone):
    bb = make_backbone("sd15", lora=True)
    perturb_lora(bb)
    loss, m = InPO(beta=2000, inversion_eta=0.0).loss(_pairs(bb), bb)
    assert math.isfinite(loss.item()) and abs(loss.item() - math.log(2)) > 1e-5
    loss.backward()
    grads = [p.grad for p in bb.trainable_parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)
