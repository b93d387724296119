"""scripts/profile_step.py: the utilisation of the fp32 and bf16 matmul peaks, with and without the inputs' encoding."""

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("profile_step_script", ROOT / "scripts" / "profile_step.py")
profile_step_script = importlib.util.module_from_spec(spec)
spec.loader.exec_module(profile_step_script)


def test_bf16_case_reports_both_peaks_and_peak_rss(tmp_path):
    out = tmp_path / "util.json"
    profile_step_script.main(["--model", "tiny:sd15", "--resolution", "32", "--batch", "2", "--steps", "1",
                              "--warmup", "1", "--no-profile", "--peak", "--switch",
                              "bf16+model.frozen_dtype=bfloat16", "--out", str(out)])
    res = json.loads(out.read_text())
    fp32, bf16 = res["peak_float32"]["flops_per_s"], res["peak_bfloat16"]["flops_per_s"]
    assert abs(res["utilisation_fp32_peak_cpu_time"] - res["flops_per_cpu_s"] / fp32) < 1e-12
    assert abs(res["utilisation_bf16_peak_cpu_time"] - res["flops_per_cpu_s"] / bf16) < 1e-12
    assert res["utilisation_fp32_peak_with_inputs_cpu_time"] > res["utilisation_fp32_peak_cpu_time"]
    assert res["utilisation_bf16_peak_without_inputs_cpu_time"] > res["utilisation_bf16_peak_cpu_time"]
    assert res["peak_rss_mb"] > 100 and "[mixed_precision=bf16,frozen_dtype=bfloat16]" in res["case"]


def test_flops_only_counts_step_attention_and_inputs(tmp_path):
    out = tmp_path / "flops.json"
    profile_step_script.main(["--model", "tiny:sd15", "--resolution", "32", "--batch", "2", "--flops-only",
                              "--out", str(out)])
    res = json.loads(out.read_text())
    assert res["step_flops_per_step"] > res["attention_flops_per_step"] > 0
    assert res["inputs_flops_per_step"] > 0 and "peak_float32" not in res


def test_cache_switch_times_the_step_without_the_encoders(tmp_path):
    """--switch cache: the cache is built first (in a child process), then the step reads latents and text
    embeddings, so it encodes nothing."""
    out = tmp_path / "cache.json"
    profile_step_script.main(["--model", "tiny:sd15", "--resolution", "32", "--batch", "2", "--steps", "1",
                              "--warmup", "1", "--no-profile", "--switch", "cache", "--out", str(out)])
    res = json.loads(out.read_text())
    assert res["input_encode_flops_per_step"] == 0 and res["flops_per_step"] > 0
    assert "cache_dir=" in res["case"]
