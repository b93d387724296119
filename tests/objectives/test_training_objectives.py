"""Every new objective trains end to end through the one loop on a tiny model, with recipes for every family."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from diffalign.config import ConfigError, load_config
from diffalign.training import train
from tests.helpers import write_experts, write_pairs

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("objective", ["dpo", "inpo", "dro", "mapo"])
@pytest.mark.parametrize("family", ["sd15", "sdxl", "sd3", "tiny"])
def test_recipe_for_every_objective_and_family_validates(objective, family):
    cfg = load_config(ROOT / "configs" / f"{family}_{objective}.yaml")
    assert cfg.objective.name == objective


def test_an_option_of_another_objective_is_an_error_naming_the_key(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("model: {path: 'tiny:sd15'}\ndata: {train: x}\nobjective: {name: dro, beta: 10}\n")
    with pytest.raises(ConfigError, match=r"objective\.beta: unknown key") as e:
        load_config(f)
    assert str(f) in str(e.value)


@pytest.fixture
def data(tmp_path):
    """Pairs (a red square against noise) and expert demonstrations (red squares) for DRO."""
    write_pairs(tmp_path)
    write_experts(tmp_path)
    return tmp_path


def _cfg(data, objective, out, steps=4, extra=""):
    train_path = data / ("experts.jsonl" if objective == "dro" else "pairs.jsonl")
    f = data / f"{objective}.yaml"
    f.write_text(f"""
model: {{path: "tiny:sd15", lora_rank: 4}}
data: {{train: {train_path}, prompt_dropout: 0.2}}
objective: {{name: {objective}{extra}}}
train: {{steps: {steps}, batch_size: 2, lr: 1.0e-3, lr_scheduler: constant, checkpoint_every: 2, sample_every: 0,
        sample_steps: 2, log_every: 1, progress: false, output_dir: {out}}}
""")
    return load_config(f)


@pytest.mark.parametrize("objective,extra", [("inpo", ", inversion_steps: 3"), ("mapo", ""),
                                             ("dro", ", rollout_steps: 3")])
def test_objective_trains_and_saves_a_lora(data, objective, extra):
    res = train(_cfg(data, objective, data / f"run_{objective}", extra=extra))
    lines = [json.loads(s) for s in (data / f"run_{objective}" / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 4 and all(np.isfinite(m["loss"]) for m in lines)
    lora = load_file(str(Path(res["weights"]) / "pytorch_lora_weights.safetensors"))
    assert any(v.abs().sum() > 0 for k, v in lora.items() if "up" in k)  # B moved off zero


def test_dro_resume_restores_the_replay_buffer_exactly(data):
    """4 steps straight == 2 steps, stop, resume to 4, bit for bit. The buffer and the RNG are state: a
    resumed run with an empty buffer would draw different trajectories."""
    straight = train(_cfg(data, "dro", data / "a", extra=", rollout_steps: 3, buffer_size: 3"))
    train(_cfg(data, "dro", data / "b", steps=2, extra=", rollout_steps: 3, buffer_size: 3"))
    state = torch.load(data / "b" / "checkpoints" / "step_00000002" / "state" / "diffalign_state_0.pt",
                       weights_only=True)
    assert len(state["objective"]["buffer"]["items"]) == 2  # the buffer is saved with the checkpoint
    resumed = train(_cfg(data, "dro", data / "b", extra=", rollout_steps: 3, buffer_size: 3"), resume="latest")
    a = load_file(str(Path(straight["weights"]) / "pytorch_lora_weights.safetensors"))
    b = load_file(str(Path(resumed["weights"]) / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
