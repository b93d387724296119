"""The alignment bench's plumbing on a tiny random SD1.5 (the real numbers come from the toy base)."""

import json

from diffalign.backbones.tiny import save_tiny
from diffalign.bench.alignment import bench_alignment, run_config
from diffalign.data.synthetic import write_rendered_pairs


def test_bench_alignment_writes_table_json_and_plot(tmp_path):
    model = save_tiny("sd15", tmp_path / "m")
    pairs = write_rendered_pairs(tmp_path / "pairs", n=8, seed=0)
    res = bench_alignment(model, pairs, ["dpo"], seeds=2, out=tmp_path / "bench",
                          eval_prompts=["a red circle", "a blue square"], target="toy_color",
                          steps=2, batch_size=2, eval_seeds=2, sample_steps=2)
    s = res["objectives"]["dpo"]["summary"]
    assert set(res["base"]) >= {"toy_color", "toy_shape", "toy_position", "toy_oracle", "toy_aesthetic", "diversity"}
    assert len(res["objectives"]["dpo"]["runs"]) == 2
    for m in res["base"]:
        gains = [r["after"][m] - res["base"][m] for r in res["objectives"]["dpo"]["runs"]]
        assert abs(s[m]["gain_mean"] - sum(gains) / 2) < 1e-9
    on_disk = json.loads((tmp_path / "bench" / "results.json").read_text())
    assert on_disk["target_metric"] == "toy_color"
    assert "| dpo (gain) |" in (tmp_path / "bench" / "results.md").read_text()
    assert (tmp_path / "bench" / "results.png").stat().st_size > 1000


def test_run_config_uses_the_objective_settings(tmp_path):
    cfg = run_config("m", "p.jsonl", tmp_path, "dpo", seed=3, steps=10)
    assert cfg.objective.name == "dpo" and cfg.train.seed == 3 and cfg.model.lora


def test_bench_compares_objectives_with_curves_and_steps_to_reach(tmp_path):
    """DPO and DRO from the same base and pair sample: DRO's experts are the pool's best images; each
    run scores its checkpoints and reports when it reaches DPO's final mean on the target."""
    from diffalign.bench.alignment import steps_to_reach
    from diffalign.data.relabel import select_experts
    from rewards import from_spec as parse_reward

    model = save_tiny("sd15", tmp_path / "m")
    pairs = write_rendered_pairs(tmp_path / "pairs", n=8, seed=0)
    experts = tmp_path / "experts"
    select_experts(pairs, parse_reward("toy_color"), experts, top=4, resolution=32, progress=False)
    res = bench_alignment(model, pairs, ["dpo", "dro"], seeds=1, out=tmp_path / "bench",
                          eval_prompts=["a red circle", "a blue square"], target="toy_color",
                          steps=4, batch_size=2, eval_seeds=1, sample_steps=2, curve_every=2, experts=experts)
    curve = res["objectives"]["dro"]["runs"][0]["curve"]
    assert [p["step"] for p in curve] == [0, 2, 4]
    assert res["reach"]["reference"] == "dpo"
    assert res["reach"]["level"] == res["objectives"]["dpo"]["runs"][0]["curve"][-1]["toy_color"]
    assert res["objectives"]["dpo"]["summary"]["steps_to_reach"] == [steps_to_reach(
        res["objectives"]["dpo"]["runs"][0]["curve"], "toy_color", res["reach"]["level"])]
    assert "steps to reach" in (tmp_path / "bench" / "results.md").read_text()


def test_steps_to_reach_is_the_first_checkpoint_at_the_level():
    from diffalign.bench.alignment import steps_to_reach

    pts = [{"step": 0, "m": 0.9}, {"step": 50, "m": 0.5}, {"step": 100, "m": 0.7}, {"step": 150, "m": 0.8}]
    assert steps_to_reach(pts, "m", 0.7) == 100  # the base (step 0) never counts
    assert steps_to_reach(pts, "m", 0.95) is None


def test_run_config_points_dro_at_the_experts(tmp_path):
    cfg = run_config("m", tmp_path / "pairs" / "pairs.jsonl", tmp_path / "o", "dro", seed=0, steps=10)
    assert cfg.objective.name == "dro" and cfg.data.train == str(tmp_path / "pairs" / "experts")
