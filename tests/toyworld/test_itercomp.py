"""The toy IterComp loop on a tiny pipeline: rounds are saved in their own folders, and a run stopped after
round 1 and continued ends bit for bit where a straight run ends."""

import json

import torch
from safetensors.torch import load_file

from diffalign.config import RunConfig
from diffalign.toyworld.itercomp import IterCompSettings, run_itercomp, table

SETTINGS = dict(gallery_prompts=3, samples_per_model=2, eval_prompts_heads=2, refine_steps=2, pairs_per_step=64,
                eval_prompts=2, eval_seeds=1, sample_steps=2,
                # continuous annotators, so the noise images of a random tiny model still rank
                annotators={"attribute": "toy_aesthetic", "spatial": "toy_aesthetic", "count": "toy_aesthetic"})


def _cfg():
    return RunConfig.model_validate({
        "model": {"path": "tiny:sd15", "resolution": 32, "lora_rank": 4},
        "data": {"train": "toy:train:16"},
        "objective": {"name": "refl", "steps": 3, "k_lo": 1, "k_hi": 2, "guidance_scale": 3.0},
        "reward": {"train": "toy_aesthetic"},  # replaced by each round's heads
        "train": {"steps": 2, "batch_size": 2, "lr": 1e-3, "lr_scheduler": "constant", "checkpoint_every": 1,
                  "sample_every": 0, "log_every": 1, "progress": False, "output_dir": "unused"},
    })


def _final(out, r):
    heads = load_file(str(out / f"round_{r}" / "heads" / "heads.safetensors"))
    lora = load_file(str(out / f"round_{r}" / "policy" / "final" / "lora" / "pytorch_lora_weights.safetensors"))
    return heads, lora


def test_a_round_is_saved_and_an_interrupted_run_resumes_exactly(tmp_path):
    s = IterCompSettings(**SETTINGS)
    straight = run_itercomp(_cfg(), 2, tmp_path / "a", s)
    assert [r["round"] for r in straight["rounds"]] == [1, 2]
    r2 = json.loads((tmp_path / "a" / "round_2" / "round.json").read_text())
    assert len(r2["gallery"]) == 2 and r2["gallery"][1].endswith("round_1/policy_model")  # base + round 1's policy
    assert (tmp_path / "a" / "round_2" / "heads" / "heads.safetensors").exists()
    assert "| 2 |" in table(straight)

    first = run_itercomp(_cfg(), 2, tmp_path / "b", s, stop_after=1)  # the "interruption": stop after round 1
    assert len(first["rounds"]) == 1 and not (tmp_path / "b" / "round_2").exists()
    stamp = (tmp_path / "b" / "round_1" / "heads" / "heads.safetensors").stat().st_mtime_ns
    resumed = run_itercomp(_cfg(), 2, tmp_path / "b", s)
    assert (tmp_path / "b" / "round_1" / "heads" / "heads.safetensors").stat().st_mtime_ns == stamp  # not redone
    for r in (1, 2):
        (ha, la), (hb, lb) = _final(tmp_path / "a", r), _final(tmp_path / "b", r)
        assert all(torch.equal(ha[k], hb[k]) for k in ha) and all(torch.equal(la[k], lb[k]) for k in la)
    assert resumed["rounds"][1]["policy"] == straight["rounds"][1]["policy"]
    # round 2 refined round 1's heads: they moved
    h1, _ = _final(tmp_path / "a", 1)
    h2, _ = _final(tmp_path / "a", 2)
    assert any(not torch.equal(h1[k], h2[k]) for k in h1)


def test_other_settings_in_the_same_folder_are_refused(tmp_path):
    import pytest

    run_itercomp(_cfg(), 0, tmp_path, IterCompSettings(**SETTINGS))
    with pytest.raises(ValueError, match="refine_steps"):
        run_itercomp(_cfg(), 1, tmp_path, IterCompSettings(**{**SETTINGS, "refine_steps": 5}))


def test_cli_refuses_a_config_that_is_not_reward_feedback(tmp_path, capsys):
    from diffalign.cli import main

    f = tmp_path / "c.yaml"
    f.write_text("model: {path: 'tiny:sd15'}\ndata: {train: x.jsonl}\nobjective: {name: dpo}\n")
    assert main(["itercomp", "--rounds", "1", str(f), "--out", str(tmp_path / "out")]) == 2
    assert "reward-feedback objective" in capsys.readouterr().err
