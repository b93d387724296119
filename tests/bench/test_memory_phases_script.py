"""scripts/memory_phases.py: the peak RSS of each phase of a training run, and nothing of the loop left patched."""

import importlib.util
import json
from pathlib import Path

import torch
import yaml

from diffalign.backbones import base as backbone_base
from diffalign.training import loop
from tests.helpers import write_pairs

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("memory_phases_script", ROOT / "scripts" / "memory_phases.py")
memory_phases = importlib.util.module_from_spec(spec)
spec.loader.exec_module(memory_phases)


def test_phases_of_a_tiny_run(tmp_path):
    cfg = {"model": {"path": "tiny:sd15", "resolution": 32, "lora_rank": 4},
           "data": {"train": str(write_pairs(tmp_path / "pairs", n=4))},
           "train": {"output_dir": "unused", "steps": 2, "batch_size": 2, "sample_every": 0, "sample_steps": 1,
                     "checkpoint_every": 0}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    before = (torch.Tensor.backward, loop.build_backbone, loop.sample_grid, backbone_base.Backbone.decode_latents)
    out = tmp_path / "phases.json"
    assert memory_phases.main([str(tmp_path / "run.yaml"), "--set", "model.gradient_checkpointing=selective",
                               "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    peaks = res["peak_rss_mb"]
    for phase in ("load the model", "step 1 forward", "step 1 backward", "step 2 backward", "sample grid",
                  "sample grid: VAE decode"):
        assert peaks[phase] > 100, phase
    assert res["vm_hwm_mb"] >= max(peaks.values()) - 1
    assert res["set"] == ["model.gradient_checkpointing=selective"]
    assert (torch.Tensor.backward, loop.build_backbone, loop.sample_grid,
            backbone_base.Backbone.decode_latents) == before
