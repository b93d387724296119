"""Peak RSS of a `diffalign train` run by phase: start-up, loading the model, each step's forward and backward,
the final sample grid and its VAE decode. The process's RSS is read every 5 ms by a thread; a phase is tagged by
wrapping the loop's own functions (nothing in the loop changes). One thread, as the speed benchmarks.

    OMP_NUM_THREADS=1 python scripts/memory_phases.py run.yaml --set model.gradient_checkpointing=selective \
        --out docs/results/memory_phases.json

Used for docs/BENCHMARKS.md "Speed, part 4": which phase sets a run's peak.
"""

from __future__ import annotations

import argparse
import collections
import json
import resource
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import torch
import yaml


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("config", help="a run config (YAML); its output_dir is replaced by a temporary folder")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a key")
    p.add_argument("--out", help="write the peaks as JSON here")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    from diffalign.backbones import base as backbone_base
    from diffalign.config import RunConfig
    from diffalign.training import loop

    raw = yaml.safe_load(Path(a.config).read_text())
    for item in a.set:
        key, sep, value = item.partition("=")
        if not sep or "." not in key:
            p.error(f"--set {item!r}: give SECTION.KEY=VALUE")
        section, _, name = key.partition(".")
        raw.setdefault(section, {})[name] = yaml.safe_load(value)
    work = Path(tempfile.mkdtemp(prefix="memory_phases_"))
    raw.setdefault("train", {})["output_dir"] = str(work / "run")
    cfg = RunConfig.model_validate(raw)

    phase = ["start-up"]
    peaks: dict[str, float] = collections.defaultdict(float)
    proc = psutil.Process()

    def watch() -> None:
        while True:
            rss = proc.memory_info().rss / 2**20
            if rss > peaks[phase[0]]:
                peaks[phase[0]] = rss
            time.sleep(0.005)

    threading.Thread(target=watch, daemon=True).start()

    restore: list[tuple[object, str, object]] = []

    def tag(obj: object, name: str, before: str, after: str) -> None:
        orig = getattr(obj, name)
        restore.append((obj, name, orig))

        def wrapped(*args, **kwargs):
            phase[0] = before
            try:
                return orig(*args, **kwargs)
            finally:
                phase[0] = after

        setattr(obj, name, wrapped)

    steps = [0]
    backward = torch.Tensor.backward

    def tagged_backward(self, *args, **kwargs):
        phase[0] = f"step {steps[0] + 1} backward"
        out = backward(self, *args, **kwargs)
        steps[0] += 1
        phase[0] = f"step {steps[0] + 1} forward"
        return out

    torch.Tensor.backward = tagged_backward
    tag(loop, "build_backbone", "load the model", "step 1 forward")
    tag(loop, "sample_grid", "sample grid", "after")
    tag(backbone_base.Backbone, "decode_latents", "sample grid: VAE decode", "sample grid")
    try:
        loop.train(cfg)
    finally:
        torch.Tensor.backward = backward
        for obj, name, orig in restore:
            setattr(obj, name, orig)
        shutil.rmtree(work, ignore_errors=True)
    last = f"step {steps[0] + 1} forward"  # after the last backward: its update, the export of the weights
    if last in peaks:
        peaks["update and export after the last step"] = peaks.pop(last)
    result = {"config": a.config, "set": a.set, "peak_rss_mb": {k: round(v) for k, v in peaks.items()},
              "vm_hwm_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}
    for k, v in result["peak_rss_mb"].items():
        print(f"{k:28s} {v:7d} MB")
    print(f"{'peak of the process':28s} {result['vm_hwm_mb']:7d} MB")
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
