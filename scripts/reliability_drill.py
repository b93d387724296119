"""Reliability drill: inject faults into real `diffalign train` runs of the tiny DPO recipe and check
that nothing is lost. The figures in docs/RELIABILITY.md come from this script.

    python scripts/reliability_drill.py --out runs/reliability_drill [--kills 20] [--seed 0]

Drills (each ends by comparing the final LoRA, tensor by tensor with torch.equal, and the loss
curve with an uninterrupted run of the same config):
  kill9      kill -9 at random moments of training, restart with --resume auto, until the run completes
  kill9_ckpt kill -9 while a checkpoint is being written (the moment its temporary folder appears)
  sigterm    SIGTERM at random moments: exit 143 after saving, then resume
  corrupt    flip one byte in a random file of the newest checkpoint, then resume (falls back)
  nonfinite  NaN/inf losses and NaN gradients at random steps: skipped and counted, run completes;
             then 5 in a row: the run stops naming the last good checkpoint, and resumes cleanly
Every subprocess runs with OMP_NUM_THREADS=1.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]


def env(faults: list[dict] | None = None) -> dict[str, str]:
    e = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    e.pop("DIFFALIGN_FAULTS", None)
    if faults:
        e["DIFFALIGN_FAULTS"] = json.dumps(faults)
    return e


def cmd(cfg: Path, run: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "tests.faults", "train", str(cfg), "--train.output_dir", str(run), *extra]


def lora(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "final" / "lora" / "pytorch_lora_weights.safetensors"))


def losses(run: Path) -> list[tuple[int, float]]:
    out = []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        m = json.loads(line)
        out.append((m["step"], m.get("loss")))
    return out


def same(a: Path, b: Path) -> bool:
    la, lb = lora(a), lora(b)
    return la.keys() == lb.keys() and all(torch.equal(la[k], lb[k]) for k in la) and losses(a) == losses(b)


def logged_steps(run: Path) -> int:
    f = run / "metrics.jsonl"
    return len(f.read_text().splitlines()) if f.is_file() else 0


def leftovers(run: Path) -> dict:
    """What the checkpoints folder holds at the end: complete checkpoints and anything else."""
    root = run / "checkpoints"
    complete = [p.name for p in sorted(root.iterdir()) if p.name.startswith("step_") and (p / "diffalign_checkpoint.json").is_file()]
    other = [p.name for p in sorted(root.iterdir()) if p.name not in complete]
    return {"checkpoints_kept": complete, "other_folders": other}


def kill_loop(cfg: Path, run: Path, rng: random.Random, kills: int, during_write: bool, steps: int) -> dict:
    """Start/kill/restart until the run completes; returns counts."""
    n_kills, in_write, attempts = 0, 0, 0
    while True:
        attempts += 1
        p = subprocess.Popen(cmd(cfg, run, "--resume", "auto"), cwd=REPO, env=env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if n_kills < kills:
            start = logged_steps(run)
            while p.poll() is None and logged_steps(run) <= start:  # training has started (a new step logged)
                time.sleep(0.01)
            if during_write:
                root = run / "checkpoints"
                while p.poll() is None and not any(root.glob(".tmp_step_*")):
                    time.sleep(0.001)
            else:
                time.sleep(rng.uniform(0.0, 0.25))
            if p.poll() is None:
                writing = any((run / "checkpoints").glob(".tmp_step_*"))
                p.send_signal(signal.SIGKILL)
                p.wait()
                n_kills += 1
                in_write += writing
                continue
        _, err = p.communicate()
        if p.returncode != 0:
            raise RuntimeError(f"run failed (rc {p.returncode}):\n{err[-3000:]}")
        if (run / "final" / "result.json").is_file():
            return {"kills": n_kills, "kills_during_checkpoint_write": in_write, "starts": attempts}


def sigterm_loop(cfg: Path, run: Path, rng: random.Random, times: int) -> dict:
    n, clean = 0, 0
    while True:
        p = subprocess.Popen(cmd(cfg, run, "--resume", "auto"), cwd=REPO, env=env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if n < times:
            start = logged_steps(run)
            while p.poll() is None and logged_steps(run) <= start:
                time.sleep(0.01)
            time.sleep(rng.uniform(0.0, 0.5))
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                _, err = p.communicate()
                n += 1
                clean += p.returncode == 128 + signal.SIGTERM and "Traceback" not in err and "checkpoint saved" in err
                continue
        _, err = p.communicate()
        if p.returncode != 0:
            raise RuntimeError(f"run failed (rc {p.returncode}):\n{err[-3000:]}")
        if (run / "final" / "result.json").is_file():
            return {"sigterms": n, "clean_exits_with_checkpoint": clean}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/reliability_drill")
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--ckpt-kills", type=int, default=5)
    ap.add_argument("--sigterms", type=int, default=5)
    ap.add_argument("--corruptions", type=int, default=5)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    out = Path(args.out).resolve()
    if out.exists():
        import shutil

        shutil.rmtree(out)
    out.mkdir(parents=True)
    sys.path.insert(0, str(REPO))
    from tests.reliability.conftest import write_config

    cfg = write_config(out, "dpo", steps=args.steps, checkpoint_every=2, keep_checkpoints=3, log_every=1)
    t0 = time.time()
    ref = out / "straight"
    subprocess.run(cmd(cfg, ref), cwd=REPO, env=env(), check=True, capture_output=True)
    results: dict = {"config": str(cfg), "steps": args.steps}

    r = out / "kill9"
    results["kill9"] = kill_loop(cfg, r, rng, args.kills, during_write=False, steps=args.steps)
    results["kill9"]["identical_to_straight"] = same(ref, r)
    results["kill9"].update(leftovers(r))
    print("kill9", results["kill9"], flush=True)

    r = out / "kill9_ckpt"
    results["kill9_ckpt"] = kill_loop(cfg, r, rng, args.ckpt_kills, during_write=True, steps=args.steps)
    results["kill9_ckpt"]["identical_to_straight"] = same(ref, r)
    results["kill9_ckpt"].update(leftovers(r))
    print("kill9_ckpt", results["kill9_ckpt"], flush=True)

    r = out / "sigterm"
    results["sigterm"] = sigterm_loop(cfg, r, rng, args.sigterms)
    results["sigterm"]["identical_to_straight"] = same(ref, r)
    results["sigterm"].update(leftovers(r))
    print("sigterm", results["sigterm"], flush=True)

    # corrupt the newest checkpoint: one flipped byte in a random file, then resume
    corrupt = []
    for i in range(args.corruptions):
        r = out / f"corrupt_{i}"
        stop = rng.choice(range(4, args.steps, 2))
        subprocess.run(cmd(cfg, r, "--train.steps", str(stop)), cwd=REPO, env=env(), check=True, capture_output=True)
        latest = sorted((r / "checkpoints").glob("step_*"))[-1]
        files = sorted(p for p in latest.rglob("*") if p.is_file())
        victim = rng.choice(files)
        data = bytearray(victim.read_bytes())
        data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        victim.write_bytes(bytes(data))
        p = subprocess.run(cmd(cfg, r, "--resume", "latest"), cwd=REPO, env=env(), capture_output=True, text=True)
        corrupt.append({"file": str(victim.relative_to(r)), "fell_back": "falling back to" in p.stderr,
                        "ok": p.returncode == 0 and same(ref, r)})
    results["corrupt"] = corrupt
    print("corrupt", corrupt, flush=True)

    # non-finite: scattered faults are skipped; a streak stops the run, which then resumes
    r = out / "nonfinite"
    calls = rng.sample(range(2, args.steps), 3)
    faults = [{"call": c, "fault": k} for c, k in zip(calls, ("nan_loss", "inf_loss", "nan_grad"), strict=True)]
    p = subprocess.run(cmd(cfg, r), cwd=REPO, env=env(faults), capture_output=True, text=True)
    res = json.loads((r / "final" / "result.json").read_text()) if p.returncode == 0 else {}
    r2 = out / "nonfinite_streak"
    streak = [{"call": c, "fault": "nan_loss"} for c in range(7, 12)]
    p2 = subprocess.run(cmd(cfg, r2), cwd=REPO, env=env(streak), capture_output=True, text=True)
    p3 = subprocess.run(cmd(cfg, r2, "--resume", "latest"), cwd=REPO, env=env(), capture_output=True, text=True)
    results["nonfinite"] = {
        "injected": faults, "completed": p.returncode == 0, "skipped_steps": res.get("skipped_steps"),
        "streak_exit_code": p2.returncode, "streak_message": p2.stderr.strip().splitlines()[-1] if p2.stderr else "",
        "resumed_after_streak": p3.returncode == 0,
    }
    print("nonfinite", results["nonfinite"], flush=True)
    results["wall_s"] = round(time.time() - t0, 1)
    (out / "summary.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
