"""The training step reads nothing on the host: the non-finite check and the metrics stay tensors until
the logging step, the skip of a bad update happens on the device, and the results equal the synced loop's."""

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diffalign.config import RunConfig
from diffalign.training import loop, train
from diffalign.training.loop import guarded_step

from ..helpers import write_pairs

READS = ("__bool__", "item", "__float__", "__int__", "tolist")
TRAINING = str(Path(loop.__file__).parent)


def _cfg(tmp_path: Path, name: str, steps: int, log_every: int) -> RunConfig:
    return RunConfig.model_validate({
        "model": {"path": "tiny:sd15", "resolution": 32, "lora_rank": 4},
        "data": {"train": str(write_pairs(tmp_path / "pairs", n=8)), "prompt_dropout": 0.3},
        "train": {"output_dir": str(tmp_path / name), "batch_size": 2, "lr": 1e-3, "steps": steps,
                  "log_every": log_every, "checkpoint_every": 0, "sample_every": 0, "sample_steps": 1,
                  "progress": False, "checkpoint_checksums": False},
    })


def _count_training_reads(monkeypatch) -> dict[str, int]:
    """Count the tensor reads (host syncs on a GPU) made by code in diffalign/training/."""
    counts = dict.fromkeys(READS, 0)
    for name in READS:
        real = getattr(torch.Tensor, name)

        def spy(self, *a, _real=real, _name=name, **k):
            if sys._getframe(1).f_code.co_filename.startswith(TRAINING):
                counts[_name] += 1
            return _real(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, spy)
    return counts


def test_no_host_read_per_step(tmp_path, monkeypatch):
    on_device = []
    real_checks = loop.deferred_checks
    monkeypatch.setattr(loop, "deferred_checks", lambda *a: on_device.append(real_checks(*a)) or on_device[-1])
    monkeypatch.setattr(loop, "sample_grid", lambda *a, **k: None)
    counts = _count_training_reads(monkeypatch)
    per_run = []
    for steps in (2, 6):  # one log at the end of each run: the reads must not grow with the steps
        train(_cfg(tmp_path, f"run{steps}", steps, log_every=100))
        per_run.append(dict(counts))
        counts.update(dict.fromkeys(READS, 0))
    assert on_device == [True, True]
    assert per_run[0] == per_run[1], per_run
    assert sum(per_run[0].values()) <= 3  # the flush of the skip flags and the metric window: one read each


def test_sync_free_loop_gives_the_same_losses_and_weights(tmp_path, monkeypatch):
    monkeypatch.setattr(loop, "sample_grid", lambda *a, **k: None)
    train(_cfg(tmp_path, "free", 4, log_every=1))
    monkeypatch.setattr(loop, "deferred_checks", lambda *a: False)
    train(_cfg(tmp_path, "synced", 4, log_every=1))
    logs = {}
    for name in ("free", "synced"):
        rows = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        logs[name] = [{k: v for k, v in r.items() if k != "steps_per_s"} for r in rows]
    assert logs["free"] == logs["synced"]
    assert all("grad_norm" in r and "loss" in r for r in logs["free"])
    a = load_file(str(tmp_path / "free" / "final" / "lora" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(tmp_path / "synced" / "final" / "lora" / "pytorch_lora_weights.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("first_bad", [True, False])
def test_guarded_step_undoes_a_bad_update_exactly(first_bad):
    torch.manual_seed(0)
    w = [torch.nn.Parameter(torch.randn(3, 4)), torch.nn.Parameter(torch.randn(4))]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in w]
    opt, ref_opt = torch.optim.AdamW(w, lr=0.1), torch.optim.AdamW(ref, lr=0.1)
    grads = [[torch.randn_like(p) for p in w] for _ in range(3)]

    def step(o, ps, g, bad=None):
        for p, x in zip(ps, g, strict=True):
            p.grad = x.clone()
        if bad is None:
            o.step()
        else:
            guarded_step(o, torch.tensor(bad))
        o.zero_grad()

    if not first_bad:
        step(opt, w, grads[0], bad=False)
        step(ref_opt, ref, grads[0])
    step(opt, w, [torch.full_like(p, float("nan")) for p in w], bad=True)  # undone, state included
    for g in grads[1:]:
        step(opt, w, g, bad=False)
        step(ref_opt, ref, g)
    for p, q in zip(w, ref, strict=True):
        assert torch.equal(p, q)
        for k, v in opt.state[p].items():
            assert torch.equal(v, ref_opt.state[q][k]), k
