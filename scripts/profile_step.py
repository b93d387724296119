"""Where the time of a training step goes: torch.profiler's top ops by self CPU time and the share of each op
group (diffalign.bench.speed.profile_step), for a model and switches as the speed bench takes them.

    python scripts/profile_step.py --model arch:sd15 --resolution 128 --batch 1 --out docs/results/profile_sd15.json
    python scripts/profile_step.py --model arch:sd15 --resolution 128 --batch 1 --switch bf16
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> int:
    from diffalign.bench import speed
    from diffalign.data.synthetic import write_rendered_pairs

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="arch:sd15")
    p.add_argument("--objective", default="dpo")
    p.add_argument("--resolution", type=int, default=128)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--switch", default="", help="speed switches as `diffalign bench speed --switch` takes them")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-profile", action="store_true", help="time only (no profiler overhead)")
    p.add_argument("--peak", action="store_true", help="also measure the matmul peak (fp32, and bf16 when --switch bf16)")
    p.add_argument("--flops-only", action="store_true",
                   help="count one step's FLOPs (step, its attention, the inputs' encode) without timing anything")
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory() as tmp:
        case = speed.Case(model=a.model, objective=a.objective, batch_size=a.batch, resolution=a.resolution,
                          switches=speed.switch_set(a.switch) if a.switch else {})
        data = write_rendered_pairs(Path(tmp) / "pairs", n=max(8, a.batch), seed=0)
        if case.switches.get("data.cache_dir") == "auto":  # the latent + text-embedding cache, built untimed
            case = dataclasses.replace(case, switches={**case.switches, "data.cache_dir": str(Path(tmp) / "cache")})
            speed.build_cache_isolated(case, Path(tmp) / "run", data, Path(tmp) / "cache")  # its memory not ours
        cfg = speed._config(case, Path(tmp) / "run", data)
        if a.flops_only:
            res = {f"{k}_flops_per_step": v for k, v in speed.count_flops(cfg).items()}
            res["case"] = case.name
            print(json.dumps(res, indent=1))
            if a.out:
                a.out.parent.mkdir(parents=True, exist_ok=True)
                a.out.write_text(json.dumps(res, indent=2))
            return 0
        res = speed.profile_step(cfg, a.steps, a.warmup, profile=not a.no_profile)
    res["case"] = case.name
    if a.peak:  # CPU time of the matmul too: the peak and the step are measured alike
        for dtype in [torch.float32] + ([torch.bfloat16] if "bf16" in a.switch else []):
            res[f"peak_{dtype}".replace("torch.", "")] = speed.matmul_peak("cpu", dtype, cpu_time=True)
        for dtype in ("float32", "bfloat16"):
            if f"peak_{dtype}" in res:
                peak = res[f"peak_{dtype}"]["flops_per_s"]
                short = "fp32" if dtype == "float32" else "bf16"
                res[f"utilisation_{short}_peak_cpu_time"] = res["flops_per_cpu_s"] / peak
                res[f"utilisation_{short}_peak_without_inputs_cpu_time"] = res["flops_per_cpu_s_without_inputs"] / peak
                if "flops_with_inputs_per_cpu_s" in res:
                    res[f"utilisation_{short}_peak_with_inputs_cpu_time"] = res["flops_with_inputs_per_cpu_s"] / peak
    print(speed.profile_table(res) if not a.no_profile else json.dumps(
        {k: v for k, v in res.items() if k != "top_ops"}, indent=1))
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
