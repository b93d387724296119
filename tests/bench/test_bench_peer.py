"""scripts/bench_peer.py: the pairs both contenders read, the equivalent settings, the timing source."""

import argparse
import importlib.util
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from diffalign.data.pairs import PreferencePairs

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("bench_peer", ROOT / "scripts" / "bench_peer.py")
bench_peer = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench_peer)


def _args(**kw):
    a = dict(peer_script=Path("/x/train_diffusion_dpo.py"), resolution=32, batch=8, rank=4, beta=5000.0, lr=1e-5,
             log_every=5, ours_fastest="cache")
    a.update(kw)
    return argparse.Namespace(**a)


def test_pairs_are_pick_a_pic_parquet_that_both_read(tmp_path):
    path = bench_peer.write_pairs(tmp_path / "data", n=6, size=32)
    table = pq.read_table(path)
    assert set(table.column_names) == {"caption", "label_0", "jpg_0", "jpg_1"}  # what the script's preprocess reads
    assert str(table.schema.field("jpg_0").type) == "binary"
    ds = PreferencePairs(str(path), resolution=32)
    assert len(ds) == 6 and ds[0]["pixels_w"].shape == (3, 32, 32)


def test_same_settings_and_the_equivalent_beta(tmp_path):
    peer = bench_peer.peer_command(_args(), Path("/m"), tmp_path, tmp_path / "p", 25, fast=False)
    flags = dict(zip(peer[2::2], peer[3::2], strict=False))
    assert flags["--beta_dpo"] == "2500"  # ours is the beta/2 form
    assert flags["--rank"] == "4" and flags["--train_batch_size"] == "8" and flags["--resolution"] == "32"
    assert "--vae_encode_batch_size" not in flags
    ours = bench_peer.ours_command(_args(), Path("/m"), tmp_path / "d.parquet", tmp_path / "o", 25, True,
                                   tmp_path / "cache")
    import yaml

    cfg = yaml.safe_load(Path(ours[-1]).read_text())
    assert cfg["objective"]["beta"] == 5000.0 and cfg["model"]["lora_rank"] == 4
    assert cfg["data"]["prompt_dropout"] == 0.0 and cfg["data"]["cache_dir"] == str(tmp_path / "cache")


def test_rate_comes_from_tensorboard_wall_times(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    w = SummaryWriter(str(tmp_path / "run" / "logs"))
    for step, wall in [(5, 100.0), (10, 101.0), (25, 104.0)]:
        w.add_scalar("loss", 0.5, step, walltime=wall)
    w.close()
    assert bench_peer.loss_walltimes(tmp_path / "run") == {5: 100.0, 10: 101.0, 25: 104.0}


@pytest.mark.parametrize("extra, flag", [(["--settings", "fast"], "--settings"), (["--log-every", "0"], "--log-every"),
                                         (["--warmup", "25"], "--warmup"), (["--repeats", "0"], "--repeats"),
                                         (["--ours-fastest", "cache+fp8"], "--ours-fastest"),
                                         (["--peer-fastest", "fp16"], "--peer-fastest")])
def test_bad_flags_are_errors_naming_them(tmp_path, capsys, extra, flag):
    script = tmp_path / "train_diffusion_dpo.py"
    script.write_text("")
    with pytest.raises(SystemExit):
        bench_peer.main(["--peer-script", str(script), "--work", str(tmp_path / "work"), *extra])
    assert flag in capsys.readouterr().err
    assert not (tmp_path / "work").exists()


def test_each_at_its_fastest_with_bf16_on_both_sides(tmp_path):
    """--peer-fastest bf16: the script's own --mixed_precision bf16 (it then casts the frozen weights to bf16);
    --ours-fastest ...+bf16+frozen_bf16: our autocast and frozen base weights in bf16. Only at "fastest"."""
    a = _args(peer_fastest="bf16", ours_fastest="cache+bf16+frozen_bf16")
    peer = bench_peer.peer_command(a, Path("/m"), tmp_path, tmp_path / "p", 25, fast=True)
    flags = dict(zip(peer[2::2], peer[3::2], strict=False))
    assert flags["--mixed_precision"] == "bf16" and flags["--vae_encode_batch_size"] == "16"
    same = bench_peer.peer_command(a, Path("/m"), tmp_path, tmp_path / "p", 25, fast=False)
    assert "--mixed_precision" not in same
    import yaml

    ours = bench_peer.ours_command(a, Path("/m"), tmp_path / "d.parquet", tmp_path / "o", 25, True, tmp_path / "c")
    cfg = yaml.safe_load(Path(ours[-1]).read_text())
    assert cfg["train"]["mixed_precision"] == "bf16" and cfg["model"]["frozen_dtype"] == "bfloat16"
    assert cfg["data"]["cache_dir"] == str(tmp_path / "c")
    ours = bench_peer.ours_command(a, Path("/m"), tmp_path / "d.parquet", tmp_path / "o2", 25, False, None)
    cfg = yaml.safe_load(Path(ours[-1]).read_text())
    assert "frozen_dtype" not in cfg["model"] and "mixed_precision" not in cfg["train"]


def test_relative_work_folder_reaches_the_contenders_as_absolute_paths(tmp_path, monkeypatch):
    """The contenders run in their run folder's parent: a relative --work must not be passed on relative (the
    script then looked for its data under work/work/data)."""
    script = tmp_path / "train_diffusion_dpo.py"
    script.write_text("")
    monkeypatch.chdir(tmp_path)
    cmds = []

    def fake_run_one(cmd, run_dir, steps, warmup, threads, log):
        cmds.append(cmd)
        return {"steps_per_s": 1.0, "steps_per_cpu_s": 1.0, "startup_s": 1.0, "peak_rss_mb": 1.0}

    monkeypatch.setattr(bench_peer, "run_one", fake_run_one)
    bench_peer.main(["--peer-script", str(script), "--work", "rel/work", "--settings", "same", "--repeats", "1",
                     "--pairs", "2", "--steps", "10", "--warmup", "5"])
    peer = dict(zip(cmds[0][2::2], cmds[0][3::2], strict=False))
    assert Path(peer["--dataset_name"]).is_absolute() and Path(peer["--output_dir"]).is_absolute()
    assert Path(peer["--dataset_name"]) == (tmp_path / "rel" / "work" / "data").resolve()
    assert Path(cmds[1][-1]).is_absolute()  # our config file


def test_peak_rss_is_the_contenders_own_not_the_forking_parents():
    """wait4's ru_maxrss of a child starts at the parent's RSS at fork (Linux); VmHWM does not."""
    import subprocess
    import sys

    big = bytearray(600 * 2**20)  # this process grows by 600 MB before the child is forked
    big[:: 4096] = b"x" * len(big[:: 4096])
    code = "x = bytearray(100 * 2**20); x[::4096] = b'y' * len(x[::4096]); import time; time.sleep(0.5)"
    proc = subprocess.Popen([sys.executable, "-c", code])
    status, usage, samples, hwm_kb = bench_peer.watch(proc)
    del big
    assert status == 0 and proc.returncode == 0 and samples
    assert 100 * 1024 <= hwm_kb < 400 * 1024  # the child's own ~100 MB plus the interpreter, not 600 MB
    assert usage.ru_maxrss > 600 * 1024  # what the old measure read
