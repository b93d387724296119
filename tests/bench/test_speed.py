"""The speed bench: its FLOP count, its switch grammar, and one isolated case end to end."""

import pytest
import torch

from diffalign.bench import speed


def test_switch_set_merges_named_switches_and_raw_keys():
    assert speed.switch_set("cache+fused_adamw") == {"data.cache_dir": "auto", "train.adam_impl": "fused"}
    assert speed.switch_set("model.lora_rank=8") == {"model.lora_rank": 8}
    with pytest.raises(ValueError, match="speed switch 'warp'"):
        speed.switch_set("warp")


def test_dpo_step_flops_are_policy_forward_backward_plus_reference_forward(tmp_path):
    """A LoRA DPO step is the policy's forward (1x), its backward and the reference's forward (1x) over
    the 2B winner+loser rows. The base weights are frozen, so the backward computes input gradients only
    (about 1x, less the first layer, which needs none) and the LoRA's small weight gradients: about 3x one
    forward, not the 4x of full fine-tuning."""
    from diffalign.data.synthetic import write_rendered_pairs
    from diffalign.training.setup import build_backbone

    data = write_rendered_pairs(tmp_path / "pairs", n=8)
    cfg = speed._config(speed.Case(batch_size=4, resolution=32), tmp_path / "run", data)
    step = speed.count_step_flops(cfg)
    bb = build_backbone(cfg)
    x = torch.randn(bb.latent_shape(8))
    c = bb.encode_prompts(["a red circle"] * 8)
    with speed.flop_counter() as fwd, torch.no_grad():
        bb.predict(x, torch.full((8,), 500), c)
    ratio = step / fwd.get_total_flops()
    assert 2.6 < ratio < 3.1, ratio


def test_matmul_peak_is_measured():
    m = speed.matmul_peak(n=256, repeats=3)
    assert m["min"] <= m["flops_per_s"] <= m["max"] and m["flops_per_s"] > 0


def test_one_training_case_runs_in_its_own_process():
    res = speed.run_isolated(speed.Case(batch_size=2, resolution=32, steps=2, warmup=1, log_every=1,
                                        switches={"train.adam_impl": "fused"}))
    assert res["steps_per_s"] > 0 and len(res["windows"]) == 2
    assert res["flops_per_step"] > 0 and res["peak_rss_mb"] >= res["rss_after_import_mb"]


def test_profile_step_says_where_the_time_goes(tmp_path):
    from diffalign.data.synthetic import write_rendered_pairs

    data = write_rendered_pairs(tmp_path / "pairs", n=8)
    cfg = speed._config(speed.Case(batch_size=2, resolution=32), tmp_path / "run", data)
    res = speed.profile_step(cfg, steps=1, warmup=0, top=5)
    assert abs(sum(res["groups"].values()) - 1) < 1e-6
    assert len(res["top_ops"]) == 5 and res["top_ops"][0]["share"] >= res["top_ops"][-1]["share"]
    assert res["flops_per_step"] > 0 and 0 < res["cpu_seconds_per_step"] and res["flops_per_cpu_s"] > 0
    assert "| op group |" in speed.profile_table(res)
    assert speed.op_group("aten::mkldnn_convolution") == "convolution"
    assert speed.op_group("aten::addmm") == "matmul (linear)"
    timing = speed.profile_step(cfg, steps=1, warmup=0, profile=False)
    assert "top_ops" not in timing and timing["cpu_seconds_per_step"] > 0


def test_matmul_peak_in_cpu_time():
    m = speed.matmul_peak(n=256, repeats=3, cpu_time=True)
    assert m["flops_per_s"] > 0


def test_profile_step_counts_flops_on_its_own_backbone(tmp_path, monkeypatch):
    """One copy of the weights: the FLOPs are counted during the first warm-up step on the step's own backbone
    (the same count as a separate build), and the peak RSS is reported; with no warm-up they are counted on a
    second build, made after the first is freed."""
    from diffalign.data.synthetic import write_rendered_pairs
    from diffalign.training import setup

    data = write_rendered_pairs(tmp_path / "pairs", n=8)
    cfg = speed._config(speed.Case(batch_size=2, resolution=32), tmp_path / "run", data)
    expected = speed.count_step_flops(cfg)
    builds = []
    real = setup.build_backbone
    monkeypatch.setattr(setup, "build_backbone", lambda *a, **k: builds.append(1) or real(*a, **k))
    res = speed.profile_step(cfg, steps=1, warmup=1, profile=False)
    assert len(builds) == 1 and res["flops_per_step"] == expected
    assert res["input_encode_flops_per_step"] > 0  # pixels in: the VAE encode, counted apart
    assert res["flops_with_inputs_per_cpu_s"] > res["flops_per_cpu_s"]
    assert 0 < res["input_cpu_seconds_per_step"] < res["cpu_seconds_per_step"]
    assert res["flops_per_cpu_s_without_inputs"] > res["flops_per_cpu_s"]
    assert res["peak_rss_mb"] > 100 and res["warmup_cpu_seconds"] > 0 and res["warmup_seconds"] > 0
    res = speed.profile_step(cfg, steps=1, warmup=0, profile=False)
    assert len(builds) == 3 and res["flops_per_step"] == expected


def test_cpu_flash_attention_is_counted():
    """SDPA on the CPU runs ``_scaled_dot_product_flash_attention_for_cpu``, which torch's FlopCounterMode
    does not know: its forward (QK^T and PV: 4 b h s^2 d) and backward (torch's formula for the GPU kernels:
    10 b h s^2 d, the scores recomputed) are counted here."""
    from torch.utils.flop_counter import FlopCounterMode

    b, h, s, d = 2, 4, 64, 16
    q, k, v = (torch.randn(b, h, s, d, requires_grad=True) for _ in range(3))
    with FlopCounterMode(display=False) as plain:
        torch.nn.functional.scaled_dot_product_attention(q, k, v)
    with speed.flop_counter() as fwd, torch.no_grad():
        torch.nn.functional.scaled_dot_product_attention(q, k, v)
    with speed.flop_counter() as counter:
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        out.sum().backward()
    assert plain.get_total_flops() == 0  # what the bench counted before
    assert fwd.get_total_flops() == 4 * b * h * s * s * d
    assert counter.get_total_flops() == speed.attention_flops(counter) == (4 + 10) * b * h * s * s * d
