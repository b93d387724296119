"""scripts/bench_online_rl.py and scripts/bench_cpu_minutes.py: the parts that run without training."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from diffalign.toyworld import shapes

ROOT = Path(__file__).resolve().parents[2]


def _load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


online = _load("bench_online_rl")
cpu_minutes = _load("bench_cpu_minutes")


@pytest.mark.parametrize("frac", [0.0, 0.5, 0.8, 1.0])
def test_prompt_mix_holds_the_asked_two_object_fraction_and_stays_in_its_split(frac):
    ps = shapes.prompt_mix("train", 100, frac, seed=3)
    assert len(ps) == 100 and len(set(ps)) == 100
    two = sum(len(shapes.parse_caption(p).objects) == 2 for p in ps)
    assert two == round(100 * frac)
    assert not any(shapes.is_heldout(p) for p in ps)
    assert shapes.prompt_mix("train", 100, frac, seed=3) == ps  # deterministic by seed
    assert shapes.prompt_mix("train", 100, frac, seed=4) != ps
    held = shapes.prompt_mix("heldout", 40, frac, seed=0)
    assert all(shapes.is_heldout(p) for p in held)
    with pytest.raises(ValueError, match="two_object"):
        shapes.prompt_mix("train", 10, 1.2)
    with pytest.raises(ValueError, match="the split has 54"):  # the held-out split has 54 one-object scenes
        shapes.prompt_mix("heldout", 500, 0.5)


@pytest.mark.parametrize("flags, msg", [
    (["--two-object", "1.5"], "--two-object"),
    (["--lr", "0"], "--lr"),
    (["--early-stop-drop", "0.02"], "--curve-every-min"),
    (["--seeds", "0,x"], "--seeds"),
    (["--reward", "no_such_reward"], "--reward"),
    (["--updates", "-1"], "--updates"),
    (["--curve-every-min", "-1"], "--curve-every-min"),
    (["--curve-every-min", "1", "--early-stop-drop", "-0.1"], "--early-stop-drop"),
    (["--base-dir", "/nonexistent"], "--base-dir"),
    (["--method", "draft_lv", "--reward", "toy_shape"], "not differentiable"),
    (["--lora-targets", ","], "--lora-targets"),
    (["--lora-targets", "to_q,to_qq"], "to_qq matches no module"),
])
def test_bad_flags_are_refused_before_any_work(tmp_path, monkeypatch, capsys, flags, msg):
    out = tmp_path / "out"
    monkeypatch.setattr(sys, "argv", ["bench_online_rl.py", "--out", str(out), *flags])
    with pytest.raises(SystemExit):
        online.main()
    assert msg in capsys.readouterr().err
    assert not out.exists()


def test_lora_targets_all_reaches_the_convolutions_and_starts_at_the_base():
    from diffalign.backbones import load_backbone
    from diffalign.backbones.lora import add_lora
    from diffalign.backbones.tiny import build_tiny_pipeline

    assert online._targets("attn") == ("to_q", "to_k", "to_v", "to_out.0")
    assert online._targets("to_q,conv1") == ("to_q", "conv1")
    counts = {}
    for spec in ("attn", "all"):
        bb = load_backbone(build_tiny_pipeline("sd15"))
        x, t = torch.randn(1, *bb.latent_shape(1)[1:]), torch.tensor([500])
        counts[spec] = add_lora(bb, rank=2, targets=online._targets(spec))
        names = [n for n, p in bb.denoiser.named_parameters() if p.requires_grad]
        assert any("conv1" in n for n in names) == (spec == "all")
        cond = bb.encode_prompts(["a red circle"])
        with torch.no_grad():  # B = 0: the adapter is the base, whichever modules it covers
            assert torch.equal(bb.predict(x, t, cond), bb.predict(x, t, cond, reference=True))
    assert counts["all"] > counts["attn"]


@pytest.mark.parametrize("method, cls, k", [("refl", "ReFL", None), ("draft_lv", "DRaFT", 2), ("draft_k", "DRaFT", 0),
                                            ("alignprop", "AlignProp", None)])
def test_reward_feedback_methods_are_built_with_the_chain_flags(method, cls, k):
    import argparse

    args = argparse.Namespace(rollout_steps=10, guidance=5.0, kl=0.5, group=4, nft_beta=1.0, timestep_fraction=0.5,
                              decay_rate=0.001, decay_max=0.5, clip_range=1e-3)
    obj = online.build_objective(method, args)
    assert type(obj).__name__ == cls and obj.steps == 10 and obj.guidance_scale == 5.0 and obj.beta_kl == 0.5
    if method == "refl":
        assert (obj.k_lo, obj.k_hi) == (3, 7)
    if k is not None:
        assert obj.lv_copies == k


def test_lora_restore_of_the_base_point_zeroes_b_so_the_model_is_the_base():
    from diffalign.backbones import load_backbone
    from diffalign.backbones.lora import add_lora
    from diffalign.backbones.tiny import build_tiny_pipeline

    bb = load_backbone(build_tiny_pipeline("sd15"))
    add_lora(bb, rank=2)
    x, t = torch.randn(1, *bb.latent_shape(1)[1:]), torch.tensor([500])
    cond = bb.encode_prompts(["a red circle"])
    with torch.no_grad():
        base = bb.predict(x, t, cond, reference=True)
        saved = online._lora_copy(bb)
        assert saved and all(".default." in n for n in saved)
        for p in bb.trainable_parameters():
            p.add_(0.1)
        assert not torch.allclose(bb.predict(x, t, cond), base)
        online._lora_restore(bb, {})
        assert torch.equal(bb.predict(x, t, cond), base)


def test_dpo_curve_reads_the_checkpoint_scores_and_the_base(tmp_path):
    d = tmp_path / "scores" / "curve"
    d.mkdir(parents=True)
    torch.save({"toy_shape": torch.zeros(4)}, d / "base.pt")
    for seed in (0, 1):
        for step in (20, 40):
            torch.save({"toy_shape": torch.full((4,), step / 100 + seed)}, d / f"dpo_seed{seed}_step{step}.pt")
    torch.save({"toy_shape": torch.ones(4)}, d / "inpo_seed0_step20.pt")  # another objective: ignored
    curve = cpu_minutes.dpo_curve(tmp_path, "toy_shape")
    assert list(curve) == [0, 20, 40]
    assert len(curve[0]) == 1 and len(curve[20]) == 2 and len(curve[40]) == 2
    assert sorted(float(c[0]) for c in curve[40]) == pytest.approx([0.4, 1.4])


def test_cpu_minutes_refuses_an_online_folder_without_results(tmp_path, capsys):
    (tmp_path / "ok").mkdir()
    (tmp_path / "ok" / "results.jsonl").write_text(json.dumps({"seed": 0}) + "\n")
    with pytest.raises(SystemExit):
        cpu_minutes.main(["--precise", str(tmp_path), "--online", f"nft={tmp_path / 'missing'}", "--out", str(tmp_path / "o")])
    assert "nft=" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cpu_minutes.main(["--precise", str(tmp_path), "--online", str(tmp_path / "ok"), "--out", str(tmp_path / "o")])


def test_best_of_k_picks_each_samples_best_candidate_and_keeps_its_other_metrics():
    best_of = _load("bench_best_of")
    cands = [{"toy_shape": torch.tensor([0.0, 1.0, 0.5]), "toy_color": torch.tensor([1.0, 2.0, 3.0]),
              "diversity": torch.tensor([0.1])},
             {"toy_shape": torch.tensor([1.0, 1.0, 0.0]), "toy_color": torch.tensor([4.0, 5.0, 6.0]),
              "diversity": torch.tensor([0.2])}]
    best = best_of.pick_best(cands, "toy_shape")
    assert best["toy_shape"].tolist() == [1.0, 1.0, 0.5]
    assert best["toy_color"].tolist() == [4.0, 2.0, 3.0]  # a tie keeps the first candidate (the base sample)
    assert "diversity" not in best


def test_best_of_refuses_a_folder_that_is_no_pipeline(tmp_path, capsys):
    best_of = _load("bench_best_of")
    with pytest.raises(SystemExit):
        best_of.main(["--base", str(tmp_path), "--out", str(tmp_path / "o")])
    assert "--base" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_final_table_pools_seeds_and_pairs_with_dpo_on_the_same_samples(tmp_path):
    from diffalign.bench.precise import Protocol

    proto = Protocol(prompts=8, seeds=2)
    n = proto.n
    (tmp_path / "scores").mkdir()
    (tmp_path / "results.json").write_text(json.dumps({"protocol": proto.as_dict(), "target": "toy_shape"}))
    torch.save({"toy_shape": torch.zeros(n), "toy_oracle": torch.zeros(n), "diversity": torch.zeros(8)},
               tmp_path / "scores" / "base.pt")
    torch.save({"toy_shape": torch.full((n,), 0.1), "toy_oracle": torch.zeros(n)}, tmp_path / "scores" / "dpo_seed0.pt")
    dirs = []
    for seed, v in ((0, 0.2), (1, 0.4)):
        d = tmp_path / f"nft_seed{seed}"
        d.mkdir()
        torch.save({"toy_shape": torch.full((n,), v), "toy_oracle": torch.full((n,), v / 2)}, d / "scores.pt")
        dirs.append(d)
    f = cpu_minutes.final_table(tmp_path, {"nft": dirs})["nft"]
    assert f["seeds"] == 2 and f["n"] == n and "diversity" not in f["gains"]
    assert f["gains"]["toy_shape"]["mean"] == pytest.approx(0.3)
    assert f["minus_dpo"]["toy_shape"]["mean"] == pytest.approx(0.2)
    assert f["minus_dpo"]["toy_oracle"]["mean"] == pytest.approx(0.15)
    assert sum(g["n"] for g in f["target_by_scene"].values()) == n


def test_plot_online_curves_draws_runs_and_refuses_a_missing_metric(tmp_path, capsys):
    plot = _load("plot_online_curves")
    run = tmp_path / "r"
    run.mkdir()
    curve = [{"step": 0, "cpu_min": 0.0, "toy_oracle": 0.6, "toy_aesthetic": 0.3},
             {"step": 10, "cpu_min": 0.5, "toy_oracle": 0.7, "toy_aesthetic": 0.35},
             {"step": 20, "cpu_min": 1.0, "toy_oracle": 0.5, "toy_aesthetic": 0.4}]
    (run / "results.jsonl").write_text(json.dumps({"reward": "toy_aesthetic", "curve": curve, "early_stopped": True,
                                                   "kept_step": 10}) + "\n")
    plot.main(["--run", f"a={run}", "--metrics", "toy_aesthetic,toy_oracle", "--out", str(tmp_path / "p.png")])
    assert (tmp_path / "p.png").stat().st_size > 0
    with pytest.raises(SystemExit):
        plot.main(["--run", f"a={run}", "--metrics", "toy_shape", "--out", str(tmp_path / "q.png")])
    assert "toy_shape" in capsys.readouterr().err and not (tmp_path / "q.png").exists()


def test_a_finished_run_is_never_overwritten_or_mixed(tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    (out / "nft_seed1").mkdir(parents=True)
    (out / "nft_seed1" / "result.json").write_text("{}")
    monkeypatch.setattr(sys, "argv", ["bench_online_rl.py", "--out", str(out), "--seeds", "0,1"])
    with pytest.raises(SystemExit):
        online.main()
    assert "nft_seed1" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["nft_seed1"]


def test_base_scores_are_recomputed_for_another_metric_set(tmp_path, monkeypatch):
    from diffalign.bench import precise

    calls = []

    def fake(bb, proto, rs, desc=""):
        calls.append(sorted(rs))
        return {k: torch.zeros(proto.n) for k in rs}

    monkeypatch.setattr(precise, "sample_scores", fake)
    monkeypatch.setattr("diffalign.backbones.load_backbone", lambda d: None)
    proto = precise.Protocol(prompts=4, seeds=1)
    path = tmp_path / "base.pt"
    online.base_scores(tmp_path, proto, {"a": None}, path, "")
    online.base_scores(tmp_path, proto, {"a": None}, path, "")  # same: served by the cache
    online.base_scores(tmp_path, proto, {"a": None, "b": None}, path, "")  # another metric set: scored again
    online.base_scores(tmp_path, precise.Protocol(prompts=8, seeds=1), {"a": None, "b": None}, path, "")
    assert calls == [["a"], ["a", "b"], ["a", "b"]]


def test_best_of_refuses_an_out_folder_cached_for_another_base(tmp_path, capsys):
    best_of = _load("bench_best_of")
    out = tmp_path / "o"
    (out / "scores").mkdir(parents=True)
    (out / "scores" / "meta.json").write_text(json.dumps({"base_dir": "/elsewhere"}))
    with pytest.raises(SystemExit):
        best_of.main(["--base", str(ROOT / "diffalign" / "toyworld" / "base" / "sd"), "--out", str(out)])
    assert "--out" in capsys.readouterr().err


def test_cpu_minutes_refuses_a_zero_measurement_size(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cpu_minutes.main(["--precise", str(tmp_path), "--cost-steps", "0", "--out", str(tmp_path / "o")])
    assert "--cost-steps" in capsys.readouterr().err
