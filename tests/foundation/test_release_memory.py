"""``release_free_memory`` hands the heap pages torch freed back to the OS (glibc ``malloc_trim``)."""

import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import torch

from diffalign.utils import memory


def _rss_mb() -> float:
    return psutil.Process().memory_info().rss / 2**20


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_freed_heap_pages_go_back_to_the_os():
    assert memory.release_free_memory()
    big = torch.ones(2**20)  # a 4 MB mmapped block, freed: glibc raises its mmap threshold, later blocks go on the heap
    del big
    blocks = [torch.ones(64 * 1024) for _ in range(1200)]  # 256 KB each, ~300 MB of heap
    keep = blocks[-1]  # the top block stays: the heap cannot shrink from its end by itself
    del blocks
    before = _rss_mb()
    assert memory.release_free_memory()
    after = _rss_mb()
    assert before - after > 100, (before, after)
    assert keep.sum().item() == 64 * 1024


def test_without_glibc_it_only_collects(monkeypatch):
    monkeypatch.setattr(memory, "_libc", False)  # as _glibc() leaves it where there is no glibc
    assert memory.release_free_memory() is False
    assert memory.keep_freed_memory(True) is False and not memory.keeping_freed_memory()


_CHILD = """
import sys, psutil, torch
from diffalign.utils import memory
rss = lambda: psutil.Process().memory_info().rss / 2**20
keep = sys.argv[1] == "keep"
if keep:
    assert memory.keep_freed_memory(True) and memory.keeping_freed_memory()
base = rss()
x = torch.ones(32 * 2**20)  # 128 MB
del x
kept = rss() - base
with memory.lean_heap():  # glibc's defaults inside, the freed heap handed back first
    assert not memory.keeping_freed_memory()
    inside = rss() - base
assert memory.keeping_freed_memory() == keep  # the mode back after the block
print(round(kept), round(inside))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
@pytest.mark.parametrize("mode", ["default", "keep"])
def test_keep_freed_memory_keeps_a_freed_block_and_lean_heap_gives_it_back(mode):
    """In a fresh process (this one's heap has free blocks that would serve the tensor either way): glibc's
    default unmaps a freed 128 MB tensor; with keep_freed_memory it stays in the heap until lean_heap."""
    out = subprocess.run([sys.executable, "-c", _CHILD, mode], capture_output=True, text=True, check=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}).stdout.split()
    kept, inside = float(out[0]), float(out[1])
    assert (kept > 100) == (mode == "keep"), (mode, kept)
    assert inside < 50, inside


def test_the_loop_keeps_freed_memory_for_the_steps_only(tmp_path, monkeypatch):
    """``train.cpu_keep_freed_memory``: on for the run, glibc's defaults around the sample grid, off at the end;
    the trained weights are those of the run without it, bit for bit (the allocator changes no arithmetic)."""
    from safetensors.torch import load_file

    from diffalign.config import RunConfig
    from diffalign.training import loop
    from tests.helpers import write_pairs

    calls, grids = [], []
    real_grid = loop.sample_grid
    monkeypatch.setattr(loop, "keep_freed_memory", lambda on: calls.append(on) or memory.keep_freed_memory(on))
    monkeypatch.setattr(loop, "sample_grid", lambda *a, **k: grids.append(memory.keeping_freed_memory())
                        or real_grid(*a, **k))
    pairs = write_pairs(tmp_path / "pairs", n=4)

    def cfg(name, keep):
        return RunConfig.model_validate({
            "model": {"path": "tiny:sd15", "resolution": 32, "lora_rank": 4},
            "data": {"train": str(pairs)},
            "train": {"output_dir": str(tmp_path / name), "steps": 2, "batch_size": 2, "sample_every": 1,
                      "sample_steps": 1, "checkpoint_every": 0, "cpu_keep_freed_memory": keep},
        })

    plain = loop.train(cfg("plain", False))
    calls.clear(), grids.clear()
    result = loop.train(cfg("kept", True))
    assert result["status"] == "completed"
    want = load_file(str(next(Path(plain["weights"]).glob("*.safetensors"))))
    got = load_file(str(next(Path(result["weights"]).glob("*.safetensors"))))
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    assert calls == [True, False]
    assert grids == [False, False]  # the grid after step 1 and the final one ran with glibc's defaults
    assert not memory.keeping_freed_memory()


@pytest.mark.parametrize(("resolution", "one_at_a_time"), [(32, False), (512, True)])
def test_large_sample_grids_are_drawn_one_image_at_a_time(tmp_path, monkeypatch, resolution, one_at_a_time):
    import types

    from diffalign.config import RunConfig
    from diffalign.sampling import solvers
    from diffalign.training import export

    seen = {}

    def fake_sample_images(backbone, prompts, seeds, *, batch_size, on_batch, **kw):
        seen.update(prompts=prompts, seeds=seeds, batch_size=batch_size, on_batch=on_batch)
        return torch.zeros(len(prompts), 3, 8, 8)

    monkeypatch.setattr(solvers, "sample_images", fake_sample_images)
    cfg = RunConfig.model_validate({"model": {"path": "tiny:sd15"}, "data": {"train": "x"},
                                    "train": {"output_dir": str(tmp_path), "sample_prompts": ["a", "b"]}})
    bb = types.SimpleNamespace(resolution=resolution, denoiser=torch.nn.Linear(1, 1))
    assert export.sample_grid(bb, cfg, tmp_path / "grid.png", seed=5).is_file()
    assert seen["prompts"] == ["a", "a", "b", "b"] and seen["seeds"] == [5, 6, 7, 8]
    assert seen["batch_size"] == (1 if one_at_a_time else 4)
    assert (seen["on_batch"] is not None) == one_at_a_time
