"""The run folder: one run at a time, earlier results never silently replaced, finished runs left
alone, config changes on resume stated key by key (issue #17's data-loss cases)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import yaml

from diffalign.training import runfolder as rf


def _lock_of(pid: int, host: str | None = None) -> str:
    return json.dumps({"pid": pid, "host": host or socket.gethostname(), "started": "earlier"})


def test_second_run_into_a_locked_folder_is_refused(tmp_path):
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / rf.LOCK).write_text(_lock_of(other.pid))
        with pytest.raises(rf.RunFolderError, match=rf"another diffalign run \(PID {other.pid}, started earlier\)"):
            rf.acquire(tmp_path)
        assert json.loads((tmp_path / rf.LOCK).read_text())["pid"] == other.pid  # the live lock is untouched
    finally:
        other.kill()
        other.wait()


def test_lock_of_a_dead_process_is_taken_over_with_a_warning(tmp_path, caplog):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / rf.LOCK).write_text(_lock_of(dead.pid))
    with caplog.at_level("WARNING"), rf.lock(tmp_path):
        assert json.loads((tmp_path / rf.LOCK).read_text())["pid"] == os.getpid()
    assert f"taking over the lock of PID {dead.pid}, which is no longer running" in caplog.text
    assert not (tmp_path / rf.LOCK).exists()  # released at the end


def test_lock_from_another_host_names_the_file_to_remove(tmp_path):
    (tmp_path / rf.LOCK).write_text(_lock_of(12345, host="elsewhere"))
    with pytest.raises(rf.RunFolderError, match=rf"on elsewhere \(PID 12345.*remove {tmp_path / rf.LOCK}"):
        rf.acquire(tmp_path)


def test_unwritable_run_folder_names_the_key_and_path(tmp_path, monkeypatch):
    def refuse(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(rf.os, "open", refuse)
    with pytest.raises(rf.RunFolderError, match=rf"train.output_dir: cannot write to the run folder {tmp_path}: "
                                                r"the folder is read-only"):
        rf.acquire(tmp_path)


def test_fresh_run_into_earlier_results_is_refused_unless_overwrite(tmp_path, caplog):
    rf.check_fresh(tmp_path)  # empty: fine
    (tmp_path / "final").mkdir()
    (tmp_path / "final" / "result.json").write_text("{}")
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    (tmp_path / "config.yaml").write_text("a: 1\n")
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(rf.RunFolderError, match=r"earlier run's results \(final/, metrics.jsonl\).*--overwrite"):
        rf.check_fresh(tmp_path)
    assert (tmp_path / "final" / "result.json").exists()
    with caplog.at_level("WARNING"):
        rf.check_fresh(tmp_path, overwrite=True)
    assert not (tmp_path / "final").exists() and not (tmp_path / "metrics.jsonl").exists()
    assert not (tmp_path / "config.yaml").exists() and (tmp_path / "notes.txt").read_text() == "mine"
    assert "removed the earlier run's final/, metrics.jsonl" in caplog.text


def test_completed_result(tmp_path):
    assert rf.completed_result(tmp_path, 4) is None
    (tmp_path / "final").mkdir()
    (tmp_path / "final" / "result.json").write_text(json.dumps({"status": "completed", "step": 4, "metrics": {"loss": 1}}))
    assert rf.completed_result(tmp_path, 4)["metrics"] == {"loss": 1}
    assert rf.completed_result(tmp_path, 8) is None  # more steps asked for: the run continues


class _Cfg:
    def __init__(self, d):
        self.d = d

    def model_dump(self, mode="json"):
        return self.d


def test_config_on_resume_kept_and_changes_stated(tmp_path, caplog):
    base = {"objective": {"name": "dpo", "beta": 5000.0}, "train": {"steps": 4, "lr": 0.001}}
    assert rf.write_config(_Cfg(base), tmp_path, resuming=False) == tmp_path / "config.yaml"
    original = (tmp_path / "config.yaml").read_text()
    assert rf.write_config(_Cfg(base), tmp_path, resuming=True) is None  # unchanged: nothing written
    longer = {**base, "train": {"steps": 8, "lr": 0.001}}
    with caplog.at_level("WARNING"):
        assert rf.write_config(_Cfg(longer), tmp_path, resuming=True) == tmp_path / "config.resume-1.yaml"
    assert "train.steps: 4 -> 8" in caplog.text
    beta = {**base, "objective": {"name": "dpo", "beta": 2500.0}}
    with pytest.raises(rf.RunFolderError, match=r"objective.beta: 5000.0 -> 2500.0.*--allow-config-change"):
        rf.write_config(_Cfg(beta), tmp_path, resuming=True)
    assert rf.write_config(_Cfg(beta), tmp_path, resuming=True, allow_config_change=True).name == "config.resume-2.yaml"
    assert (tmp_path / "config.yaml").read_text() == original  # never rewritten
    assert yaml.safe_load((tmp_path / "config.resume-2.yaml").read_text())["objective"]["beta"] == 2500.0


# --- through `diffalign train` -------------------------------------------------------------------------
def _cli(args):
    from diffalign.cli import main

    return main(args)


def test_finished_runs_are_not_rewritten_and_resume_states_config_changes(tmp_path, h, capsys):
    cfg = h.write_config(tmp_path, steps=4)
    run = tmp_path / "run"
    assert _cli(["train", str(cfg)]) == 0
    result = (run / "final" / "result.json").read_bytes()
    config = (run / "config.yaml").read_bytes()
    capsys.readouterr()

    # resuming a finished run: says so, exits 0, rewrites nothing
    mtime = (run / "final" / "result.json").stat().st_mtime_ns
    assert _cli(["train", str(cfg), "--resume", "latest"]) == 0
    assert "already complete" in capsys.readouterr().out
    assert (run / "final" / "result.json").read_bytes() == result
    assert (run / "final" / "result.json").stat().st_mtime_ns == mtime

    # a finished run asked for with another objective: its old result is not handed back
    assert _cli(["train", str(cfg), "--resume", "auto", "--objective.beta", "2500"]) == 2
    assert "finished run trained with another config (objective.beta: 5000.0 -> 2500.0)" in capsys.readouterr().err

    # a changed objective hyperparameter: refused, key by key; config.yaml kept
    assert _cli(["train", str(cfg), "--resume", "latest", "--train.steps", "6", "--objective.beta", "2500"]) == 2
    err = capsys.readouterr().err
    assert "objective.beta: 5000.0 -> 2500.0" in err and "train.steps: 4 -> 6" in err and "--allow-config-change" in err
    assert (run / "config.yaml").read_bytes() == config and not (run / "config.resume-1.yaml").exists()

    # more steps: allowed, stated, and the new config written beside the original
    assert _cli(["train", str(cfg), "--resume", "latest", "--train.steps", "6"]) == 0
    assert "done: step 6" in capsys.readouterr().out
    assert (run / "config.yaml").read_bytes() == config
    assert yaml.safe_load((run / "config.resume-1.yaml").read_text())["train"]["steps"] == 6
    assert [m["step"] for m in h.metrics(run)] == [1, 2, 3, 4, 5, 6]


def test_fresh_run_into_a_finished_folder_without_checkpoints_is_refused(tmp_path, h, capsys):
    import shutil

    cfg = h.write_config(tmp_path, steps=2, checkpoint_every=0)
    run = tmp_path / "run"
    assert _cli(["train", str(cfg)]) == 0
    shutil.rmtree(run / "checkpoints")
    before = {p: p.read_bytes() for p in (run / "final" / "result.json", run / "metrics.jsonl")}
    capsys.readouterr()
    assert _cli(["train", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert f"{run}: holds an earlier run's results (final/, metrics.jsonl" in err and "--overwrite" in err
    assert _cli(["train", str(cfg), "--resume", "auto"]) == 0  # the finished run is left as it is
    assert "already complete" in capsys.readouterr().out
    assert all(p.read_bytes() == b for p, b in before.items())


def test_two_runs_into_one_folder_the_second_is_refused(tmp_path, h, capsys):
    cfg = h.write_config(tmp_path, steps=400, checkpoint_every=0)
    first = subprocess.Popen([sys.executable, "-m", "diffalign.cli", "train", str(cfg)], cwd=h.REPO,
                             env=h.cli_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        h.wait_for(lambda: (tmp_path / "run" / "metrics.jsonl").exists(), 180, first, "the first run's first step")
        assert _cli(["train", str(cfg), "--resume", "auto"]) == 2
        err = capsys.readouterr().err
        assert f"another diffalign run (PID {first.pid}" in err and "is writing to this folder" in err
        assert first.poll() is None  # the first run goes on
    finally:
        first.kill()
        first.wait()
    # killed -9: its lock is left behind, and taken over by the next run with a warning
    assert json.loads((tmp_path / "run" / rf.LOCK).read_text())["pid"] == first.pid


def test_disk_full_while_checkpointing_is_one_line_naming_the_path(tmp_path, h, capsys, monkeypatch):
    import errno

    from diffalign.training import loop

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(loop, "save_extra_state", full)
    cfg = h.write_config(tmp_path, steps=4, checkpoint_every=2)
    assert _cli(["train", str(cfg)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("diffalign train: error: cannot write checkpoint ")
    assert ".tmp_step_00000002: no space left on device" in err[-1]
