"""The training loop end to end on a tiny model: outputs, exact resume, cache == on-the-fly."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from diffalign.config import load_config
from diffalign.training import train
from tests.helpers import write_pairs


@pytest.fixture
def pairs(tmp_path):
    path = write_pairs(tmp_path)
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(f"""
model: {{path: "tiny:sd15", lora_rank: 4}}
data: {{train: {path}, prompt_dropout: 0.5}}
train: {{steps: 4, batch_size: 2, lr: 1.0e-3, lr_scheduler: constant, warmup_steps: 1, checkpoint_every: 2,
        sample_every: 2, sample_steps: 2, log_every: 1, progress: false}}
""")
    return cfg


def _lora(run):
    return load_file(str(run / "final" / "lora" / "pytorch_lora_weights.safetensors"))


def test_run_writes_checkpoint_logs_grid_and_lora(pairs, tmp_path):
    out = tmp_path / "run"
    res = train(load_config(pairs, ["--train.output_dir", str(out)]))
    assert res["step"] == 4
    assert (out / "checkpoints" / "step_00000004" / "diffalign_checkpoint.json").is_file()
    assert (out / "checkpoints" / "step_00000002" / "state" / "optimizer.bin").is_file()
    assert list((out / "logs").rglob("events.out.tfevents*"))
    assert (out / "samples" / "step_00000002.png").is_file() and (out / "samples" / "final.png").is_file()
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3, 4]
    assert lines[0]["loss"] == pytest.approx(np.log(2), abs=1e-6)  # policy == reference at step 1
    assert any(v.abs().max() > 0 for k, v in _lora(out).items() if "lora.up" in k)  # it trained (B = "up")


def test_resume_restores_step_optimizer_scheduler_and_rng(pairs, tmp_path):
    straight, resumed = tmp_path / "a", tmp_path / "b"
    train(load_config(pairs, ["--train.output_dir", str(straight)]))
    train(load_config(pairs, ["--train.output_dir", str(resumed), "--train.steps", "2"]))
    res = train(load_config(pairs, ["--train.output_dir", str(resumed)]), resume="latest")
    assert res["step"] == 4
    a, b = _lora(straight), _lora(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    la = [json.loads(x) for x in (straight / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(x) for x in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lb] == [1, 2, 3, 4]
    assert [x["loss"] for x in la] == [x["loss"] for x in lb]  # the same noise, data and updates


def test_resume_latest_without_checkpoint_is_an_error(pairs, tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train(load_config(pairs, ["--train.output_dir", str(tmp_path / "empty")]), resume="latest")


def test_cached_latents_give_the_same_loss_as_encoding_on_the_fly(pairs, tmp_path):
    from diffalign.backbones import load_backbone
    from diffalign.backbones.lora import add_lora
    from diffalign.backbones.tiny import save_tiny
    from diffalign.data.cache import CachedPairs, build_cache, collate_cached
    from diffalign.data.pairs import PreferencePairs, collate_pairs
    from diffalign.objectives import DiffusionDPO

    model = save_tiny("sd15", tmp_path / "m")
    bb = load_backbone(model, resolution=32)
    add_lora(bb, rank=4)
    with torch.no_grad():
        for n, p in bb.denoiser.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.1)
    data = tmp_path / "pairs.jsonl"
    ds = PreferencePairs(data, resolution=32, random_flip=False)
    build_cache(ds, bb, tmp_path / "cache", batch_size=4, progress=False, dtype="float32")
    cached = collate_cached([CachedPairs(tmp_path / "cache", sample=False)[i] for i in range(4)])
    pix = collate_pairs([ds[i] for i in range(4)])
    fly = {
        "latents_w": bb.encode_images(pix["pixels_w"], sample=False),
        "latents_l": bb.encode_images(pix["pixels_l"], sample=False),
        "cond": bb.encode_prompts(pix["captions"]),
    }
    obj = DiffusionDPO()
    torch.manual_seed(0)
    loss_cache, _ = obj.loss({k: cached[k] for k in ("latents_w", "latents_l", "cond")}, bb)
    torch.manual_seed(0)
    loss_fly, _ = obj.loss(fly, bb)
    assert loss_cache.item() == pytest.approx(loss_fly.item(), abs=1e-6)
    assert abs(loss_fly.item() - np.log(2)) > 1e-4  # a non-trivial loss was compared


def test_damaged_latest_checkpoint_falls_back_to_the_previous_one(pairs, tmp_path, caplog):
    out = tmp_path / "run"
    train(load_config(pairs, ["--train.output_dir", str(out), "--train.steps", "2", "--train.checkpoint_every", "1",
                              "--train.sample_every", "0"]))
    latest = out / "checkpoints" / "step_00000002"
    for f in (latest / "state").glob("*"):
        f.write_bytes(b"damaged")
    with caplog.at_level("WARNING"):
        res = train(load_config(pairs, ["--train.output_dir", str(out), "--train.steps", "3",
                                        "--train.sample_every", "0"]), resume="latest")
    assert res["step"] == 3
    warning = " ".join(r.getMessage() for r in caplog.records)
    assert "step_00000002" in warning and "step_00000001" in warning
