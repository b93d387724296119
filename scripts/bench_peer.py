"""Our `diffalign train` (Diffusion-DPO) side by side with diffusers' research script
``examples/research_projects/diffusion_dpo/train_diffusion_dpo.py``, run as it is.

The diffusers script lives in the diffusers *source* repository (not in its wheel) and is not copied
here: pass its path with ``--peer-script``. Its extra dependencies are the ``peer`` extra
(``pip install 'diffalign[peer]'``: datasets, wandb).

Both contenders get the same diffusers pipeline folder, the same pairs (one ``train.parquet`` in the
Pick-a-Pic schema the script's ``load_dataset`` reads: ``jpg_0``/``jpg_1`` image bytes, ``label_0``,
``caption``), the same batch, resolution, LoRA (rank r, alpha r, gaussian init, to_q/k/v/out.0), AdamW
(lr, weight decay 1e-2, betas 0.9/0.999), gradient clipping at 1.0, constant LR without warm-up, random
horizontal flips, no prompt dropout, and the equivalent beta: ours is the official ``beta/2`` form, so our
``--beta`` 5000 is the script's ``--beta_dpo`` 2500.

Measured per run (each run is a fresh process, contenders alternate within each repeat, one thread):
- steps/s after start-up: both write TensorBoard scalars ("loss") with wall-clock stamps; the rate is
  ``(N - W) / (wall(step N) - wall(step W))`` for the ``W`` warm-up steps and the ``N`` steps of the run,
  so loading, data preparation and the final save are left out alike;
- start-up: seconds from the process start to the first logged step W;
- peak RSS of the process (its ``VmHWM`` read every 20 ms: ``os.wait4``'s ``ru_maxrss`` would carry this
  script's own size into every contender; see ``watch``).

Reported: the median and range over the repeats, and our/peer ratios of the medians.

    python scripts/bench_peer.py --peer-script /path/to/train_diffusion_dpo.py --repeats 5 \
        --out docs/results/peer_tiny.json
    python scripts/bench_peer.py --peer-script ... --arch sd15 --pipeline-dir /tmp/sd15_arch \
        --resolution 128 --batch 1 --steps 6 --warmup 2 --log-every 2 --out docs/results/peer_sd15.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
OURS_FAST = ("cache", "channels_last", "bf16", "frozen_bf16", "grad_ckpt", "sel_ckpt", "keep_heap")


def write_pairs(out: Path, n: int, size: int, seed: int = 0) -> Path:
    """``out/train.parquet``: n rendered toy pairs, images as PNG bytes (Pick-a-Pic v2 layout)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from diffalign.data.synthetic import write_rendered_pairs

    with tempfile.TemporaryDirectory() as tmp:
        src = write_rendered_pairs(Path(tmp), n=n, seed=seed, size=size)
        rows = [json.loads(x) for x in src.read_text().splitlines()]
        cols = {"caption": [r["caption"] for r in rows], "label_0": [float(r["label_0"]) for r in rows],
                "jpg_0": [(Path(tmp) / r["jpg_0"]).read_bytes() for r in rows],
                "jpg_1": [(Path(tmp) / r["jpg_1"]).read_bytes() for r in rows]}
    out.mkdir(parents=True, exist_ok=True)
    table = pa.table({"caption": pa.array(cols["caption"]), "label_0": pa.array(cols["label_0"]),
                      "jpg_0": pa.array(cols["jpg_0"], pa.binary()), "jpg_1": pa.array(cols["jpg_1"], pa.binary())})
    path = out / "train.parquet"
    pq.write_table(table, path)
    return path


def save_arch_pipeline(arch: str, out: Path) -> Path:
    """The real ``arch`` architecture with random weights as a diffusers folder (both contenders load it;
    with transformers 5 the script's ``AutoTokenizer(use_fast=False)`` reads the saved tokenizer.json)."""
    from diffalign.backbones.arch import build_arch_pipeline

    if not (out / "model_index.json").exists():
        build_arch_pipeline(arch, seed=0).save_pretrained(out)
    return out


def toy_base() -> Path:
    from diffalign.toyworld.bases import find_base

    return Path(find_base(None)) / "sd"


def peer_command(a: argparse.Namespace, model: Path, data_dir: Path, out: Path, steps: int,
                 fast: bool) -> list[str]:
    cmd = [sys.executable, str(a.peer_script), "--pretrained_model_name_or_path", str(model),
           "--dataset_name", str(data_dir), "--dataset_split_name", "train", "--cache_dir", str(out / "hf_cache"),
           "--output_dir", str(out), "--resolution", str(a.resolution), "--train_batch_size", str(a.batch),
           "--max_train_steps", str(steps), "--rank", str(a.rank), "--beta_dpo", f"{a.beta / 2:g}",
           "--learning_rate", str(a.lr), "--lr_scheduler", "constant", "--lr_warmup_steps", "0",
           "--checkpointing_steps", "1000000", "--seed", "0", "--report_to", "tensorboard",
           "--dataloader_num_workers", "0"]
    if fast:  # its own fastest CPU settings: the VAE encodes the whole batch at once (and bf16 if asked)
        cmd += ["--vae_encode_batch_size", str(2 * a.batch)]
        for part in getattr(a, "peer_fastest", "").split("+"):
            if part == "bf16":  # accelerate's bf16 autocast; the script casts every frozen weight to bf16
                cmd += ["--mixed_precision", "bf16"]
            elif part:
                raise SystemExit(f"--peer-fastest: unknown part {part!r} (bf16)")
    return cmd


def ours_command(a: argparse.Namespace, model: Path, data: Path, out: Path, steps: int, fast: bool,
                 cache: Path | None) -> list[str]:
    import yaml

    cfg: dict[str, Any] = {
        "model": {"path": str(model), "resolution": a.resolution, "lora_rank": a.rank},
        "data": {"train": str(data), "prompt_dropout": 0.0, "random_flip": True},
        "objective": {"name": "dpo", "beta": a.beta},
        "train": {"output_dir": str(out), "steps": steps, "batch_size": a.batch, "lr": a.lr,
                  "lr_scheduler": "constant", "warmup_steps": 0, "weight_decay": 1e-2, "max_grad_norm": 1.0,
                  "log_every": a.log_every, "checkpoint_every": 0, "sample_every": 0, "sample_steps": 1,
                  "sample_prompts": ["a red circle"], "checkpoint_checksums": False},
    }
    if fast:
        for part in a.ours_fastest.split("+"):
            if part == "cache":
                cfg["data"]["cache_dir"] = str(cache)
            elif part == "channels_last":
                cfg["model"]["channels_last"] = True
            elif part == "bf16":
                cfg["train"]["mixed_precision"] = "bf16"
            elif part == "frozen_bf16":  # the frozen base weights in bf16 (the LoRA stays fp32)
                cfg["model"]["frozen_dtype"] = "bfloat16"
            elif part == "keep_heap":  # glibc keeps freed memory for the next step (train.cpu_keep_freed_memory)
                cfg["train"]["cpu_keep_freed_memory"] = True
            elif part in ("grad_ckpt", "sel_ckpt"):  # full or selective gradient checkpointing
                cfg["model"]["gradient_checkpointing"] = True if part == "grad_ckpt" else "selective"
            elif part:
                raise SystemExit(f"--ours-fastest: unknown part {part!r} ({', '.join(OURS_FAST)})")
    out.mkdir(parents=True, exist_ok=True)
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    exe = Path(sys.executable).with_name("diffalign")
    return [str(exe), "train", str(path)]


def loss_walltimes(run_dir: Path) -> dict[int, float]:
    """step -> wall-clock time of the "loss" scalar, from every TensorBoard event file under run_dir."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[int, float] = {}
    for f in run_dir.rglob("events.out.tfevents*"):
        acc = EventAccumulator(str(f), size_guidance={"scalars": 0})
        acc.Reload()
        if "loss" in acc.Tags().get("scalars", []):
            for e in acc.Scalars("loss"):
                out[e.step] = e.wall_time
    return out


def run_one(cmd: list[str], run_dir: Path, steps: int, warmup: int, threads: int, log: Path) -> dict[str, Any]:
    """Run one contender; its CPU time (user + system) is sampled every 20 ms, so the CPU seconds of the timed
    steps are read at the same TensorBoard stamps as the wall time: on a shared machine the CPU time per step
    is what the process itself spent, whatever else ran beside it."""

    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled",
           "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT)}
    t0 = time.time()
    with log.open("w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=run_dir.parent)
        status, usage, samples, hwm_kb = watch(proc)
    wall = time.time() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[:3]} exited {proc.returncode}; log {log}:\n" + log.read_text()[-3000:])
    stamps = loss_walltimes(run_dir)
    if warmup not in stamps or steps not in stamps:
        raise RuntimeError(f"{run_dir}: no loss logged at steps {warmup} and {steps} (got {sorted(stamps)}); log {log}")
    cpu = cpu_at(samples, stamps[steps]) - cpu_at(samples, stamps[warmup])
    return {"steps_per_s": (steps - warmup) / (stamps[steps] - stamps[warmup]), "steps_per_cpu_s": (steps - warmup) / cpu,
            "startup_s": stamps[warmup] - t0, "wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime,
            "peak_rss_mb": (hwm_kb or usage.ru_maxrss) / 1024, "ru_maxrss_mb": usage.ru_maxrss / 1024}


def watch(proc: subprocess.Popen) -> tuple[int, Any, list[tuple[float, float]], int]:
    """Wait for ``proc``, sampling its CPU seconds and its peak RSS every 20 ms: the exit status, ``os.wait4``'s
    rusage, the (wall time, CPU seconds) samples and the last ``VmHWM`` read (kB; 0 where /proc has none).

    ``VmHWM`` is the high-water mark of the process's own address space since its exec; ``wait4``'s ``ru_maxrss``
    is not: Linux carries the parent's RSS at fork time into the child's, so a child of a large parent reads at
    least the parent's size (e.g. after this script built the cache at 512 px, every contender read 11.6 GB)."""
    import psutil

    ps = psutil.Process(proc.pid)
    samples: list[tuple[float, float]] = []
    hwm = 0
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        try:
            c = ps.cpu_times()
            samples.append((time.time(), c.user + c.system))
            hwm = max(hwm, _vm_hwm_kb(proc.pid))
        except (psutil.Error, OSError):
            pass
        time.sleep(0.02)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return status, usage, samples, hwm


def _vm_hwm_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def cpu_at(samples: list[tuple[float, float]], when: float) -> float:
    """The process's CPU seconds at wall time ``when``, interpolated between the samples around it."""
    for (t1, c1), (t2, c2) in zip(samples, samples[1:], strict=False):
        if t1 <= when <= t2:
            return c1 + (c2 - c1) * (when - t1) / max(t2 - t1, 1e-9)
    raise RuntimeError(f"no CPU-time sample around wall time {when}")


def summary(vals: list[float]) -> dict[str, float]:
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--peer-script", type=Path, required=True, help="diffusers' train_diffusion_dpo.py")
    p.add_argument("--model", type=Path, default=None, help="diffusers pipeline folder (default: the toy SD base)")
    p.add_argument("--arch", choices=["sd15"], default=None,
                   help="save the real architecture with random weights to --pipeline-dir and use it")
    p.add_argument("--pipeline-dir", type=Path, default=None, help="where --arch saves its pipeline (reused)")
    p.add_argument("--pairs", type=int, default=64)
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--batch", type=int, default=8, help="pairs per step")
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--beta", type=float, default=5000.0, help="ours (beta/2 form); the script gets beta/2")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--steps", type=int, default=25, help="steps of each run")
    p.add_argument("--warmup", type=int, default=5, help="steps left out of the rate")
    p.add_argument("--log-every", type=int, default=5, help="our train.log_every (the script logs every step)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--settings", default="same,fastest", help="same, fastest, or both")
    p.add_argument("--ours-fastest", default="cache",
                   help=f"our switches at our fastest, joined by +: {', '.join(OURS_FAST)}")
    p.add_argument("--peer-fastest", default="",
                   help="the script's extra settings at its fastest: bf16 (--mixed_precision bf16)")
    p.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    p.add_argument("--out", type=Path, default=None, help="results JSON")
    a = p.parse_args(argv)
    if not a.peer_script.is_file():
        p.error(f"--peer-script {a.peer_script}: no such file")
    for flag, v, lo in (("--pairs", a.pairs, 1), ("--resolution", a.resolution, 8), ("--batch", a.batch, 1),
                        ("--rank", a.rank, 1), ("--steps", a.steps, 1), ("--warmup", a.warmup, 0),
                        ("--log-every", a.log_every, 1), ("--repeats", a.repeats, 1), ("--threads", a.threads, 1)):
        if v < lo:
            p.error(f"{flag} must be at least {lo}, got {v}")
    if a.warmup >= a.steps:
        p.error(f"--warmup ({a.warmup}) must be below --steps ({a.steps}): the rate is taken after the warm-up")
    bad = [s for s in a.settings.split(",") if s not in ("same", "fastest")] or not a.settings.strip(",")
    if bad:
        p.error(f"--settings {a.settings!r}: give same, fastest or same,fastest")
    for flag, value, known in (("--ours-fastest", a.ours_fastest, OURS_FAST),
                               ("--peer-fastest", a.peer_fastest, ("bf16",))):
        unknown = [x for x in value.split("+") if x and x not in known]
        if unknown:
            p.error(f"{flag} {value!r}: unknown part {unknown[0]!r} (one of {', '.join(known)}, joined by +)")
    if (a.steps - a.warmup) % a.log_every or a.warmup % a.log_every:
        p.error("--warmup and --steps must be multiples of --log-every (our loss is logged every --log-every steps)")
    work = Path(a.work or tempfile.mkdtemp(prefix="bench_peer_")).resolve()  # the script runs elsewhere
    work.mkdir(parents=True, exist_ok=True)
    if a.arch:
        model = save_arch_pipeline(a.arch, a.pipeline_dir or work / f"{a.arch}_arch")
    else:
        model = a.model or toy_base()
    data = write_pairs(work / "data", a.pairs, a.resolution)
    settings = [s for s in a.settings.split(",") if s]
    cache = None
    if "fastest" in settings and "cache" in a.ours_fastest.split("+"):
        cache = work / "cache"
        if not (cache / "meta.json").exists():
            _build_cache(model, data, a.resolution, cache)
    contenders = []
    for s in settings:
        contenders += [("peer", s), ("ours", s)]
    runs: dict[str, list[dict[str, Any]]] = {f"{c} {s}": [] for c, s in contenders}
    for r in range(a.repeats):
        for who, s in contenders:
            run_dir = work / f"{who}_{s}_{r}"
            shutil.rmtree(run_dir, ignore_errors=True)
            fast = s == "fastest"
            cmd = (peer_command(a, model, data.parent, run_dir, a.steps, fast) if who == "peer"
                   else ours_command(a, model, data, run_dir, a.steps, fast, cache))
            res = run_one(cmd, run_dir, a.steps, a.warmup, a.threads, work / f"{who}_{s}_{r}.log")
            res["loadavg"] = list(os.getloadavg())
            runs[f"{who} {s}"].append(res)
            print(f"repeat {r} {who:4s} {s:7s}: {res['steps_per_s']:.3f} steps/s, {res['steps_per_cpu_s']:.3f}/CPU-s, start-up {res['startup_s']:.1f} s, "
                  f"peak RSS {res['peak_rss_mb']:.0f} MB, load {res['loadavg'][0]:.2f}", flush=True)
            shutil.rmtree(run_dir, ignore_errors=True)
    rows: dict[str, Any] = {}
    for name, rs in runs.items():
        rows[name] = {k: summary([x[k] for x in rs]) for k in ("steps_per_s", "steps_per_cpu_s", "startup_s",
                                                                "peak_rss_mb")}
        rows[name]["repeats"] = rs
    ratios = {}
    for s in settings:
        o, q = rows[f"ours {s}"], rows[f"peer {s}"]
        per = [x["steps_per_s"] / y["steps_per_s"] for x, y in zip(runs[f"ours {s}"], runs[f"peer {s}"], strict=True)]
        mem = [x["peak_rss_mb"] / y["peak_rss_mb"] for x, y in zip(runs[f"ours {s}"], runs[f"peer {s}"], strict=True)]
        cpu = [x["steps_per_cpu_s"] / y["steps_per_cpu_s"] for x, y in zip(runs[f"ours {s}"], runs[f"peer {s}"],
                                                                           strict=True)]
        ratios[s] = {"steps_per_s": o["steps_per_s"]["median"] / q["steps_per_s"]["median"],
                     "steps_per_s_per_repeat": summary(per), "steps_per_cpu_s_per_repeat": summary(cpu),
                     "peak_rss": o["peak_rss_mb"]["median"] / q["peak_rss_mb"]["median"], "peak_rss_per_repeat": summary(mem)}
    result = {"peer_script": str(a.peer_script), "model": str(model), "args": {k: str(v) for k, v in vars(a).items()},
              "machine": _machine(), "rows": rows, "ratios": ratios}
    print(table(result))
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(result, indent=2))
    return 0


def _build_cache(model: Path, data: Path, resolution: int, out: Path) -> None:
    """Our latent + text-embedding cache (with flipped latents), built once before the timed runs."""
    from diffalign.backbones import load_backbone
    from diffalign.data.cache import build_cache
    from diffalign.data.pairs import PreferencePairs

    bb = load_backbone(str(model), resolution=resolution)
    ds = PreferencePairs(str(data), resolution=resolution, random_flip=False)
    build_cache(ds, bb, out, batch_size=8, progress=False, dtype="float32")


def _machine() -> dict[str, Any]:
    import platform

    import torch

    return {"platform": platform.platform(), "cores": os.cpu_count(), "torch": torch.__version__,
            "loadavg_end": list(os.getloadavg())}


def table(result: dict[str, Any]) -> str:
    def f(d: dict[str, float], fmt: str) -> str:
        return f"{d['median']:{fmt}} [{d['min']:{fmt}}-{d['max']:{fmt}}]"

    lines = ["| contender | steps/s (wall) | steps per CPU-second | start-up s | peak RSS MB |", "|---|---|---|---|---|"]
    for name, row in result["rows"].items():
        lines.append(f"| {name} | {f(row['steps_per_s'], '.3f')} | {f(row['steps_per_cpu_s'], '.3f')} | "
                     f"{f(row['startup_s'], '.1f')} | {f(row['peak_rss_mb'], '.0f')} |")
    for s, r in result["ratios"].items():
        lines.append(f"\n{s}: ours/peer per repeat (median [min-max]): steps/s {f(r['steps_per_s_per_repeat'], '.2f')}, "
                     f"steps per CPU-s {f(r['steps_per_cpu_s_per_repeat'], '.2f')}, "
                     f"peak RSS {f(r['peak_rss_per_repeat'], '.2f')}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
