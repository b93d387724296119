"""scripts/bench_personalization.py: flags refused before any work, the inference-setting tag, the interval."""

import importlib.util
from argparse import Namespace
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("bench_personalization", ROOT / "scripts" / "bench_personalization.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


@pytest.mark.parametrize(("argv", "msg"), [(["--train-lora"], "--probe"), (["--negative", "both"], "--negative"),
                                           (["--encoder", "pixels"], "--encoder")])
def test_bad_flags_are_refused_before_any_work(tmp_path, capsys, argv, msg):
    with pytest.raises(SystemExit):
        bench.main(["--out", str(tmp_path / "out"), *argv])
    assert msg in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_each_inference_setting_has_its_own_caches():
    assert bench.eval_tag(Namespace(scale=1.0, negative="same")) == ""  # the first run's caches stay valid
    assert bench.eval_tag(Namespace(scale=1.0, negative="zero")) == "_scale1_zero"
    assert bench.eval_tag(Namespace(scale=2.0, negative="same")) == "_scale2_same"


def test_bootstrap_interval_pools_seeds_and_covers_the_mean():
    wins = torch.tensor([[1.0, 0.0, 1.0, 1.0] * 16, [1.0, 1.0, 0.0, 1.0] * 16])
    mean, lo, hi = bench.bootstrap_ci(wins, n=500)
    assert mean == pytest.approx(0.75) and lo < mean < hi and 0.5 < lo and hi < 1.0
