"""`diffalign sample` and `diffalign.sample`: files written, settings, seeds, errors, cheap import."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import diffalign
from diffalign.backbones.lora import save_lora
from diffalign.backbones.tiny import build_tiny_pipeline, save_tiny
from diffalign.cli import main
from rewards import from_spec as parse_reward

from .conftest import tiny


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("sample_cli")
    save_tiny("sd15", d / "sd15")
    save_lora(tiny("sd15", lora=True), d / "lora")
    (d / "prompts.txt").write_text("a red circle\n\na blue square at the top\na green triangle\n")
    return d


def _run(*argv):
    return main(["sample", "--steps", "3", "--guidance-scale", "3", "--size", "32", "--batch-size", "2",
                 "--no-progress", *argv])


def _pixels(path):
    return np.asarray(Image.open(path))


def test_cli_writes_one_png_per_image_a_grid_and_the_settings(model_dir, tmp_path):
    out = tmp_path / "plain"
    assert _run("--model", str(model_dir / "sd15"), "--prompts", str(model_dir / "prompts.txt"), "--out", str(out),
                "--scheduler", "ddim", "--seed", "7") == 0
    assert sorted(p.name for p in out.iterdir()) == ["00000.png", "00001.png", "00002.png", "grid.png", "settings.json"]
    s = json.loads((out / "settings.json").read_text())
    assert s["seed"] == 7 and s["scheduler"] == "DDIMScheduler" and s["guidance"] == "cfg" and s["steps"] == 3
    assert s["guidance_scale"] == 3.0 and s["size"] == [32, 32] and s["rlg"] is None
    assert {"diffalign", "torch", "diffusers", "peft"} <= set(s["versions"])
    assert [r["seed"] for r in s["images"]] == [7, 8, 9]
    assert [r["prompt"] for r in s["images"]] == ["a red circle", "a blue square at the top", "a green triangle"]
    assert _pixels(out / "00000.png").shape == (32, 32, 3)
    assert _pixels(out / "grid.png").shape[0] > 32


def test_cli_rlg_endpoints_reproduce_base_and_tuned_pngs(model_dir, tmp_path):
    common = ["--model", str(model_dir / "sd15"), "--prompts", "a red circle"]
    lora = ["--lora", str(model_dir / "lora")]
    assert _run(*common, "--out", str(tmp_path / "base")) == 0
    assert _run(*common, *lora, "--out", str(tmp_path / "tuned")) == 0
    assert _run(*common, *lora, "--out", str(tmp_path / "w0"), "--guidance", "rlg", "--rlg-scale", "0") == 0
    assert _run(*common, *lora, "--out", str(tmp_path / "w1a"), "--guidance", "rlg", "--rlg-scale", "1",
                "--rlg-mode", "approx") == 0
    assert _run(*common, *lora, "--out", str(tmp_path / "w2"), "--guidance", "rlg", "--rlg-scale", "2",
                "--zero-init-step", "1", "--rlg-sequential") == 0
    px = {k: _pixels(tmp_path / k / "00000.png") for k in ("base", "tuned", "w0", "w1a", "w2")}
    assert not np.array_equal(px["base"], px["tuned"])
    assert np.array_equal(px["w0"], px["base"]) and np.array_equal(px["w1a"], px["tuned"])
    assert not np.array_equal(px["w2"], px["tuned"])
    s = json.loads((tmp_path / "w2" / "settings.json").read_text())
    assert s["guidance"] == "rlg" and s["lora"] == str(model_dir / "lora")
    assert s["rlg"] == {"scale": 2.0, "mode": "exact", "zero_init_step": 1, "batched": False, "denoiser_forwards": 5}


def test_cli_reward_guidance_and_best_of(model_dir, tmp_path):
    common = ["--model", str(model_dir / "sd15"), "--prompts", str(model_dir / "prompts.txt")]
    assert _run(*common, "--out", str(tmp_path / "bo"), "--best-of", "2", "--reward", "toy_aesthetic:1,toy_color:0.5") == 0
    s = json.loads((tmp_path / "bo" / "settings.json").read_text())
    assert s["best_of"] == 2 and all(r["tries"] == 2 and isinstance(r["score"], float) for r in s["images"])
    assert _run(*common, "--out", str(tmp_path / "rg"), "--guidance", "reward", "--reward", "toy_aesthetic",
                "--reward-scale", "0.3", "--reward-schedule", "increasing") == 0
    s = json.loads((tmp_path / "rg" / "settings.json").read_text())
    assert s["reward_guidance"] == {"reward": "toy_aesthetic", "scale": 0.3, "schedule": "increasing", "normalize": False}


@pytest.mark.parametrize("argv,message", [
    (["--guidance", "rlg"], "--guidance rlg needs --lora"),
    (["--guidance", "reward"], "--guidance reward needs --reward"),
    (["--best-of", "3"], "need --reward"),
    (["--guidance", "reward", "--reward", "toy_shape"], "not differentiable"),
    (["--scheduler", "flow_euler"], "does not fit this sd model"),
])
def test_cli_errors_name_the_problem(model_dir, tmp_path, capsys, argv, message):
    assert _run("--model", str(model_dir / "sd15"), "--prompts", "a red circle", "--out", str(tmp_path / "x"), *argv) == 2
    assert message in capsys.readouterr().err


def test_image_i_is_the_stock_pipeline_at_seed_plus_i():
    bb = tiny("sd15")
    prompts = ["a red circle", "a blue square"]
    ours = diffalign.sample(bb, prompts, steps=3, guidance_scale=3.0, seed=20, size=32, batch_size=2).images
    pipe = build_tiny_pipeline("sd15")
    for i, p in enumerate(prompts):
        ref = pipe(p, num_inference_steps=3, guidance_scale=3.0, height=32, width=32, output_type="pt",
                   generator=torch.Generator("cpu").manual_seed(20 + i)).images
        torch.testing.assert_close(ours[i : i + 1], ref.float(), atol=1e-5, rtol=0)
    one_by_one = diffalign.sample(bb, prompts, steps=3, guidance_scale=3.0, seed=20, size=32, batch_size=1).images
    torch.testing.assert_close(one_by_one, ours, atol=1e-5, rtol=0)  # independent of the batch size


def test_import_is_cheap_and_sample_is_exported():
    code = ("import sys, diffalign; assert 'torch' not in sys.modules, 'import diffalign pulled in torch'; "
            "print(diffalign.sample.__module__, diffalign.Samples.__name__)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.split() == ["diffalign.api", "Samples"]


def test_reward_specs_name_path_and_ensembles():
    assert type(parse_reward("toy_aesthetic")).__name__ == "ToyAestheticReward"
    ens = parse_reward("toy_aesthetic:1,toy_color:0.5")
    assert ens.weights == {"toy_aesthetic": 1.0, "toy_color": 0.5}
    with pytest.raises(ValueError, match="got path='/models/x'"):  # NAME=PATH reaches the loader
        parse_reward("toy_color=/models/x:0.5")
