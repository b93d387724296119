"""Non-finite loss or gradient: the update is skipped and counted; K in a row stop the run with a
message naming the last good checkpoint."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from diffalign.cli import main as cli_main
from diffalign.config import load_config
from diffalign.training import loop, train
from diffalign.training.loop import NonFiniteError
from tests import faults


def _inject(monkeypatch, spec):
    monkeypatch.setattr(loop, "build_objective", faults.faulty_builder(loop.build_objective, spec, rank=0))


def _ckpt_lora(run, step):
    return load_file(str(run / "checkpoints" / f"step_{step:08d}" / "lora" / "pytorch_lora_weights.safetensors"))


@pytest.mark.parametrize("kind", ["nan_loss", "inf_loss", "nan_grad"])
def test_nonfinite_step_is_skipped_counted_and_leaves_the_weights_alone(kind, tmp_path, h, monkeypatch):
    cfg = h.write_config(tmp_path, steps=4, checkpoint_every=1, keep_checkpoints=0)
    _inject(monkeypatch, [{"call": 2, "fault": kind}, {"call": 3, "fault": kind}])
    res = train(load_config(cfg))
    run = tmp_path / "run"
    assert res["status"] == "completed" and res["step"] == 4 and res["skipped_steps"] == 2
    log = {m["step"]: m for m in h.metrics(run)}
    assert [log[s]["skipped_steps"] for s in (1, 2, 3, 4)] == [0, 1, 2, 2]
    assert "loss" not in log[2] or kind == "nan_grad"  # a non-finite loss is not averaged into the curve
    w1, w3, w4 = _ckpt_lora(run, 1), _ckpt_lora(run, 3), _ckpt_lora(run, 4)
    for k in w1:
        assert torch.equal(w1[k], w3[k]), k  # steps 2 and 3 did not move the weights (nor Adam's state)
        assert torch.isfinite(w4[k]).all()
    assert any(not torch.equal(w3[k], w4[k]) for k in w3)  # step 4 trained normally


def test_k_nonfinite_steps_in_a_row_stop_with_the_last_good_checkpoint(tmp_path, h, monkeypatch):
    cfg = h.write_config(tmp_path, steps=10, checkpoint_every=2, max_nonfinite_steps=3)
    # one isolated fault (reset by a good step), then three in a row; step 4's checkpoint is taken
    # inside the streak, so the last good one is step 2's
    _inject(monkeypatch, [{"call": 1, "fault": "nan_loss"}] +
            [{"call": c, "fault": "nan_loss"} for c in (3, 4, 5)])
    with pytest.raises(NonFiniteError) as e:
        train(load_config(cfg))
    msg = str(e.value)
    assert "3 steps in a row (up to step 5)" in msg
    assert "max_nonfinite_steps=3" in msg
    assert "last good checkpoint: " in msg and msg.split("last good checkpoint: ")[1].startswith(
        str(tmp_path / "run" / "checkpoints" / "step_00000002"))
    assert not (tmp_path / "run" / "final").exists()


def test_nonfinite_stop_before_any_checkpoint_says_so(tmp_path, h, monkeypatch):
    cfg = h.write_config(tmp_path, steps=10, checkpoint_every=5, max_nonfinite_steps=2)
    _inject(monkeypatch, [{"call": 1, "fault": "nan_loss"}, {"call": 2, "fault": "inf_loss"}])
    with pytest.raises(NonFiniteError, match="no checkpoint was saved yet"):
        train(load_config(cfg))


def test_cli_exit_status_and_message(tmp_path, h, monkeypatch, capsys):
    cfg = h.write_config(tmp_path, steps=10, checkpoint_every=1, max_nonfinite_steps=2)
    _inject(monkeypatch, [{"call": 2, "fault": "nan_loss"}, {"call": 3, "fault": "nan_loss"}])
    rc = cli_main(["train", str(cfg)])
    err = capsys.readouterr().err
    assert rc == 3
    assert "diffalign train: stopped: 2 steps in a row" in err and "step_00000001" in err


def test_skipped_count_survives_a_resume(tmp_path, h, monkeypatch):
    cfg = h.write_config(tmp_path, steps=4, checkpoint_every=1)
    _inject(monkeypatch, [{"call": 2, "fault": "nan_loss"}])
    train(load_config(cfg, ["--train.steps", "3"]))
    monkeypatch.undo()
    res = train(load_config(cfg), resume="latest")
    assert res["skipped_steps"] == 1 and h.metrics(tmp_path / "run")[-1]["skipped_steps"] == 1
