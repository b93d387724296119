"""Sampling steps with log-probabilities (diffalign/sampling/logprob.py) against direct computations:
torch.distributions.Normal, diffusers' DDIMScheduler (eta = 1) and flow_grpo's SDE formula."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Normal

from diffalign.sampling.logprob import (
    STEPS,
    cps_step,
    ddim_eta_step,
    flow_sde_step,
    level_grid,
    ode_step,
    rollout,
    transition_logprob,
)
from tests.foundation.conftest import FAMILIES, make_backbone  # noqa: F401  (fixture)


def _state(bb, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = bb.latent_shape(2)
    grid = level_grid(bb, 6)
    i = 2
    t, t_next = grid[i].expand(2), grid[i + 1].expand(2)
    x = torch.randn(shape, generator=g)
    out = torch.randn(shape, generator=g)
    z = torch.randn(shape, generator=g)
    return x, out, z, t, t_next


@pytest.mark.parametrize("family", ["sd15", "sd2v", "sd3"])
@pytest.mark.parametrize("sampler", ["ddim_eta", "flow_sde", "cps"])
def test_logprob_is_the_gaussian_density(make_backbone, family, sampler):  # noqa: F811
    bb = make_backbone(family)
    x, out, z, t, t_next = _state(bb)
    st = STEPS[sampler](bb, out, x, t, t_next, 0.7, noise=z)
    assert (st.std > 0).all()
    torch.testing.assert_close(st.x_next, st.mean + st.std.view(-1, 1, 1, 1) * z)
    direct = Normal(st.mean.double(), st.std.double().view(-1, 1, 1, 1)).log_prob(st.x_next.double()).flatten(1).mean(1)
    torch.testing.assert_close(st.logprob.double(), direct, rtol=1e-6, atol=1e-6)
    # scoring a given transition gives the same mean, std and log-probability
    again = STEPS[sampler](bb, out, x, t, t_next, 0.7, x_next=st.x_next)
    assert torch.equal(again.logprob, st.logprob) and torch.equal(again.mean, st.mean)


def test_ddim_eta_matches_diffusers_ddim_scheduler(make_backbone):  # noqa: F811
    from diffusers import DDIMScheduler

    bb = make_backbone("sd15")
    sched = DDIMScheduler.from_config(bb.pipe.scheduler.config)
    sched.set_timesteps(6)
    x, out, z, _, _ = _state(bb)
    t = sched.timesteps[2]
    t_next = sched.timesteps[3]
    ref = sched.step(out, t, x, eta=1.0, variance_noise=z).prev_sample
    st = ddim_eta_step(bb, out, x, t.expand(2), t_next.expand(2), 1.0, noise=z)
    torch.testing.assert_close(st.x_next, ref, rtol=1e-5, atol=1e-5)
    # and DDIM's std: eta sqrt((1 - abar') / (1 - abar) (1 - abar / abar'))
    ab, ab2 = bb.alphas_cumprod[t], bb.alphas_cumprod[t_next]
    std = math.sqrt((1 - ab2) / (1 - ab) * (1 - ab / ab2))
    assert st.std[0].item() == pytest.approx(std, rel=1e-5)


def test_flow_sde_matches_flow_grpo_formula(make_backbone):  # noqa: F811
    """flow_grpo sde_step_with_logprob: std_t = a sqrt(s / (1 - s)), dt = s' - s,
    mean = x (1 + std_t^2 dt / (2 s)) + v (1 + std_t^2 (1 - s) / (2 s)) dt, noise std = std_t sqrt(-dt)."""
    bb = make_backbone("sd3")
    x, v, z, t, t_next = _state(bb)
    a = 0.7
    st = flow_sde_step(bb, v, x, t, t_next, a, noise=z)
    s, s2 = t[0].item() / 1000, t_next[0].item() / 1000
    std_t = a * math.sqrt(s / (1 - s))
    dt = s2 - s
    mean = x * (1 + std_t**2 / (2 * s) * dt) + v * (1 + std_t**2 * (1 - s) / (2 * s)) * dt
    torch.testing.assert_close(st.mean, mean, rtol=1e-5, atol=1e-5)
    assert st.std[0].item() == pytest.approx(std_t * math.sqrt(-dt), rel=1e-5)
    # the first step (s = 1) divides by 1 - sigmas[1], as flow_grpo
    grid = level_grid(bb, 6)
    first = flow_sde_step(bb, v, x, grid[0].expand(2), grid[1].expand(2), a, noise=z)
    s1 = grid[1].item() / 1000
    assert first.std[0].item() == pytest.approx(a * math.sqrt(1 / (1 - s1)) * math.sqrt(1 - s1), rel=1e-5)


def test_cps_matches_its_definition(make_backbone):  # noqa: F811
    """CPS (flow_grpo sde_type='cps'): x0 = x - s v, x1 = x + (1 - s) v, std = s' sin(a pi / 2),
    mean = (1 - s') x0 + sqrt(s'^2 - std^2) x1."""
    bb = make_backbone("sd3")
    x, v, z, t, t_next = _state(bb)
    s, s2 = t[0].item() / 1000, t_next[0].item() / 1000
    st = cps_step(bb, v, x, t, t_next, 0.8, noise=z)
    std = s2 * math.sin(0.8 * math.pi / 2)
    mean = (1 - s2) * (x - s * v) + math.sqrt(s2**2 - std**2) * (x + (1 - s) * v)
    torch.testing.assert_close(st.mean, mean, rtol=1e-5, atol=1e-5)
    assert st.std[0].item() == pytest.approx(std, rel=1e-6)


@pytest.mark.parametrize("family", ["sd15", "sd3"])
def test_ode_step_is_ddim(make_backbone, family):  # noqa: F811
    bb = make_backbone(family)
    x, out, _, t, t_next = _state(bb)
    st = ode_step(bb, out, x, t, t_next)
    torch.testing.assert_close(st.x_next, bb.ddim_step(out, x, t, t_next))
    assert (st.std == 0).all() and (st.logprob == 0).all()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("sampler", ["ddim_eta", "flow_sde", "cps"])
def test_rollout_logprobs_recompute_exactly(make_backbone, family, sampler):  # noqa: F811
    """The rollout's stored log-probability equals the recomputation under the same weights (with
    grad, CFG on): the on-policy importance ratio is exactly 1."""
    bb = make_backbone(family, lora=True)
    prompts = ["a red circle", "a blue square"]
    cond, uncond = bb.encode_prompts(prompts), bb.negative_cond("", 2)
    steps = 3
    noise = torch.randn(steps + 1, *bb.latent_shape(2), generator=torch.Generator().manual_seed(1))
    traj = rollout(bb, cond, uncond, noise, steps=steps, sampler=sampler, eta=0.8, guidance_scale=3.0)
    assert traj["xs"].shape == (steps + 1, *bb.latent_shape(2)) and traj["logprob"].shape == (steps, 2)
    assert torch.equal(traj["xs"][0], noise[0])
    for j in range(steps):
        if (traj["std"][j] == 0).all():
            continue
        st = transition_logprob(bb, traj["xs"][j], traj["levels"][j], traj["levels"][j + 1], traj["xs"][j + 1],
                                cond, uncond, sampler=sampler, eta=0.8, guidance_scale=3.0)
        assert st.logprob.requires_grad
        assert torch.equal(st.logprob.detach(), traj["logprob"][j])
