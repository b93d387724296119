"""Fast end-to-end check of the toy-world base-model build: a few steps of every stage into tmp_path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from diffalign.toyworld.pretrain import TOY_WORDS, PretrainConfig, build_toyworld

TINY = dict(
    n_images=128, vae_steps=4, vae_batch=8, sd_steps=4, sd_batch=8, flow_steps=4, flow_batch=8,
    eval_prompts=4, eval_steps=2, warmup=2, progress=False,
)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("toyworld")
    report = build_toyworld(out, seed=0, minutes_budget=5.0, config=PretrainConfig(**TINY))
    return out, report


def test_report_keys(built: tuple[Path, dict]) -> None:
    out, report = built
    on_disk = json.loads((out / "base_report.json").read_text())
    assert on_disk["seed"] == 0
    for name in ("sd", "sd3"):
        r = on_disk[name]
        for split in ("train", "heldout"):
            assert set(r[split]) >= {"color", "shape", "position", "oracle"}
            assert all(0.0 <= v <= 1.0 for v in r[split].values())
        assert r["sampling"]["steps"] == 2 and r["sampling"]["guidance_scale"] > 1
        assert r["steps"] == 4 and r["encode_check_max_abs"] < 1e-4
        assert r["folder_mb"] < 25
    assert {"vae", "sd_train", "sd3_train", "eval"} <= set(on_disk["timings_s"])
    assert on_disk["total_minutes"] > 0 and "loadavg_start" in on_disk
    assert report["vae"]["latent_std"] > 0


@pytest.mark.parametrize("name,family,prediction", [("sd", "sd", "epsilon"), ("sd3", "sd3", "flow")])
def test_folders_load_and_generate(built: tuple[Path, dict], name: str, family: str, prediction: str) -> None:
    from diffalign.backbones import load_backbone
    from diffalign.sampling.solvers import generate

    out, report = built
    bb = load_backbone(out / name)
    assert bb.family == family and bb.prediction_type == prediction
    assert bb.resolution == 32 and bb.latent_shape(1) == (1, 4, 8, 8)
    imgs = generate(bb, ["a red circle", "a blue square left of a green triangle"], steps=2, guidance_scale=3.0, seed=0)
    assert imgs.shape == (2, 3, 32, 32) and torch.isfinite(imgs).all()
    assert 0.0 <= float(imgs.min()) and float(imgs.max()) <= 1.0
    vae = bb.vae.config
    assert abs(vae.scaling_factor - 1.0) > 0  # registered from the latent statistics
    if name == "sd3":
        assert vae.shift_factor == pytest.approx(report["vae"]["latent_mean"])
        assert bb.max_sequence_length == 16 and bb.pipe.text_encoder_3 is not None
    else:
        assert vae.get("shift_factor") is None
        sched = bb.pipe.scheduler.config
        assert (sched.beta_schedule, sched.set_alpha_to_one, sched.steps_offset, sched.clip_sample) == (
            "scaled_linear", False, 1, False)


def test_stock_pipelines_load(built: tuple[Path, dict]) -> None:
    import diffusers

    out, _ = built
    sd = diffusers.StableDiffusionPipeline.from_pretrained(
        str(out / "sd"), safety_checker=None, requires_safety_checker=False, local_files_only=True
    )
    assert sd.text_encoder.config.vocab_size == 49408 and sd.tokenizer.model_max_length == 77
    sd3 = diffusers.StableDiffusion3Pipeline.from_pretrained(str(out / "sd3"), local_files_only=True)
    ids = sd3.tokenizer_3("a small red circle left of a large blue square").input_ids
    assert 2 not in ids  # every toy word is in the T5 vocabulary (2 = <unk>)
    assert set(TOY_WORDS) >= {"red", "circle", "left", "above", "small"}


def test_deterministic_in_seed(built: tuple[Path, dict], tmp_path: Path) -> None:
    from safetensors.torch import load_file

    out, report = built
    cfg = dict(TINY, eval_prompts=2)
    again = build_toyworld(tmp_path, seed=0, minutes_budget=5.0, config=PretrainConfig(**cfg))
    assert again["sd"]["final_loss"] == report["sd"]["final_loss"]
    assert again["sd3"]["final_loss"] == report["sd3"]["final_loss"]
    for sub in ("sd/unet/diffusion_pytorch_model.safetensors", "sd3/transformer/diffusion_pytorch_model.safetensors",
                "sd3/text_encoder_3/model.safetensors", "sd/vae/diffusion_pytorch_model.safetensors"):
        a, b = load_file(str(out / sub)), load_file(str(tmp_path / sub))
        assert all(torch.equal(a[k], b[k]) for k in a), sub


def test_rebuild_sd_with_the_toy_clip_text_tower(built: tuple[Path, dict], tmp_path: Path) -> None:
    """The position-aware SD build: the text encoder is the toy CLIP's text tower, frozen (bit for bit the
    CLIP's weights after training), with the CLIP's sub-vocabulary tokenizer; the VAE is the base's."""
    from diffalign.backbones import load_backbone
    from diffalign.toyworld.clip import load_toy_clip
    from diffalign.toyworld.pretrain import SEPARATION_PROBES, rebuild_sd

    base, _ = built
    cfg = PretrainConfig(**TINY, sd_text="toy_clip", clip_steps=2, clip_batch=8)
    report = rebuild_sd(tmp_path / "pos", base, config=cfg)
    bb = load_backbone(tmp_path / "pos" / "sd")
    clip, tok = load_toy_clip(tmp_path / "pos" / "toy_clip")
    te = bb.pipe.text_encoder.state_dict()
    for k, v in clip.text_model.state_dict().items():
        torch.testing.assert_close(te[k], v, atol=0, rtol=0)
    assert bb.pipe.tokenizer.get_vocab() == tok.get_vocab() and len(tok) < 2000
    assert bb.pipe.unet.config.cross_attention_dim == clip.config.text_config.hidden_size
    old_vae = load_backbone(base / "sd").vae.state_dict()
    for k, v in bb.vae.state_dict().items():
        torch.testing.assert_close(v, old_vae[k], atol=0, rtol=0)
    sep = report["sd"]["text_separation"]
    assert set(sep) == set(SEPARATION_PROBES) and all(-1.0 <= v <= 1.0 + 1e-6 for v in sep.values())
    assert report["sd"]["text_lr_scale"] == 0.0 and set(report["sd"]["heldout"]) >= {"position", "shape"}
    with pytest.raises(FileExistsError):
        rebuild_sd(tmp_path / "pos", base, config=cfg)
