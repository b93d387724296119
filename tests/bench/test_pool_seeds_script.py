"""scripts/pool_seeds.py: runs made apart pooled into one paired interval per metric."""

import importlib.util
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("pool_seeds_script", ROOT / "scripts" / "pool_seeds.py")
pool_seeds = importlib.util.module_from_spec(spec)
spec.loader.exec_module(pool_seeds)


def test_pooled_gain_is_the_mean_over_every_run_and_sample(tmp_path, capsys):
    base = {"toy_shape": torch.tensor([0.0, 1.0, 0.0, 1.0])}
    torch.save(base, tmp_path / "base.pt")
    runs = []
    for i, s in enumerate(([1.0, 1.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0])):
        (tmp_path / f"r{i}").mkdir()
        torch.save({"toy_shape": torch.tensor(s)}, tmp_path / f"r{i}" / "scores.pt")
        runs += ["--run", str(tmp_path / f"r{i}")]
    assert pool_seeds.main(["--base", str(tmp_path / "base.pt"), *runs, "--metrics", "toy_shape,toy_color"]) == 0
    out = capsys.readouterr().out
    assert "toy_shape: +0.375 [" in out  # (0.25 + 0.5) / 2 over the 8 paired samples
    assert "per run +0.250, +0.500" in out
    assert "toy_color: not in every score file" in out


def test_a_run_without_scores_is_named(tmp_path):
    torch.save({"toy_shape": torch.zeros(2)}, tmp_path / "base.pt")
    with pytest.raises(SystemExit):
        pool_seeds.main(["--base", str(tmp_path / "base.pt"), "--run", str(tmp_path / "nothing")])
