"""Decoupled cross-attention: exact base at scale 0 / without a user, a real effect otherwise, save/load."""

import pytest
import torch

from diffalign.backbones import load_backbone
from diffalign.backbones.tiny import build_tiny_pipeline
from diffalign.personalization.inject import (
    InjectionError,
    injection_parameters,
    install_injection,
    load_injection,
    personalized,
    remove_injection,
    save_injection,
    set_scale,
    user_processors,
    with_user,
)

FAMILIES = ["sd15", "sd2v", "sdxl", "sd3", "flux"]
D = 12


def _backbone(family):
    bb = load_backbone(build_tiny_pipeline(family))
    bb.resolution = 32
    return bb


def _inputs(bb, n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(bb.latent_shape(n), generator=g)
    t = bb.sample_timesteps(n, generator=g)
    cond = bb.encode_prompts(["a red circle", "a blue square"][:n])
    e = torch.randn(n, D, generator=g)
    return x, t, cond, e


def _perturb(bb, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in injection_parameters(bb):
            p.add_(torch.randn(p.shape, generator=g) * 0.3)


@pytest.mark.parametrize("family", FAMILIES)
def test_scale_zero_is_the_unconditioned_model_exactly(family):
    bb = _backbone(family)
    x, t, cond, e = _inputs(bb)
    with torch.no_grad():
        base = bb.predict(x, t, cond)
        cfg = install_injection(bb, embed_dim=D, tokens=3)
        assert cfg.layers and len(user_processors(bb.denoiser)) == len(cfg.layers)
        # freshly installed (zero values): the user branch adds exactly nothing
        assert torch.equal(bb.predict(x, t, with_user(cond, e)), base)
        _perturb(bb)
        personal = bb.predict(x, t, with_user(cond, e))
        assert not torch.allclose(personal, base, atol=1e-5)  # the branch does act
        assert torch.equal(bb.predict(x, t, cond), base)  # no user embedding: the base
        set_scale(bb, 0.0)
        assert torch.equal(bb.predict(x, t, with_user(cond, e)), base)  # scale 0: the base, bit for bit
        set_scale(bb, 1.0)
        assert torch.equal(bb.predict(x, t, with_user(cond, e)), personal)
        # each row is conditioned on its own user
        mixed = bb.predict(x, t, with_user(cond, torch.stack([e[0], e[0]])))
        assert torch.equal(mixed[0], personal[0]) or torch.allclose(mixed[0], personal[0], atol=1e-6)
        assert not torch.allclose(mixed[1], personal[1], atol=1e-5)
        remove_injection(bb)
        assert torch.equal(bb.predict(x, t, cond), base)


@pytest.mark.parametrize("family", ["sd15", "sd3", "flux"])
def test_only_the_new_projections_train(family):
    bb = _backbone(family)
    bb.denoiser.requires_grad_(False)
    install_injection(bb, embed_dim=D)
    names = [n for n, p in bb.denoiser.named_parameters() if p.requires_grad]
    assert names and all("user_projection" in n or "_user" in n for n in names)
    assert {id(p) for p in injection_parameters(bb)} == {id(p) for p in bb.denoiser.parameters() if p.requires_grad}
    x, t, cond, e = _inputs(bb)
    bb.predict(x, t, with_user(cond, e)).pow(2).mean().backward()
    grads = [p.grad for p in injection_parameters(bb)]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("family", FAMILIES)
def test_save_load_roundtrip(family, tmp_path):
    bb = _backbone(family)
    x, t, cond, e = _inputs(bb)
    install_injection(bb, embed_dim=D, tokens=2)
    _perturb(bb)
    with torch.no_grad():
        want = bb.predict(x, t, with_user(cond, e))
    path = save_injection(bb, tmp_path / "user.safetensors")
    assert path.stat().st_size < 2_000_000
    with pytest.raises(FileExistsError):
        save_injection(bb, path)
    fresh = _backbone(family)
    load_injection(fresh, path)
    with torch.no_grad():
        assert torch.equal(fresh.predict(x, t, with_user(cond, e)), want)


def test_load_into_another_family_fails(tmp_path):
    bb = _backbone("sd15")
    install_injection(bb, embed_dim=D)
    path = save_injection(bb, tmp_path / "u.safetensors")
    with pytest.raises(InjectionError, match="sd family"):
        load_injection(_backbone("sd3"), path)
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(InjectionError, match="junk"):
        load_injection(_backbone("sd15"), tmp_path / "junk.safetensors")


@pytest.mark.parametrize("family", ["sd15", "sdxl", "flux"])
def test_personalized_sampling_uses_the_profile_in_both_branches(family):
    from diffalign.sampling.solvers import generate

    bb = _backbone(family)
    install_injection(bb, embed_dim=D)
    _perturb(bb)
    e = torch.randn(D)
    with torch.no_grad():
        plain = generate(bb, ["a red circle"], steps=2, guidance_scale=3.0, seed=0)
        with personalized(bb, e):
            mine = generate(bb, ["a red circle"], steps=2, guidance_scale=3.0, seed=0)
        again = generate(bb, ["a red circle"], steps=2, guidance_scale=3.0, seed=0)
        set_scale(bb, 0.0)
        with personalized(bb, e):
            zero = generate(bb, ["a red circle"], steps=2, guidance_scale=3.0, seed=0)
    assert not torch.allclose(mine, plain, atol=1e-5)
    assert torch.equal(again, plain)  # the context restored the backbone
    assert torch.equal(zero, plain)


def test_flux_single_stream_blocks_get_the_user_branch():
    """FLUX's single-stream blocks (text and image tokens in one stream, no output map) carry the user branch
    too: scale 0 is the unconditioned model exactly, and the single block alone changes the output."""
    bb = _backbone("flux")
    x, t, cond, e = _inputs(bb)
    with torch.no_grad():
        base = bb.predict(x, t, cond)
        cfg = install_injection(bb, embed_dim=D, tokens=2)
        single = [n for n in cfg.layers if n.startswith("single_transformer_blocks.")]
        double = [n for n in cfg.layers if n.startswith("transformer_blocks.")]
        assert single and double and len(single) + len(double) == len(cfg.layers)
        procs = user_processors(bb.denoiser)
        assert {procs[n + ".processor"].kind for n in single} == {"flux_single"}
        _perturb(bb)
        set_scale(bb, 0.0)
        assert torch.equal(bb.predict(x, t, with_user(cond, e)), base)
        set_scale(bb, 1.0)
        for n in double:  # only the single-stream branch acts
            procs[n + ".processor"].scale = 0.0
        only_single = bb.predict(x, t, with_user(cond, e))
        assert not torch.allclose(only_single, base, atol=1e-5)
        for n in single:
            procs[n + ".processor"].scale = 0.0
        assert torch.equal(bb.predict(x, t, with_user(cond, e)), base)


def test_flux_injection_saved_without_single_blocks_still_loads(tmp_path):
    """A FLUX injection whose file lists only the double-stream blocks (saved before single-stream blocks had a
    branch) loads onto those layers alone; a file naming a layer the model lacks is refused."""
    import json

    from safetensors.torch import load_file, save_file

    bb = _backbone("flux")
    x, t, cond, e = _inputs(bb)
    cfg = install_injection(bb, embed_dim=D, tokens=2)
    _perturb(bb)
    path = save_injection(bb, tmp_path / "u.safetensors")
    state = {k: v for k, v in load_file(str(path)).items() if not k.startswith("single_transformer_blocks.")}
    double = [n for n in cfg.layers if n.startswith("transformer_blocks.")]
    meta = {"format": "diffalign.user_injection",
            "config": json.dumps({**cfg.__dict__, "layers": double})}
    save_file(state, str(tmp_path / "old.safetensors"), metadata=meta)
    for n in cfg.layers:
        if n not in double:
            user_processors(bb.denoiser)[n + ".processor"].scale = 0.0
    with torch.no_grad():
        want = bb.predict(x, t, with_user(cond, e))
    fresh = _backbone("flux")
    assert load_injection(fresh, tmp_path / "old.safetensors").layers == double
    with torch.no_grad():
        assert torch.equal(fresh.predict(x, t, with_user(cond, e)), want)
    meta["config"] = json.dumps({**cfg.__dict__, "layers": [*double, "transformer_blocks.9.attn"]})
    save_file(state, str(tmp_path / "bad.safetensors"), metadata=meta)
    with pytest.raises(InjectionError, match="other attention layers"):
        load_injection(_backbone("flux"), tmp_path / "bad.safetensors")
