"""Benchmark: Diffusion-DPO training steps/s and peak memory on the tiny SD1.5 model, with and
without the latent cache. Each configuration runs in its own process (peak RSS is per process).

    python scripts/bench_dpo.py [--steps 40] [--batch-size 8] [--resolution 32] [--out runs/bench_dpo]

Prints a markdown table (the figures in docs/BENCHMARKS.md come from it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path


def run_one(mode: str, args: argparse.Namespace) -> dict:
    import torch

    from diffalign.config import load_config
    from diffalign.data.cache import build_cache
    from diffalign.data.pairs import PreferencePairs
    from diffalign.objectives import DiffusionDPO
    from diffalign.training.batches import model_inputs
    from diffalign.training.setup import build_backbone, build_dataset

    out = Path(args.out)
    cfg_path = out / "bench.yaml"
    cfg = load_config(cfg_path, ["--data.cache_dir", str(out / "cache")] if mode == "cache" else [])
    torch.manual_seed(0)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    bb = build_backbone(cfg, dev)
    if mode == "cache" and not (out / "cache" / "meta.json").exists():
        ds = PreferencePairs(cfg.data.train, resolution=bb.resolution, random_flip=False)
        build_cache(ds, bb, out / "cache", batch_size=16, progress=False, dtype="float32")
    ds, collate, empty = build_dataset(cfg, bb)
    loader = torch.utils.data.DataLoader(ds, batch_size=args.batch_size, shuffle=True, collate_fn=collate, drop_last=True)
    obj = DiffusionDPO(beta=5000)
    opt = torch.optim.AdamW(bb.trainable_parameters(), lr=1e-4)
    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def batches():
        while True:
            yield from loader

    it = batches()
    times = []
    for step in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        inputs = model_inputs(next(it), bb, 0.2, empty)
        loss, _ = obj.loss(inputs, bb)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if dev == "cuda":
            torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
    res = {
        "mode": mode,
        "device": dev,
        "steps_per_s": len(times) / sum(times),
        "pairs_per_s": len(times) * args.batch_size / sum(times),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    if dev == "cuda":
        res["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return res


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--pairs", type=int, default=256)
    p.add_argument("--family", default="sd15")
    p.add_argument("--out", default="runs/bench_dpo")
    p.add_argument("--repeats", type=int, default=3, help="alternating runs per mode; the median is reported")
    p.add_argument("--mode", choices=["pixels", "cache"], default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    out = Path(args.out)
    if args.mode:  # child process
        print(json.dumps(run_one(args.mode, args)))
        return 0
    from diffalign.data.synthetic import write_rendered_pairs

    out.mkdir(parents=True, exist_ok=True)
    pairs = write_rendered_pairs(out / "pairs", n=args.pairs, seed=0, overwrite=True)  # the bench owns out/
    (out / "bench.yaml").write_text(
        f'model: {{path: "tiny:{args.family}", resolution: 32, lora_rank: 4}}\ndata: {{train: {pairs}}}\n'
    )
    runs: dict[str, list[dict]] = {"pixels": [], "cache": []}
    for _ in range(args.repeats):
        for mode in ("pixels", "cache"):  # alternate, so background load hits both alike
            cmd = [sys.executable, __file__, "--mode", mode, "--steps", str(args.steps), "--warmup", str(args.warmup),
                   "--batch-size", str(args.batch_size), "--out", str(out), "--family", args.family]
            res = subprocess.run(cmd, capture_output=True, text=True, check=True)
            runs[mode].append(json.loads(res.stdout.strip().splitlines()[-1]))
    import statistics

    first = runs["pixels"][0]
    mem = "peak_cuda_mb" if "peak_cuda_mb" in first else "peak_rss_mb"
    print(f"tiny {args.family} + LoRA r4, 32 px, batch {args.batch_size} pairs, {args.steps} timed steps x "
          f"{args.repeats} alternating runs (median [min-max]); {platform.machine()}, {os.cpu_count()} cores, "
          f"device {first['device']}, load average before: {os.getloadavg()[0]:.2f}")
    print(f"| data path | steps/s | pairs/s | {mem.replace('_', ' ')} |\n|---|---|---|---|")
    med = {}
    for mode, rs in runs.items():
        sps = [r["steps_per_s"] for r in rs]
        med[mode] = statistics.median(sps)
        print(f"| {mode} | {med[mode]:.2f} [{min(sps):.2f}-{max(sps):.2f}] | {med[mode] * args.batch_size:.1f} | "
              f"{statistics.median(r[mem] for r in rs):.0f} |")
    print(f"cache speed-up (median): x{med['cache'] / med['pixels']:.2f}")
    (out / "results.json").write_text(json.dumps(runs, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
