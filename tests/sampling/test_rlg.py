"""RL guidance: the rule, its endpoints bit for bit, batching, the approximate mode, zero_init_step."""

import pytest
import torch

import diffalign
from diffalign.sampling import RLGuidance, lora_scaled, rlg_combine, sample_latents
from diffalign.sampling.guidance import lora_layers
from diffalign.sampling.solvers import resolve_scheduler

from .conftest import FAMILIES, PROMPTS, tiny

KW = dict(steps=3, guidance_scale=3.0, seed=5, size=32, batch_size=2)
# a non-default scheduler per family ("any scheduler"); euler_a is stochastic (step noise from the seed)
SCHEDULERS = {"sd15": "dpm++", "sd2v": "unipc", "sdxl": "euler_a", "sd3": None, "flux": None}


def test_rule_is_exact_at_the_endpoints_and_affine_between():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 8, generator=g), torch.randn(4, 8, generator=g)
    assert torch.equal(rlg_combine(a, b, 0.0), a)
    assert torch.equal(rlg_combine(a, b, 1.0), b)
    torch.testing.assert_close(rlg_combine(a, b, 0.25), 0.75 * a + 0.25 * b)
    torch.testing.assert_close(rlg_combine(a, b, 2.0), b + (b - a))  # extrapolation past the tuned model


@pytest.mark.parametrize("family", FAMILIES)
def test_w0_is_base_and_w1_is_tuned_bit_for_bit(family):
    sched = SCHEDULERS[family]
    base = diffalign.sample(tiny(family), PROMPTS, scheduler=sched, **KW).images
    bb = tiny(family, lora=True)
    tuned = diffalign.sample(bb, PROMPTS, scheduler=sched, **KW).images
    assert (base - tuned).abs().max() > 1e-2  # the LoRA changes the images
    for mode in ("exact", "approx"):
        w0 = diffalign.sample(bb, PROMPTS, scheduler=sched, guidance="rlg", rlg_scale=0.0, rlg_mode=mode, **KW)
        w1 = diffalign.sample(bb, PROMPTS, scheduler=sched, guidance="rlg", rlg_scale=1.0, rlg_mode=mode, **KW)
        assert torch.equal(w0.images, base), mode
        assert torch.equal(w1.images, tuned), mode
    mid = diffalign.sample(bb, PROMPTS, scheduler=sched, guidance="rlg", rlg_scale=0.5, **KW).images
    assert (mid - base).abs().max() > 1e-3 and (mid - tuned).abs().max() > 1e-3


@pytest.mark.parametrize("family,scheduler", [("sd15", "ddim"), ("sd2v", "ddim"), ("sd3", None)])
def test_one_step_latents_mix_like_the_outputs(family, scheduler):
    """One DDIM / Euler step is affine in the model output, so the latents mix with the RLG weights:
    checks the rule end to end for epsilon, v and flow models, inside and beyond [0, 1]."""
    bb = tiny(family, lora=True)
    cond, uncond = bb.encode_prompts(PROMPTS), bb.negative_cond("", 2)
    noise = torch.randn(bb.latent_shape(2), generator=torch.Generator().manual_seed(3))
    sched = resolve_scheduler(bb, scheduler)
    if scheduler == "ddim":
        sched = type(sched).from_config(sched.config, clip_sample=False)

    def run(w):
        return sample_latents(bb, cond, uncond, steps=1, guidance_scale=3.0, latents=noise, scheduler=sched,
                              model_output=RLGuidance(w))

    lat0, lat1 = run(0.0), run(1.0)
    assert (lat0 - lat1).abs().max() > 1e-3
    for w in (0.5, 2.0):
        torch.testing.assert_close(run(w), (1 - w) * lat0 + w * lat1, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["sd15", "flux"])
def test_base_and_tuned_run_in_one_forward_and_match_two(family):
    bb = tiny(family, lora=True)
    rows = []
    handle = bb.denoiser.register_forward_pre_hook(lambda m, a, kw: rows.append((a[0] if a else kw["hidden_states"]).shape[0]),
                                                   with_kwargs=True)
    try:
        batched = diffalign.sample(bb, PROMPTS, guidance="rlg", rlg_scale=1.5, **KW)
        calls_batched, rows[:] = list(rows), []
        seq = diffalign.sample(bb, PROMPTS, guidance="rlg", rlg_scale=1.5, rlg_batched=False, **KW)
        calls_seq, rows[:] = list(rows), []
        approx = diffalign.sample(bb, PROMPTS, guidance="rlg", rlg_scale=1.5, rlg_mode="approx", **KW)
        calls_approx = list(rows)
    finally:
        handle.remove()
    cfg_rows = 2 if family == "flux" else 4  # FLUX-dev: guidance is an embedding, one row per image
    assert calls_batched == [2 * cfg_rows] * 3  # [base uncond, base cond, tuned uncond, tuned cond] per step
    assert calls_seq == [cfg_rows] * 6
    assert calls_approx == [cfg_rows] * 3
    assert batched.settings["rlg"]["denoiser_forwards"] == 3 and seq.settings["rlg"]["denoiser_forwards"] == 6
    torch.testing.assert_close(batched.images, seq.images, atol=1e-5, rtol=0)
    assert (approx.images - batched.images).abs().max() > 1e-4  # approximate is not exact at w = 1.5


def test_zero_init_step_uses_the_tuned_model_first():
    bb = tiny("sd15", lora=True)
    tuned = diffalign.sample(bb, PROMPTS, **KW).images
    all_tuned = diffalign.sample(bb, PROMPTS, guidance="rlg", rlg_scale=2.0, zero_init_step=3, **KW).images
    assert torch.equal(all_tuned, tuned)
    first = diffalign.sample(bb, PROMPTS, guidance="rlg", rlg_scale=2.0, zero_init_step=1, **KW).images
    plain = diffalign.sample(bb, PROMPTS, guidance="rlg", rlg_scale=2.0, **KW).images
    assert (first - tuned).abs().max() > 1e-4 and (first - plain).abs().max() > 1e-4


def test_lora_scaled_scales_and_restores_even_on_error():
    bb = tiny("sd3", lora=True)
    layers = lora_layers(bb.denoiser)
    before = [dict(m.scaling) for m in layers]
    with lora_scaled(bb.denoiser, 0.5):
        assert all(m.scaling["default"] == 0.5 * b["default"] for m, b in zip(layers, before, strict=True))
    assert [dict(m.scaling) for m in layers] == before
    with pytest.raises(KeyError), lora_scaled(bb.denoiser, 3.0):
        raise KeyError("boom")
    assert [dict(m.scaling) for m in layers] == before
    with pytest.raises(RuntimeError, match="no"), lora_scaled(tiny("sd3").denoiser, 0.5):
        pass


def test_rlg_with_a_full_finetune_reference_copy():
    """Without LoRA, the base is the frozen copy kept by full fine-tuning."""
    bb = tiny("sd15")
    base = diffalign.sample(bb, PROMPTS, **KW).images
    bb.enable_full_finetune()
    with torch.no_grad():
        for p in bb.denoiser.parameters():
            p.mul_(1.05)
    tuned = diffalign.sample(bb, PROMPTS, **KW).images
    assert torch.equal(diffalign.sample(bb, PROMPTS, guidance="rlg", rlg_scale=0.0, **KW).images, base)
    assert torch.equal(diffalign.sample(bb, PROMPTS, guidance="rlg", rlg_scale=1.0, **KW).images, tuned)
    with pytest.raises(ValueError, match="approximate RLG scales a LoRA"):
        diffalign.sample(bb, PROMPTS, guidance="rlg", rlg_mode="approx", rlg_scale=0.5, **KW)


def test_rlg_without_a_tuned_model_names_the_problem():
    with pytest.raises(ValueError, match="needs a fine-tuned model.*--lora"):
        diffalign.sample(tiny("sd15"), PROMPTS, guidance="rlg", rlg_scale=1.5, **KW)
    with pytest.raises(ValueError, match="RLG mode"):
        RLGuidance(1.0, mode="fast")
