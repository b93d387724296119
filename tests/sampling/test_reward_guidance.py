"""Reward-gradient guidance: a zero reward changes nothing; a real reward moves images its way."""

import pytest
import torch

import diffalign
import rewards
from diffalign.sampling.guidance import RewardGuidance, schedule_weight, x0_shift_as_output

from .conftest import PROMPTS, Brightness, ZeroReward, tiny

KW = dict(steps=3, guidance_scale=3.0, seed=1, size=32, batch_size=2)


@pytest.mark.parametrize("family", ["sd15", "sd2v", "sd3", "flux"])
def test_zero_reward_equals_no_guidance(family):
    bb = tiny(family)
    plain = diffalign.sample(bb, PROMPTS, **KW).images
    guided = diffalign.sample(bb, PROMPTS, guidance="reward", reward=ZeroReward(), reward_scale=5.0, **KW).images
    assert torch.equal(guided, plain)
    normalized = diffalign.sample(bb, PROMPTS, guidance="reward", reward=ZeroReward(), reward_scale=5.0,
                                  reward_normalize=True, **KW).images
    assert torch.equal(normalized, plain)


@pytest.mark.parametrize("family", ["sd15", "sd2v", "sd3"])
def test_reward_gradient_moves_images_up_the_reward(family):
    bb = tiny(family)
    plain = diffalign.sample(bb, PROMPTS, **KW).images.mean()
    kw = dict(guidance="reward", reward_scale=1.0, reward_normalize=True, **KW)
    brighter = diffalign.sample(bb, PROMPTS, reward=Brightness(1.0), **kw).images.mean()
    darker = diffalign.sample(bb, PROMPTS, reward=Brightness(-1.0), **kw).images.mean()
    assert brighter > plain + 0.005  # a random tiny VAE: small moves, but of the right sign
    assert darker < plain - 0.005


def test_reward_guidance_on_top_of_rlg_and_with_an_ensemble():
    bb = tiny("sd15", lora=True)
    rlg = diffalign.sample(bb, PROMPTS, guidance="rlg", rlg_scale=1.5, **KW)
    ens = rewards.Ensemble({"b": Brightness(), "z": ZeroReward()}, {"b": 1.0, "z": 0.5})
    both = diffalign.sample(bb, PROMPTS, guidance="rlg+reward", rlg_scale=1.5, reward=ens, reward_scale=0.5,
                            reward_normalize=True, **KW)
    assert both.images.mean() > rlg.images.mean() + 0.01
    assert both.settings["rlg"]["scale"] == 1.5 and both.settings["reward_guidance"]["scale"] == 0.5
    zero = diffalign.sample(bb, PROMPTS, guidance="rlg+reward", rlg_scale=1.5, reward=ZeroReward(), **KW)
    assert torch.equal(zero.images, rlg.images)


def test_x0_shift_maps_to_the_output_of_every_parametrisation():
    g = torch.Generator().manual_seed(0)
    for family in ("sd15", "sd2v", "sd3"):
        bb = tiny(family)
        x, out, dx0 = (torch.randn(bb.latent_shape(2), generator=g) for _ in range(3))
        for t in (torch.tensor(900), torch.tensor(250)):
            moved = bb.to_x0(out + x0_shift_as_output(bb, t, dx0), x, t)
            torch.testing.assert_close(moved, bb.to_x0(out, x, t) + dx0, atol=1e-4, rtol=1e-4)


def test_schedules_and_errors():
    assert schedule_weight("constant", 0.3) == 1.0
    assert schedule_weight("increasing", 0.3) == pytest.approx(0.7)
    assert schedule_weight("decreasing", 0.3) == pytest.approx(0.3)
    assert schedule_weight(lambda s: s * s, 0.5) == 0.25
    with pytest.raises(ValueError, match="reward schedule"):
        schedule_weight("cosine", 0.5)
    with pytest.raises(ValueError, match="not differentiable"):
        RewardGuidance(rewards.load("toy_shape"), PROMPTS, 1.0)
    with pytest.raises(ValueError, match="needs a differentiable reward"):
        diffalign.sample(tiny("sd15"), PROMPTS, guidance="reward", **KW)


def test_increasing_schedule_steers_less_than_constant():
    bb = tiny("sd15")
    plain = diffalign.sample(bb, PROMPTS, **KW).images
    kw = dict(guidance="reward", reward=Brightness(), reward_scale=0.5, reward_normalize=True, **KW)
    const = diffalign.sample(bb, PROMPTS, reward_schedule="constant", **kw).images
    late = diffalign.sample(bb, PROMPTS, reward_schedule="increasing", **kw).images
    assert (const - plain).abs().mean() > (late - plain).abs().mean() > 0
