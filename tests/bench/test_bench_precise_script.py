"""scripts/bench_precise.py: per-objective seed counts and the target's gain split by scene size."""

import importlib.util
from pathlib import Path

import pytest
import torch

from diffalign.bench.precise import Protocol, gain_by_scene
from diffalign.toyworld.shapes import parse_caption

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("bench_precise", ROOT / "scripts" / "bench_precise.py")
bench_precise = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench_precise)


def test_by_scene_splits_the_gain_by_object_count():
    proto = Protocol(prompts=16, seeds=2)
    one = torch.tensor([len(parse_caption(c).objects) == 1 for c in proto.captions()])
    assert one.any() and (~one).any()
    base = torch.zeros(proto.n)
    run = torch.where(one, 1.0, 0.0)  # the model gains 1 on one-object prompts only
    rep = gain_by_scene(base, [run], proto, n_boot=50)
    assert rep["1 object"]["mean"] == pytest.approx(1.0) and rep["1 object"]["n"] == int(one.sum())
    assert rep["2 objects"]["mean"] == pytest.approx(0.0) and rep["2 objects"]["n"] == int((~one).sum())


def test_a_bad_seed_count_is_refused_before_any_work(tmp_path, capsys):
    with pytest.raises(SystemExit):
        bench_precise.main(["--base", str(tmp_path / "none"), "--out", str(tmp_path / "out"), "--objectives", "dpo:x"])
    assert "'dpo:x'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("spec", ["dpo", "dpo:mapo", "dpo:inpo:x"])
def test_a_bad_compare_is_refused_before_any_work(tmp_path, capsys, spec):
    with pytest.raises(SystemExit):
        bench_precise.main(["--base", str(tmp_path / "none"), "--out", str(tmp_path / "out"),
                            "--objectives", "dpo,inpo", "--compare", spec])
    assert "--compare" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
