"""The precise evaluation: shared noise, per-sample scores, paired bootstrap intervals, curve bands."""

import pytest
import torch

from diffalign.backbones import load_backbone
from diffalign.backbones.tiny import build_tiny_pipeline
from diffalign.bench import precise
from diffalign.bench.precise import Protocol


@pytest.fixture(scope="module")
def bb():
    b = load_backbone(build_tiny_pipeline("sd15"))
    b.resolution = 32
    return b


def test_bootstrap_of_identical_and_shifted_scores():
    a = torch.rand(500, generator=torch.Generator().manual_seed(0))
    iv = precise.paired_bootstrap(a, a)
    assert (iv.mean, iv.low, iv.high, iv.n) == (0.0, 0.0, 0.0, 500)
    iv = precise.paired_bootstrap(a, a + 0.1)
    assert iv.mean == pytest.approx(0.1) and iv.low == pytest.approx(0.1) and iv.high == pytest.approx(0.1)


def test_bootstrap_interval_covers_and_shrinks():
    g = torch.Generator().manual_seed(1)
    a = (torch.rand(4000, generator=g) < 0.5).double()
    b = torch.where(torch.rand(4000, generator=g) < 0.1, 1 - a, a)  # per-sample noise, mean gain ~ 0
    small = precise.paired_bootstrap(a[:400], b[:400])
    big = precise.paired_bootstrap(a, b)
    for iv in (small, big):
        assert iv.low <= iv.mean <= iv.high
    assert big.high - big.low < 0.6 * (small.high - small.low)  # ~ 1/sqrt(10)
    with pytest.raises(ValueError, match="one non-zero length"):
        precise.paired_bootstrap(a, b[:10])


def test_gain_averages_training_seeds_and_reports_their_spread():
    base = torch.zeros(100)
    g = precise.gain(base, [torch.full((100,), 0.1), torch.full((100,), 0.3)])
    assert g["mean"] == pytest.approx(0.2) and g["per_seed"] == pytest.approx([0.1, 0.3])
    assert g["seed_std"] == pytest.approx(0.1414, abs=1e-3)
    assert g["low"] == pytest.approx(0.2) and g["high"] == pytest.approx(0.2)
    assert precise.fmt_gain(g).startswith("+0.200 [+0.200, +0.200] ±0.141")


def test_protocol_captions():
    p = Protocol(prompts=8, seeds=3)
    caps = p.captions()
    assert len(caps) == p.n == 24 and caps[0] == caps[1] == caps[2] != caps[3]
    assert Protocol().n >= 1024
    with pytest.raises(ValueError, match="held-out prompts exist"):
        Protocol(prompts=100_000).captions()


def test_noise_does_not_depend_on_batch_and_a_model_has_zero_gain_over_itself(bb):
    import rewards

    p1 = Protocol(prompts=2, seeds=2, steps=2, batch_size=4)
    p2 = Protocol(prompts=2, seeds=2, steps=2, batch_size=1)
    a, b = precise.sample_images(bb, p1), precise.sample_images(bb, p2)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert (a[0] - a[1]).abs().max() > 1e-3  # the seeds of one prompt differ
    rs = {"toy_aesthetic": rewards.load("toy_aesthetic")}
    s1 = precise.score_images(a, p1.captions(), rs, p1.seeds)
    s2 = precise.score_images(b, p2.captions(), rs, p2.seeds)
    assert s1["toy_aesthetic"].shape == (4,) and s1["diversity"].shape == (2,)
    g = precise.gains(s1, [s2])
    assert abs(g["toy_aesthetic"]["mean"]) < 1e-5 and abs(g["diversity"]["mean"]) < 1e-5


def test_diversity_of_identical_images_is_zero():
    x = torch.rand(1, 3, 8, 8).repeat(6, 1, 1, 1)
    assert precise.per_prompt_diversity(x, 3).abs().max() < 1e-6


def test_steps_to_reach_with_interval():
    steps = [0, 10, 20, 30]
    n = 200
    curve = torch.stack([torch.zeros(n), torch.zeros(n), torch.ones(n), torch.ones(n)])
    ref = torch.full((n,), 0.5)
    r = precise.reach_interval(steps, curve, ref, n_boot=50)
    assert (r["steps"], r["low"], r["high"], r["never_fraction"]) == (20, 20.0, 20.0, 0.0)
    r = precise.reach_interval(steps, torch.zeros(4, n), ref, n_boot=50)
    assert r["steps"] is None and r["never_fraction"] == 1.0
    band = precise.curve_band(list(zip(steps, curve, strict=True)), n_boot=50)
    assert [b["mean"] for b in band] == [0.0, 0.0, 1.0, 1.0] and band[2]["low"] == band[2]["high"] == 1.0


def test_alignment_bench_reports_paired_intervals(tmp_path):
    """``bench_alignment`` scores base and tuned models on the same samples and reports each gain with its
    paired bootstrap interval (the gain mean lies inside it) and curves with several samples per point."""
    import json

    from diffalign.backbones.tiny import save_tiny
    from diffalign.bench.alignment import bench_alignment
    from diffalign.data.synthetic import write_rendered_pairs

    model = save_tiny("sd15", tmp_path / "m")
    pairs = write_rendered_pairs(tmp_path / "pairs", n=8, seed=0)
    res = bench_alignment(model, pairs, ["dpo"], seeds=2, out=tmp_path / "bench",
                          eval_prompts=["a red circle", "a blue square", "a green triangle"], target="toy_color",
                          steps=2, batch_size=2, eval_seeds=2, sample_steps=2, curve_every=1, curve_prompts=2,
                          curve_seeds=2)
    assert res["settings"]["eval_samples"] == 6
    s = res["objectives"]["dpo"]["summary"]
    for m in res["base"]:
        assert s[m]["ci_low"] - 1e-9 <= s[m]["gain_mean"] <= s[m]["ci_high"] + 1e-9
    assert [p["step"] for p in res["objectives"]["dpo"]["runs"][0]["curve"]] == [0, 1, 2]
    assert "2 prompts x 2 samples per point" in (tmp_path / "bench" / "results.md").read_text()
    assert json.loads((tmp_path / "bench" / "results.json").read_text())["settings"]["eval_samples"] == 6


def test_bench_evaluate_cli_zero_lora_has_zero_gain(tmp_path, capsys):
    """``diffalign bench evaluate --lora``: a LoRA with B = 0 equals the base, so every gain and its
    interval are exactly 0 (same samples, same noise)."""
    import json

    from diffalign.backbones.lora import add_lora, save_lora
    from diffalign.backbones.tiny import save_tiny
    from diffalign.cli import main

    model = save_tiny("sd15", tmp_path / "m")
    b = load_backbone(model)
    add_lora(b, rank=2)
    save_lora(b, tmp_path / "lora")  # peft initialises B to zero
    assert main(["bench", "evaluate", "--model", str(model), "--lora", str(tmp_path / "lora"), "--out",
                 str(tmp_path / "ev"), "--eval-prompts", "2", "--eval-seeds", "2", "--sample-steps", "2"]) == 0
    res = json.loads((tmp_path / "ev" / "evaluation.json").read_text())
    assert res["protocol"]["samples"] == 4
    for g in res["gains"].values():
        assert abs(g["mean"]) < 1e-6 and abs(g["low"]) < 1e-6 and abs(g["high"]) < 1e-6
    assert "| gain |" in capsys.readouterr().out
