"""PPD through the training loop (checkpoint + exact resume of the injection) and the CLI commands."""

import json

import pytest
import torch
from safetensors.torch import load_file

from diffalign.cli import main
from diffalign.config import load_config
from diffalign.training import train
from tests.personalization.test_users_data import _write


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    from rewards.testing import tiny_hf_clip, write_clip_tokenizer

    d = tmp_path_factory.mktemp("clip")
    tiny_hf_clip(seed=0).save_pretrained(str(d))  # projection 16: a 16-d user embedding
    write_clip_tokenizer(d)
    return d


@pytest.fixture
def cfg(tmp_path, clip_dir):
    pairs = _write(tmp_path, {"alice": 4, "bob": 4})
    path = tmp_path / "ppd.yaml"
    path.write_text(f"""
model: {{path: "tiny:sd15", lora_rank: 2}}
data: {{train: {pairs}, random_flip: false}}
objective: {{name: ppd, beta: 1000.0, encoder: "clip={clip_dir}", embed_dim: 16, k: 2, embedding_dropout: 0.25, tokens: 2}}
train: {{steps: 4, batch_size: 2, lr: 1.0e-2, lr_scheduler: constant, warmup_steps: 0, checkpoint_every: 2,
        sample_every: 0, sample_steps: 2, log_every: 1, progress: false}}
""")
    return path


def test_ppd_trains_in_the_loop_and_resumes_exactly(cfg, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    res = train(load_config(cfg, ["--train.output_dir", str(a)]))
    assert res["step"] == 4 and res["data"]
    inj = load_file(str(a / "final" / "user_injection.safetensors"))
    assert any("to_v_user" in k and v.abs().max() > 0 for k, v in inj.items())  # the zero-init values moved
    lines = [json.loads(x) for x in (a / "metrics.jsonl").read_text().splitlines()]
    assert lines[0]["loss"] == pytest.approx(0.6931472, abs=1e-5)  # the policy starts as the reference
    train(load_config(cfg, ["--train.output_dir", str(b), "--train.steps", "2"]))
    train(load_config(cfg, ["--train.output_dir", str(b)]), resume="latest")
    inj_b = load_file(str(b / "final" / "user_injection.safetensors"))
    assert inj.keys() == inj_b.keys() and all(torch.equal(inj[k], inj_b[k]) for k in inj)


def test_ppd_config_errors(cfg, tmp_path):
    with pytest.raises(ValueError, match="embed_dim is 8, but the user encoder"):
        train(load_config(cfg, ["--train.output_dir", str(tmp_path / "x"), "--objective.embed_dim", "8"]))


def test_profile_create_cli(tmp_path, clip_dir, capsys):
    pairs = _write(tmp_path, {"alice": 4, "bob": 3})
    out = tmp_path / "alice.profile"
    args = ["profile", "create", "--pairs", str(pairs), "--user", "alice", "--out", str(out),
            "--encoder", f"clip={clip_dir}", "--resolution", "32"]
    assert main(args) == 0
    assert "4 pairs, 16-d embedding" in capsys.readouterr().out
    assert main(args) == 2 and "exists" in capsys.readouterr().err
    bob = ["profile", "create", "--pairs", str(pairs), "--user", "bob", "--out", str(tmp_path / "bob.profile"),
           "--encoder", f"clip={clip_dir}", "--resolution", "32"]
    assert main(bob) == 2 and "'bob' has 3 decided pairs, at least 4" in capsys.readouterr().err


def test_sample_with_profile_cli(tmp_path, capsys):
    from diffalign.backbones import load_backbone
    from diffalign.backbones.tiny import save_tiny
    from diffalign.personalization.inject import injection_parameters, install_injection, save_injection
    from diffalign.personalization.profiles import Profile

    model = save_tiny("sd15", tmp_path / "sd15")
    bb = load_backbone(model)
    install_injection(bb, embed_dim=4, tokens=2)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in injection_parameters(bb):
            p.add_(torch.randn(p.shape, generator=g) * 0.5)
    inj = save_injection(bb, tmp_path / "user_injection.safetensors")
    a = Profile(torch.tensor([1.0, 0, 0, 0]), user_id="a", encoder="clip=x").save(tmp_path / "a.profile")
    b = Profile(torch.tensor([0, 1.0, 0, 0]), user_id="b", encoder="clip=x").save(tmp_path / "b.profile")
    base = ["sample", "--model", str(model), "--prompts", "a red circle", "--steps", "2", "--size", "32",
            "--device", "cpu", "--guidance-scale", "2", "--no-progress"]
    assert main([*base, "--out", str(tmp_path / "plain")]) == 0
    assert main([*base, "--out", str(tmp_path / "mix"), "--profile", f"{a}:0.7,{b}:0.3", "--injection", str(inj)]) == 0
    import numpy as np
    from PIL import Image

    def img(d):
        return np.asarray(Image.open(sorted((tmp_path / d).glob("0*.png"))[0]), dtype=np.float32)

    assert np.abs(img("plain") - img("mix")).max() > 0
    # the default CFG negative is the zero embedding; --profile-negative same puts the profile in both branches
    assert main([*base, "--out", str(tmp_path / "same"), "--profile", f"{a}:0.7,{b}:0.3", "--injection", str(inj),
                 "--profile-negative", "same"]) == 0
    assert np.abs(img("same") - img("mix")).max() > 0 and np.abs(img("same") - img("plain")).max() > 0
    capsys.readouterr()
    assert main([*base, "--out", str(tmp_path / "bad"), "--profile", f"{a}:0.7,{b}:x", "--injection", str(inj)]) == 2
    assert "weight 'x' is not a number" in capsys.readouterr().err
    assert main([*base, "--out", str(tmp_path / "bad2"), "--profile", str(a)]) == 2
    assert "--injection" in capsys.readouterr().err
