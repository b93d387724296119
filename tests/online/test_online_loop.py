"""Online objectives through the one training loop: prompts in, reward out, gold rewards beside, exact resume."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diffalign.config import ConfigError, load_config
from diffalign.training import train

ROOT = Path(__file__).resolve().parents[2]


def _cfg(tmp_path, out, objective="refl", steps=4, options="steps: 3, k_lo: 1, k_hi: 2, guidance_scale: 2.0",
         reward="train: toy_aesthetic, gold: [toy_aesthetic, toy_color], gold_every: 2, gold_prompts: 'toy:heldout:4'"):
    f = tmp_path / f"{objective}.yaml"
    f.write_text(f"""
model: {{path: "tiny:sd15", lora_rank: 4}}
data: {{train: "toy:train:32"}}
objective: {{name: {objective}, {options}}}
reward: {{{reward}}}
train: {{steps: {steps}, batch_size: 2, lr: 1.0e-3, lr_scheduler: constant, checkpoint_every: 2, sample_every: 0,
        sample_steps: 2, sample_guidance: 2.0, log_every: 1, progress: false, output_dir: {out}}}
""")
    return load_config(f)


def _lora(res):
    return load_file(str(Path(res["weights"]) / "pytorch_lora_weights.safetensors"))


def test_refl_trains_through_the_loop_with_gold_rewards(tmp_path):
    out = tmp_path / "run"
    res = train(_cfg(tmp_path, out))
    assert res["status"] == "completed"
    lines = [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 4 and all("reward" in m and "kl" in m for m in lines)
    assert any(v.abs().sum() > 0 for k, v in _lora(res).items() if "up" in k)  # B moved off zero
    gold = [json.loads(s) for s in (out / "gold.jsonl").read_text().splitlines()]
    assert [g["step"] for g in gold] == [0, 2, 4]
    assert {"train", "gold/toy_aesthetic", "gold/toy_color"} <= set(gold[0])
    assert (out / "gold.png").is_file()


def test_online_resume_is_exact(tmp_path):
    """4 steps straight == 2 steps, stop, resume to 4, bit for bit (DRaFT-LV: random noise and re-noising)."""
    opts = "steps: 3, lv_copies: 2, guidance_scale: 2.0"
    straight = train(_cfg(tmp_path, tmp_path / "a", "draft", options=opts))
    train(_cfg(tmp_path, tmp_path / "b", "draft", steps=2, options=opts))
    resumed = train(_cfg(tmp_path, tmp_path / "b", "draft", options=opts), resume="latest")
    a, b = _lora(straight), _lora(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    gold = [json.loads(s)["step"] for s in (tmp_path / "b" / "gold.jsonl").read_text().splitlines()]
    assert gold == [0, 2, 4]


def test_early_stop_on_gold_drop(tmp_path, monkeypatch):
    from diffalign.training import gold

    calls = []

    def fake_stop(self):
        calls.append(self.history[-1]["step"])
        return "early stop: gold reward toy_color fell" if self.history[-1]["step"] >= 2 else None

    monkeypatch.setattr(gold.GoldMonitor, "should_stop", fake_stop)
    cfg = _cfg(tmp_path, tmp_path / "c", reward="train: toy_aesthetic, gold: [toy_color], gold_every: 2, "
               "gold_prompts: 'toy:heldout:4', early_stop_on_gold_drop: 0.01")
    res = train(cfg)
    assert res["status"] == "early_stopped" and res["step"] == 2 and "toy_color" in res["early_stop"]
    assert Path(res["weights"]).is_dir()


@pytest.mark.parametrize("reward,msg", [
    ("train: toy_aesthetic, gold_every: 2", "reward.gold_prompts"),
    ("train: toy_aesthetic, early_stop_on_gold_drop: 0.1", "reward.early_stop_on_gold_drop"),
    ("train: toy_aesthetic, gold_every: -1", "reward.gold_every"),
    ("gold: [toy_color]", "reward.train"),
])
def test_reward_section_errors_name_the_key(tmp_path, reward, msg):
    with pytest.raises(ConfigError, match=msg):
        _cfg(tmp_path, tmp_path / "x", reward=reward)


def test_a_non_differentiable_training_reward_is_refused(tmp_path):
    with pytest.raises(ValueError, match="not differentiable"):
        train(_cfg(tmp_path, tmp_path / "y", reward="train: toy_shape"))


def test_a_bad_prompt_file_names_the_line(tmp_path):
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"prompt": "a red circle"}\n{"text": 1}\n')
    cfg = _cfg(tmp_path, tmp_path / "z")
    cfg.data.train = str(bad)
    with pytest.raises(ValueError, match="p.jsonl, line 2"):
        train(cfg)


@pytest.mark.parametrize("recipe", ["sd15_refl", "sd15_draft", "sd15_alignprop", "sdxl_refl", "sd3_draft", "sd3_refl",
                                    "flux_draft", "tiny_refl", "tiny_draft", "tiny_alignprop"])
def test_recipes_validate(recipe):
    cfg = load_config(ROOT / "configs" / f"{recipe}.yaml")
    assert cfg.objective.name == recipe.split("_")[1] and cfg.reward.train


def test_tiny_recipe_runs(tmp_path):
    cfg = load_config(ROOT / "configs" / "tiny_draft.yaml", ["--train.steps", "2", "--train.output_dir",
                                                             str(tmp_path / "t"), "--reward.gold_every", "2"])
    assert train(cfg)["status"] == "completed"
