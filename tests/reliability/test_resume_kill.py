"""Exact resume after kill -9: N steps straight == N/2-ish steps, kill -9, resume to N (bit for bit on CPU).

The killed run is a real ``diffalign train`` process. It is held (by an injected sleep inside step 7)
after it has checkpointed step 4 and logged step 6, then killed with SIGKILL from here: no handler
runs, nothing is flushed or cleaned. The resume must drop the two steps logged after the checkpoint,
redo them, and end with the weights and the loss curve of an uninterrupted run.
"""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest

from diffalign.config import load_config
from diffalign.training import train


@pytest.mark.slow
@pytest.mark.timeout(400)
@pytest.mark.parametrize("objective", ["dpo", "dro"])
def test_kill9_then_resume_matches_a_straight_run(objective, tmp_path, h):
    cfg = h.write_config(tmp_path, objective, steps=8, checkpoint_every=4)
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    train(load_config(cfg, ["--train.output_dir", str(straight)]))

    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.faults", "train", str(cfg), "--train.output_dir", str(killed)],
        cwd=h.REPO, env=h.cli_env(DIFFALIGN_FAULTS='[{"call": 7, "fault": "sleep", "seconds": 600}]'),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        step4 = killed / "checkpoints" / "step_00000004" / "diffalign_checkpoint.json"
        log = killed / "metrics.jsonl"
        h.wait_for(lambda: step4.is_file() and log.is_file() and len(log.read_text().splitlines()) >= 6,
                   timeout=240, proc=proc, what="checkpoint step 4 and 6 logged steps")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert not (killed / "final").exists()
    assert [m["step"] for m in h.metrics(killed)] == [1, 2, 3, 4, 5, 6]  # logged past the checkpoint

    r = h.run_cli(["train", str(cfg), "--train.output_dir", str(killed), "--resume", "latest"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stdout + r.stderr and "step_00000004" in r.stdout + r.stderr
    h.assert_same_weights(h.lora(straight), h.lora(killed))
    a, b = h.metrics(straight), h.metrics(killed)
    assert [m["step"] for m in b] == list(range(1, 9))  # steps 5-6 of the killed run were dropped and redone
    assert [m["loss"] for m in a] == [m["loss"] for m in b]
    assert not list((killed / "checkpoints").glob(".tmp_*"))
