"""Checkpoints: atomic writes, keep-K, a manifest that catches silent corruption, fallback to the
previous checkpoint with a warning naming both, crash leftovers, refusing to mix two runs."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from diffalign.config import load_config
from diffalign.training import checkpoints as ckpt
from diffalign.training import train


def _write(tmp, files):
    def write(d):
        for name, data in files.items():
            (d / name).parent.mkdir(parents=True, exist_ok=True)
            (d / name).write_bytes(data)

    return write


def _flip_middle_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_save_is_atomic_keeps_last_k_and_verifies(tmp_path):
    for step in range(1, 6):
        ckpt.save_checkpoint(tmp_path, step, _write(tmp_path, {"state/a.bin": b"x" * step}), keep=2)
    kept = ckpt.list_checkpoints(tmp_path)
    assert [p.name for p in kept] == ["step_00000004", "step_00000005"]
    meta = ckpt.verify_checkpoint(kept[-1])
    assert meta["step"] == 5 and meta["files"]["state/a.bin"]["size"] == 5
    assert not list((tmp_path / "checkpoints").glob(".*"))


def test_manifest_names_a_truncated_or_corrupted_file(tmp_path):
    c = ckpt.save_checkpoint(tmp_path, 1, _write(tmp_path, {"state/a.bin": b"0123456789", "b.bin": b"ab"}))
    (c / "state" / "a.bin").write_bytes(b"01234")
    with pytest.raises(ckpt.CheckpointError, match=r"a\.bin: 5 bytes, the manifest says 10"):
        ckpt.verify_checkpoint(c)
    (c / "state" / "a.bin").write_bytes(b"0123456780")
    with pytest.raises(ckpt.CheckpointError, match=r"a\.bin: SHA-256 does not match"):
        ckpt.verify_checkpoint(c)
    (c / "b.bin").unlink()
    with pytest.raises(ckpt.CheckpointError, match=r"b\.bin: missing"):
        ckpt.verify_checkpoint(c)


def test_crash_leftovers_are_cleaned_and_an_interrupted_replacement_is_undone(tmp_path):
    ckpt.save_checkpoint(tmp_path, 1, _write(tmp_path, {"a": b"1"}))
    root = tmp_path / "checkpoints"
    # killed while writing step 2: a temporary folder without metadata
    tmp, _ = ckpt.begin_checkpoint(tmp_path, 2)
    (tmp / "a").write_bytes(b"partial")
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_00000001"]
    # killed while replacing step 1 by a new copy: the old copy moved aside, the new one not yet in place
    (root / "step_00000001").rename(root / ".old_step_00000001")
    assert ckpt.list_checkpoints(tmp_path) == []
    # killed while rotating an old checkpoint out: renamed first, so never a half-deleted step_* folder
    (root / ".del_step_00000000" / "state").mkdir(parents=True)
    ckpt.clean_partial(tmp_path)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_00000001"]
    ckpt.verify_checkpoint(root / "step_00000001")
    assert sorted(p.name for p in root.iterdir()) == ["step_00000001"]


def test_all_candidates_damaged_lists_each_with_its_reason(tmp_path):
    for step in (1, 2):
        ckpt.save_checkpoint(tmp_path, step, _write(tmp_path, {"a": b"12"}))
        (ckpt.checkpoint_dir(tmp_path, step) / "a").write_bytes(b"1")
    with pytest.raises(ckpt.CheckpointError) as e:
        ckpt.load_with_fallback(ckpt.resolve_resume(tmp_path, "latest"), lambda p: None)
    assert "step_00000002" in str(e.value) and "step_00000001" in str(e.value) and "manifest says 2" in str(e.value)


@pytest.mark.parametrize("damage", ["model_byte", "rng_byte", "rng_garbage_no_checksums"])
def test_damaged_latest_falls_back_names_both_sets_it_aside_and_loses_nothing(damage, tmp_path, h, caplog):
    """A flipped byte inside a tensor would load without complaint (wrong weights), and accelerate logs and
    ignores an unreadable RNG file (an inexact resume): both are caught and the previous checkpoint used."""
    extra = ["--train.checkpoint_checksums", "false"] if damage == "rng_garbage_no_checksums" else []
    cfg = h.write_config(tmp_path, steps=3, checkpoint_every=1, keep_checkpoints=0)
    straight, run = tmp_path / "straight", tmp_path / "run"
    train(load_config(cfg, ["--train.output_dir", str(straight)]))
    train(load_config(cfg, ["--train.output_dir", str(run), "--train.steps", "2", *extra]))
    latest = run / "checkpoints" / "step_00000002"
    if damage == "model_byte":
        _flip_middle_byte(latest / "state" / "model.safetensors")
    elif damage == "rng_byte":
        _flip_middle_byte(latest / "state" / "random_states_0.pkl")
    else:
        f = latest / "state" / "random_states_0.pkl"
        f.write_bytes(b"\0" * f.stat().st_size)
    with caplog.at_level(logging.WARNING):
        res = train(load_config(cfg, ["--train.output_dir", str(run), *extra]), resume="latest")
    warning = " ".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
    assert f"checkpoint {latest} is damaged" in warning and f"falling back to {run / 'checkpoints' / 'step_00000001'}" in warning
    assert res["step"] == 3
    assert (run / "checkpoints" / "damaged_step_00000002").is_dir()  # kept, out of the rotation
    h.assert_same_weights(h.lora(straight), h.lora(run))  # nothing lost: steps 2-3 were redone exactly


def test_a_fresh_run_refuses_a_folder_with_checkpoints_and_auto_resumes(tmp_path, h):
    cfg = h.write_config(tmp_path, steps=2, checkpoint_every=1)
    train(load_config(cfg, ["--train.steps", "1"]))
    with pytest.raises(FileExistsError, match=r"already holds checkpoints \(newest: step_00000001\).*--resume latest"):
        train(load_config(cfg))
    res = train(load_config(cfg), resume="auto")
    assert res["step"] == 2
    other = tmp_path / "other"
    res = train(load_config(cfg, ["--train.output_dir", str(other)]), resume="auto")  # nothing to resume: fresh
    assert res["step"] == 2 and (other / "final" / "lora").is_dir()


def test_resume_with_another_lora_rank_is_a_clear_error(tmp_path, h):
    cfg = h.write_config(tmp_path, steps=1, checkpoint_every=1)
    train(load_config(cfg))
    with pytest.raises(ValueError, match=r"model.lora_rank: checkpoint 4, config 8"):
        train(load_config(cfg, ["--train.steps", "2", "--model.lora_rank", "8"]), resume="latest")


def test_metadata_records_the_run(tmp_path, h):
    cfg = h.write_config(tmp_path, steps=1, checkpoint_every=1)
    train(load_config(cfg))
    meta = json.loads((tmp_path / "run" / "checkpoints" / "step_00000001" / ckpt.META).read_text())
    assert meta["step"] == 1 and meta["num_processes"] == 1 and meta["model.lora_rank"] == 4
    assert "state/optimizer.bin" in meta["files"] and "lora/pytorch_lora_weights.safetensors" in meta["files"]
    assert all(len(e["sha256"]) == 64 for e in meta["files"].values())
    assert torch.load(tmp_path / "run" / "checkpoints" / "step_00000001" / "state" / "optimizer.bin",
                      weights_only=True)  # accelerate's files stay weights-only loadable


def test_edited_metadata_is_caught(tmp_path):
    c = ckpt.save_checkpoint(tmp_path, 4, _write(tmp_path, {"a": b"1"}))
    meta = json.loads((c / ckpt.META).read_text())
    meta["step"] = 5
    (c / ckpt.META).write_text(json.dumps(meta))
    with pytest.raises(ckpt.CheckpointError, match="does not match its own checksum"):
        ckpt.verify_checkpoint(c)
    meta["meta_sha256"] = ckpt._meta_digest(meta)
    (c / ckpt.META).write_text(json.dumps(meta))
    with pytest.raises(ckpt.CheckpointError, match="says step 5, the folder is step_00000004"):
        ckpt.verify_checkpoint(c)


def test_corrupted_metadata_is_not_taken_for_a_different_setup(tmp_path, h, caplog):
    """A flipped bit in the newest metadata that changes e.g. the LoRA rank is damage (fall back), not a
    config mismatch (refuse): only metadata matching its own checksum is compared with the config."""
    cfg = h.write_config(tmp_path, steps=3, checkpoint_every=1)
    train(load_config(cfg, ["--train.steps", "2"]))
    latest = tmp_path / "run" / "checkpoints" / "step_00000002"
    meta = json.loads((latest / ckpt.META).read_text())
    meta["model.lora_rank"] = 8
    (latest / ckpt.META).write_text(json.dumps(meta))
    with caplog.at_level(logging.WARNING):
        res = train(load_config(cfg), resume="latest")
    assert res["step"] == 3 and "does not match its own checksum" in caplog.text and "falling back" in caplog.text
