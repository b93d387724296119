"""Differentiable sampling chains: where gradient flows, and that the chain is the stock sampler."""

import pytest
import torch

from diffalign.sampling.chains import chain_timesteps, ddim_chain, draw_truncation, refl_x0, renoised_x0
from diffalign.sampling.solvers import guided_output, resolve_scheduler, sample_latents
from tests.online.conftest import FAMILIES, PROMPTS, tiny


def _setup(family, steps=4, lora=True):
    bb = tiny(family, lora=lora)
    cond = bb.encode_prompts(PROMPTS)
    uncond = bb.negative_cond("", len(PROMPTS))
    noise = torch.randn(bb.latent_shape(len(PROMPTS)), generator=torch.Generator().manual_seed(0))
    return bb, cond, uncond, noise, chain_timesteps(bb, steps, noise.shape)


def _lora_grads(bb):
    return {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p))
            for n, p in bb.denoiser.named_parameters() if p.requires_grad}


def _backward(bb, x0):
    bb.denoiser.zero_grad(set_to_none=True)
    x0.float().pow(2).mean().backward()
    return _lora_grads(bb)


@pytest.mark.parametrize("family,scheduler", [("sd15", "ddim"), ("sd3", None), ("flux", None)])
def test_no_grad_chain_is_the_stock_sampler(family, scheduler):
    """With no gradient, the chain is DDIM (UNet, set_alpha_to_one=False) / flow Euler, as sample_latents."""
    bb, cond, uncond, noise, ts = _setup(family, steps=5, lora=False)
    sched = resolve_scheduler(bb, scheduler)
    if family == "sd15":
        sched = type(sched).from_config({**sched.config, "set_alpha_to_one": False, "timestep_spacing": "leading"})
        bb.pipe.scheduler = sched
        ts = chain_timesteps(bb, 5, noise.shape)
    ref = sample_latents(bb, cond, uncond, steps=5, guidance_scale=3.0, latents=noise, scheduler=sched)
    got = ddim_chain(bb, noise, cond, uncond, ts, guidance_scale=3.0, grad_steps=0).x0
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["sd15", "sd3"])
def test_truncated_chain_gradient_comes_from_the_last_k_steps_only(family):
    """Gradient reaches the LoRA, and equals the gradient of the last K steps run from the detached state:
    nothing flows from the steps run without gradient."""
    bb, cond, uncond, noise, ts = _setup(family, steps=4)
    chain = ddim_chain(bb, noise, cond, uncond, ts, guidance_scale=3.0, grad_steps=2)
    assert len(chain.grad_steps) == 2 and not chain.grad_steps[0].x.requires_grad
    g = _backward(bb, chain.x0)
    assert any(v.abs().sum() > 0 for v in g.values()), "no gradient reached the LoRA"
    # the same two steps run by hand from the detached entry state
    x = chain.grad_steps[0].x.clone()
    with torch.no_grad():  # the entry state must be the no-grad chain's state at t_2
        y = noise
        for i in range(2):
            y = bb.ddim_step(guided_output(bb, y, ts[i], cond, uncond, 3.0), y, ts[i].expand(2), ts[i + 1].expand(2))
    torch.testing.assert_close(x, y)
    for i in (2, 3):
        t_next = ts[i + 1] if i + 1 < len(ts) else torch.zeros_like(ts[i])
        x = bb.ddim_step(guided_output(bb, x, ts[i], cond, uncond, 3.0), x, ts[i].expand(2), t_next.expand(2))
    g2 = _backward(bb, x)
    for n in g:
        torch.testing.assert_close(g[n], g2[n], rtol=1e-5, atol=1e-7)


def test_no_grad_steps_build_no_graph(monkeypatch):
    """Every model call before the last K runs with grad disabled; the last K with grad."""
    bb, cond, uncond, noise, ts = _setup("sd15", steps=5)
    seen = []
    orig = bb.predict

    def spy(x, t, c, reference=False):
        seen.append(torch.is_grad_enabled())
        return orig(x, t, c, reference=reference)

    monkeypatch.setattr(bb, "predict", spy)
    ddim_chain(bb, noise, cond, uncond, ts, guidance_scale=3.0, grad_steps=2)
    assert seen == [False, False, False, True, True]


def test_checkpointing_gives_the_same_gradient():
    bb, cond, uncond, noise, ts = _setup("sd15", steps=4)
    g = _backward(bb, ddim_chain(bb, noise, cond, uncond, ts, guidance_scale=3.0, grad_steps=3).x0)
    g_ck = _backward(bb, ddim_chain(bb, noise, cond, uncond, ts, guidance_scale=3.0, grad_steps=3, checkpoint=True).x0)
    for n in g:
        torch.testing.assert_close(g[n], g_ck[n], rtol=1e-5, atol=1e-7)


def test_refl_gradient_comes_from_the_chosen_step_only(monkeypatch):
    """ReFL: exactly one model call with grad, at t_k; the gradient equals that one call's, by hand."""
    bb, cond, uncond, noise, ts = _setup("sd15", steps=5)
    seen = []
    orig = bb.predict

    def spy(x, t, c, reference=False):
        seen.append((torch.is_grad_enabled(), float(t.reshape(-1)[0])))
        return orig(x, t, c, reference=reference)

    monkeypatch.setattr(bb, "predict", spy)
    chain = refl_x0(bb, noise, cond, uncond, ts, guidance_scale=3.0, index=3)
    with_grad = [t for g, t in seen if g]
    assert with_grad == [float(ts[3])] and len(seen) == 4
    monkeypatch.undo()
    g = _backward(bb, chain.x0)
    x = chain.grad_steps[0].x
    x0 = bb.to_x0(guided_output(bb, x, ts[3], cond, uncond, 3.0), x, ts[3].expand(2))
    g2 = _backward(bb, x0)
    for n in g:
        torch.testing.assert_close(g[n], g2[n], rtol=1e-5, atol=1e-7)
    assert any(v.abs().sum() > 0 for v in g.values())


def test_renoised_copies():
    bb, cond, uncond, noise, ts = _setup("sd3", steps=4)
    x0 = ddim_chain(bb, noise, cond, uncond, ts, guidance_scale=3.0, grad_steps=0).x0
    chain = renoised_x0(bb, x0, cond, uncond, ts[-1], guidance_scale=3.0, n=3)
    assert chain.x0.shape[0] == 3 * x0.shape[0] and not chain.grad_steps[0].x.requires_grad
    g = _backward(bb, chain.x0)
    assert any(v.abs().sum() > 0 for v in g.values())


def test_draw_truncation():
    gen = torch.Generator().manual_seed(0)
    ks = [draw_truncation(50, "gaussian", 8, 5, gen) for _ in range(400)]
    assert all(1 <= k <= 49 for k in ks) and 6.5 < sum(ks) / len(ks) < 9.5
    assert draw_truncation(50, "fixed", 1) == 1
    us = [draw_truncation(5, "uniform", generator=gen) for _ in range(200)]
    assert set(us) == {1, 2, 3, 4}
    with pytest.raises(ValueError, match="truncation mode"):
        draw_truncation(5, "bogus")


def test_grad_steps_out_of_range():
    bb, cond, uncond, noise, ts = _setup("sd15", steps=3, lora=False)
    with pytest.raises(ValueError, match="grad_steps must be in"):
        ddim_chain(bb, noise, cond, uncond, ts, guidance_scale=1.0, grad_steps=4)


def test_families_listed():
    assert set(FAMILIES) == {"sd15", "sd2v", "sdxl", "sd3", "flux"}
