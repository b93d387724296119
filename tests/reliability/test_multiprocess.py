"""Two CPU processes (gloo): the literal ``accelerate launch --num_processes 2 --cpu`` command, the same
numbers as one process with the same global batch, one writer, and agreed skip/stop decisions."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch

from diffalign.config import load_config
from diffalign.training import checkpoints as ckpt
from diffalign.training import train


def _launch(h, args, faults=None, config_file=None, timeout=300):
    cmd = [h.accelerate_bin(), "launch"]
    cmd += ["--config_file", config_file] if config_file else ["--num_processes", "2", "--cpu"]
    module = "tests.faults" if faults else "diffalign.cli"
    env = h.cli_env(DIFFALIGN_FAULTS=json.dumps(faults)) if faults else h.cli_env()
    return subprocess.run([*cmd, "-m", module, *args], cwd=h.REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path, h):
    """2 processes x batch 2 == 1 process x batch 2 x 2 accumulated micro-batches (global batch 4).

    With ``train.rng: per_batch`` the noise of micro-batch g is seeded by (seed, g), and process r of P
    at accumulation step k takes loader batch (step*A + k)*P + r in both runs, so the two runs see the
    same data and noise; they differ only in how the gradient is summed (an all-reduce vs
    accumulation). Measured here: identical to the last bit; the tolerance allows rounding
    differences of other all-reduce implementations."""
    cfg = h.write_config(tmp_path, steps=4, checkpoint_every=2, sample_every=2, rng="per_batch")
    two, one = tmp_path / "two", tmp_path / "one"
    r = _launch(h, ["train", str(cfg), "--train.output_dir", str(two)])
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert "starting 2 CPU processes" in r.stderr
    assert r.stdout.count("done: step 4") == 1  # only the main process reports

    train(load_config(cfg, ["--train.output_dir", str(one), "--train.grad_accum", "2"]))
    a, b = h.metrics(one), h.metrics(two)
    assert [m["step"] for m in b] == [1, 2, 3, 4]  # one writer: each step once
    for x, y in zip(a, b, strict=True):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-5, abs=1e-7)
        assert y["grad_norm"] == pytest.approx(x["grad_norm"], rel=1e-5)
    assert abs(a[-1]["loss"] - a[0]["loss"]) > 1e-3  # the compared losses moved
    wa, wb = h.lora(one), h.lora(two)
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-5, atol=1e-7)

    # one writer: the main process creates and completes checkpoints; the other adds its RNG file only
    state = sorted(p.name for p in (two / "checkpoints" / "step_00000004" / "state").iterdir())
    assert state == ["model.safetensors", "optimizer.bin", "random_states_0.pkl", "random_states_1.pkl",
                     "scheduler.bin"]
    ckpt.verify_checkpoint(two / "checkpoints" / "step_00000004")
    assert len(list((two / "logs").rglob("events.out.tfevents*"))) == 1
    assert sorted(p.name for p in (two / "samples").iterdir()) == ["final.png", "step_00000002.png"]


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_nan_and_sigterm_on_one_process_are_agreed_by_both(tmp_path, h):
    """A NaN loss on process 1 only makes both skip the update (else DDP would hang or diverge); a
    SIGTERM to process 1 only makes both stop at the same step and save one checkpoint."""
    cfg = h.write_config(tmp_path, steps=8, checkpoint_every=0)
    run = tmp_path / "run"
    r = _launch(h, ["train", str(cfg), "--train.output_dir", str(run)],
                faults=[{"call": 2, "fault": "nan_loss", "rank": 1}, {"call": 4, "fault": "sigterm", "rank": 1}],
                config_file=str(h.REPO / "configs" / "accelerate" / "cpu.yaml"))
    out = r.stdout + r.stderr
    assert "interrupted by SIGTERM at step 4/8" in out, out[-4000:]
    assert out.count("interrupted by SIGTERM") == 1  # reported by the main process only
    assert out.count("update skipped") == 1
    # workers exit 128+15 after saving; torchrun reports that as a failed run (it did not complete)
    assert r.returncode != 0 and "exitcode  : 143" in out
    log = h.metrics(run)
    assert [m["step"] for m in log] == [1, 2, 3, 4]
    assert [m["skipped_steps"] for m in log] == [0, 1, 1, 1]
    saved = ckpt.list_checkpoints(run)
    assert [p.name for p in saved] == ["step_00000004"]
    ckpt.verify_checkpoint(saved[0])
    assert {"random_states_0.pkl", "random_states_1.pkl"} <= {p.name for p in (saved[0] / "state").iterdir()}
