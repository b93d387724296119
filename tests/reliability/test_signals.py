"""SIGTERM / SIGINT: finish the step, save a checkpoint, exit cleanly; resume loses nothing."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest

from diffalign.config import load_config
from diffalign.training import checkpoints as ckpt
from diffalign.training import loop, train
from tests import faults


def _inject(monkeypatch, spec):
    monkeypatch.setattr(loop, "build_objective", faults.faulty_builder(loop.build_objective, spec, rank=0))


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_sigterm_saves_exits_cleanly_and_resume_matches_a_straight_run(tmp_path, h):
    cfg = h.write_config(tmp_path, steps=6, checkpoint_every=0)  # no periodic checkpoint: only the signal's
    straight, run = tmp_path / "straight", tmp_path / "run"
    train(load_config(cfg, ["--train.output_dir", str(straight)]))

    # step 3 sleeps 3 s inside the loss; SIGTERM arrives then, from outside
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.faults", "train", str(cfg), "--train.output_dir", str(run)],
        cwd=h.REPO, env=h.cli_env(DIFFALIGN_FAULTS='[{"call": 3, "fault": "sleep", "seconds": 3}]'),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    log = run / "metrics.jsonl"
    h.wait_for(lambda: log.is_file() and len(log.read_text().splitlines()) >= 2, 240, None, "two logged steps")
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "Traceback" not in err
    assert "interrupted by SIGTERM at step 3/6" in err
    assert f"--train.output_dir {run} --resume latest" in err  # the command to continue, overrides kept
    saved = ckpt.list_checkpoints(run)
    assert [p.name for p in saved] == ["step_00000003"]
    ckpt.verify_checkpoint(saved[0])
    assert not (run / "final").exists()

    r = h.run_cli(["train", str(cfg), "--train.output_dir", str(run), "--resume", "latest"])
    assert r.returncode == 0, r.stderr[-3000:]
    h.assert_same_weights(h.lora(straight), h.lora(run))
    assert [m["loss"] for m in h.metrics(straight)] == [m["loss"] for m in h.metrics(run)]


def test_sigint_in_process_saves_returns_and_restores_handlers(tmp_path, h, monkeypatch):
    cfg = h.write_config(tmp_path, steps=6, checkpoint_every=0)
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    _inject(monkeypatch, [{"call": 2, "fault": "sigint"}])
    res = train(load_config(cfg))
    assert res["status"] == "interrupted" and res["signal"] == "SIGINT" and res["step"] == 2
    assert res["checkpoint"].endswith("step_00000002")
    ckpt.verify_checkpoint(res["checkpoint"])
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
    assert not (tmp_path / "run" / "final").exists()


def test_second_ctrl_c_aborts_at_once(tmp_path, h, monkeypatch):
    cfg = h.write_config(tmp_path, steps=6, checkpoint_every=0)
    before = signal.getsignal(signal.SIGINT)
    _inject(monkeypatch, [{"call": 2, "fault": "sigint"}, {"call": 2, "fault": "sigint"}])
    with pytest.raises(KeyboardInterrupt):
        train(load_config(cfg))
    assert signal.getsignal(signal.SIGINT) == before
    assert ckpt.list_checkpoints(tmp_path / "run") == []  # aborted: nothing half-written either
    assert not list((tmp_path / "run").rglob(".tmp_*"))


def test_repeated_sigterm_is_absorbed(tmp_path, h, monkeypatch):
    cfg = h.write_config(tmp_path, steps=6, checkpoint_every=0)
    _inject(monkeypatch, [{"call": 3, "fault": "sigterm"}, {"call": 3, "fault": "sigterm"}])
    res = train(load_config(cfg))
    assert res["status"] == "interrupted" and res["signal"] == "SIGTERM" and res["step"] == 3


def test_signal_during_setup_stops_before_the_first_step(tmp_path, h, monkeypatch):
    cfg = h.write_config(tmp_path, steps=3)
    real = loop.build_dataset

    def dataset_then_signal(*a, **k):
        out = real(*a, **k)
        signal.raise_signal(signal.SIGTERM)  # arrives while the run is still being set up
        return out

    monkeypatch.setattr(loop, "build_dataset", dataset_then_signal)
    res = train(load_config(cfg))
    assert res["status"] == "interrupted" and res["step"] == 0 and res["checkpoint"] is None
    assert ckpt.list_checkpoints(tmp_path / "run") == []
