"""Issue #17: bad input that used to pass silently, or fail with a message naming nothing, and the
data-loss cases outside the run folder (tiny-pairs overwrite, checkpoint writes on a full disk)."""

from __future__ import annotations

import errno
import json
import logging
from pathlib import Path

import pytest
from PIL import Image

from diffalign.cli import main as cli_main
from diffalign.data.experts import ExpertImages
from diffalign.data.pairs import PairDataError, PreferencePairs


def _pairs(tmp_path: Path, rows: list[dict]) -> Path:
    for name, color in (("a.png", (200, 30, 30)), ("b.png", (30, 30, 200)), ("c.png", (30, 200, 30))):
        Image.new("RGB", (16, 16), color).save(tmp_path / name)
    p = tmp_path / "pairs.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return p


ROW = {"caption": "a red square", "jpg_0": "a.png", "jpg_1": "b.png", "label_0": 1}


# --- pair data ---------------------------------------------------------------------------------------
def test_pair_of_the_same_image_file_is_a_bad_row(tmp_path, caplog):
    p = _pairs(tmp_path, [ROW, dict(ROW, jpg_1="./a.png", caption="other")])
    with pytest.raises(PairDataError) as e:
        PreferencePairs(p, resolution=16)
    assert f"{p}: row 1 (line 2): jpg_0 and jpg_1 are the same file" in str(e.value)
    with caplog.at_level("WARNING"):
        ds = PreferencePairs(p, resolution=16, on_bad_row="skip")
    assert len(ds) == 1 and ds.skip_counts == {"same image": 1}


def test_duplicate_rows_are_kept_counted_and_warned(tmp_path, caplog):
    rows = [ROW, dict(ROW, jpg_0="c.png"), dict(ROW, jpg_0="b.png", jpg_1="a.png", label_0=0), ROW]
    p = _pairs(tmp_path, rows)
    with caplog.at_level(logging.WARNING, logger="diffalign.data.pairs"):
        ds = PreferencePairs(p, resolution=16)
    assert len(ds) == 4 and ds.warn_counts == {"duplicate row": 2} and not ds.skip_counts
    assert "2 duplicate row(s) (kept)" in caplog.text and f"{p}: row 2 (line 3) repeats {p}: row 0 (line 1)" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="diffalign.data.pairs"):
        PreferencePairs(_pairs(tmp_path, rows[:2]), resolution=16)
    assert "duplicate" not in caplog.text  # the same images under another caption are no repeat


def test_non_utf8_line_names_file_row_line_and_offset(tmp_path):
    p = _pairs(tmp_path, [ROW, ROW])
    good = p.read_bytes()
    p.write_bytes(good + b'{"caption": "caf\xe9", "jpg_0": "a.png", "jpg_1": "c.png", "label_0": 1}\n')
    with pytest.raises(PairDataError) as e:
        PreferencePairs(p, resolution=16)
    msg = str(e.value)
    assert f"{p}: row 2 (line 3): not UTF-8 text: byte 0xe9 at byte offset {len(good) + 16}" in msg
    ds = PreferencePairs(p, resolution=16, on_bad_row="skip")
    assert len(ds) == 2 and ds.skip_counts == {"not UTF-8": 1}
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + good)  # a byte-order mark is UTF-8: accepted
    assert len(PreferencePairs(bom, resolution=16)) == 2


def test_non_utf8_expert_captions_name_the_file(tmp_path):
    Image.new("RGB", (16, 16)).save(tmp_path / "x.png")
    (tmp_path / "x.txt").write_bytes(b"a red \xff square")
    with pytest.raises(PairDataError, match=rf"{tmp_path / 'x.txt'}: line 1: not UTF-8 text \(byte 0xff"):
        ExpertImages(tmp_path, 16)


def test_pairs_file_through_train_names_the_row(tmp_path, capsys):
    from tests.reliability.conftest import write_config

    cfg = write_config(tmp_path)
    data = tmp_path / "pairs.jsonl"
    data.write_bytes(data.read_bytes() + b'{"caption": "\xff"}\n')
    assert cli_main(["train", str(cfg)]) == 2
    assert f"diffalign train: error: {data}: row 8 (line 9): not UTF-8 text" in capsys.readouterr().err


# --- data loss: tiny-pairs, checkpoint writes ---------------------------------------------------------
def test_tiny_pairs_refuses_to_overwrite(tmp_path):
    from diffalign.data.synthetic import write_rendered_pairs

    path = write_rendered_pairs(tmp_path / "p", n=3)
    before = path.read_bytes()
    with pytest.raises(FileExistsError, match=rf"{path}: already exists; pass --overwrite"):
        write_rendered_pairs(tmp_path / "p", n=2, seed=1)
    assert path.read_bytes() == before and len(list((tmp_path / "p" / "images").glob("*.png"))) == 6
    write_rendered_pairs(tmp_path / "p", n=2, seed=1, overwrite=True)
    assert path.read_bytes() != before and len(list((tmp_path / "p" / "images").glob("*.png"))) == 4


def _ckpt_writer(exc: BaseException):
    def write(tmp: Path) -> None:
        (tmp / "half.bin").write_bytes(b"x" * 10)
        raise exc
    return write


@pytest.mark.parametrize("exc,text", [
    (OSError(errno.ENOSPC, "No space left on device"), "no space left on device"),
    (RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 64 vs 0"), "no space left on device"),
    (PermissionError(errno.EACCES, "Permission denied"), "the folder is read-only or not writable"),
    (OSError(errno.EROFS, "Read-only file system"), "the folder is read-only or not writable"),
], ids=["ENOSPC", "torch-full-disk", "EACCES", "EROFS"])
def test_failed_checkpoint_write_names_the_path_and_keeps_earlier_ones(exc, text, tmp_path, monkeypatch):
    import shutil

    from diffalign.training import checkpoints as ckpt

    good = ckpt.save_checkpoint(tmp_path, 1, lambda tmp: (tmp / "w.bin").write_bytes(b"ok"))
    if "unexpected pos" in str(exc):  # torch's message carries no errno: the free space decides
        usage = shutil.disk_usage(tmp_path)
        monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda p: usage._replace(free=1 << 20))
    with pytest.raises(ckpt.CheckpointError) as e:
        ckpt.save_checkpoint(tmp_path, 2, _ckpt_writer(exc))
    msg = str(e.value)
    assert msg.startswith(f"cannot write checkpoint {tmp_path / 'checkpoints' / '.tmp_step_00000002'}: {text}")
    assert "\n" not in msg
    assert ckpt.list_checkpoints(tmp_path) == [good] and ckpt.verify_checkpoint(good)["step"] == 1
    assert not (tmp_path / "checkpoints" / ".tmp_step_00000002").exists()  # the partial write is removed


def test_other_write_errors_keep_their_cause(tmp_path, monkeypatch):
    from diffalign.training import checkpoints as ckpt

    monkeypatch.setattr(ckpt, "LOW_SPACE", 0)
    with pytest.raises(ckpt.CheckpointError, match=r"\.tmp_step_00000003: OSError: \[Errno 5\] Input/output error"):
        ckpt.save_checkpoint(tmp_path, 3, _ckpt_writer(OSError(errno.EIO, "Input/output error")))


# --- model folders: one line naming the file; no empty library warnings or loading bars -----------------
@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    from diffalign.backbones.tiny import save_tiny

    return save_tiny("sd15", tmp_path_factory.mktemp("m") / "sd15")


def _broken_copy(src: Path, dst: Path, how: str) -> Path:
    import shutil

    shutil.copytree(src, dst)
    if how == "no unet weights":
        (dst / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    elif how == "broken model_index":
        (dst / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline",\n')
    elif how == "truncated vae":
        f = dst / "vae" / "diffusion_pytorch_model.safetensors"
        f.write_bytes(f.read_bytes()[:1000])
    elif how == "broken unet config":
        (dst / "unet" / "config.json").write_text("{")
    return dst


MODEL_CASES = [
    ("no unet weights", "sd15b/unet: no weights file for UNet2DConditionModel"),
    ("broken model_index", "sd15b/model_index.json: not valid JSON"),
    ("truncated vae", "Unable to load weights from checkpoint file for '{m}/vae/diffusion_pytorch_model.safetensors'"),
    ("broken unet config", "sd15b/unet/config.json: not valid JSON"),
]


@pytest.mark.parametrize("how,text", MODEL_CASES, ids=[c[0] for c in MODEL_CASES])
def test_broken_model_folder_is_one_line_naming_the_file(how, text, tiny_sd, tmp_path, capsys):
    m = _broken_copy(tiny_sd, tmp_path / "sd15b", how)
    rc = cli_main(["sample", "--model", str(m), "--prompts", "a red circle", "--out", str(tmp_path / "o"),
                   "--steps", "1", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and err.startswith("diffalign sample: error: ")
    assert text.format(m=m) in err
    assert "diffusion_pytorch_model.bin" not in err


def test_loading_draws_no_bars_and_no_empty_fp32_warning(tiny_sd, capfd):
    import torch
    from diffusers.utils import logging as dlog

    from diffalign.backbones import load_backbone

    capfd.readouterr()
    bb = load_backbone(tiny_sd)
    bb.vae.to(torch.float16)
    bb.vae.to(torch.float32)
    err = capfd.readouterr().err
    assert "Loading pipeline components" not in err and "Loading weights" not in err
    assert "should be kept in float32: []" not in err
    assert dlog.is_progress_bar_enabled()  # the user's setting is restored after our load
    record = logging.LogRecord("diffusers.models.modeling_utils", logging.WARNING, "", 0,
                               "There are modules in X that should be kept in float32: ['a']", None, None)
    assert logging.getLogger("diffusers.models.modeling_utils").filter(record)  # a real list still warns


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_damaged_lora_file_is_one_line_naming_it(damage, tiny_sd, tmp_path, capfd):
    from diffalign.backbones import load_backbone
    from diffalign.backbones.lora import add_lora, load_lora, save_lora

    bb = load_backbone(tiny_sd)
    add_lora(bb, rank=2)
    lora_dir = save_lora(bb, tmp_path / "lora")
    fresh = load_backbone(tiny_sd)
    capfd.readouterr()
    load_lora(fresh, lora_dir)  # intact: loads, without diffusers' "No LoRA keys ... open an issue" warning
    assert "No LoRA keys" not in capfd.readouterr().err
    f = Path(lora_dir) / "pytorch_lora_weights.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\x00" * 64)
    with pytest.raises(ValueError, match=rf"{f}: not a readable safetensors file, damaged or truncated"):
        load_lora(load_backbone(tiny_sd), lora_dir)


# --- strict CLI input; sample and score outputs --------------------------------------------------------
def _sample(tiny_sd, out, *extra):
    return cli_main(["sample", "--model", str(tiny_sd), "--prompts", "a red circle", "--out", str(out),
                     "--steps", "1", "--images-per-prompt", "2", "--no-progress", *extra])


@pytest.mark.parametrize("argv,text", [
    (["--rlg-scale", "2"], "--rlg-scale is used only with --guidance rlg"),
    (["--reward-scale", "0.5", "--reward", "toy_color"], "--reward-scale is used only with --guidance reward"),
    (["--size", "0"], "--size 0: must be a positive number of pixels"),
    (["--size", "33"], "size (--size) 33: must be a positive multiple of 4 pixels for this sd model"),
    (["--prompts", "prompts.txt"], "--prompts prompts.txt: no such file"),
    (["--prompts", "data/my_prompts"], "--prompts data/my_prompts: no such file"),
], ids=["rlg-scale", "reward-scale", "size0", "size33", "prompts.txt", "prompts-path"])
def test_sample_flags_are_checked_naming_the_flag(argv, text, tiny_sd, tmp_path, capsys):
    assert _sample(tiny_sd, tmp_path / "o", *argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and text in err
    assert not list((tmp_path / "o").glob("*.png"))


def test_sample_into_earlier_images_needs_overwrite_and_score_reads_only_the_samples(tiny_sd, tmp_path, capsys):
    out = tmp_path / "s"
    assert _sample(tiny_sd, out) == 0
    (out / "00009.png").write_bytes((out / "00000.png").read_bytes())  # an image a longer earlier run left
    capsys.readouterr()
    assert _sample(tiny_sd, out) == 2
    assert "--out" in capsys.readouterr().err and (out / "00009.png").exists()
    assert _sample(tiny_sd, out, "--overwrite") == 0
    assert sorted(p.name for p in out.glob("*.png")) == ["00000.png", "00001.png", "grid.png"]

    # score: the toy rewards by name, only the images settings.json lists (not grid.png)
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\n")
    capsys.readouterr()
    score = ["score", "--reward", "toy_color", "--images", str(out), "--prompts", str(prompts), "--no-progress"]
    assert cli_main([*score, "--out", str(tmp_path)]) == 2  # a folder: refused before scoring
    assert "is a folder; name the CSV file" in capsys.readouterr().err
    assert cli_main([*score, "--out", str(tmp_path / "scores.csv")]) == 0
    rows = (tmp_path / "scores.csv").read_text().splitlines()
    assert rows[0] == "file,prompt,toy_color" and [r.split(",")[0] for r in rows[1:]] == ["00000.png", "00001.png"]


def test_tiny_pairs_cli_refuses_to_overwrite(tmp_path, capsys):
    assert cli_main(["tiny-pairs", str(tmp_path / "p"), "--n", "2"]) == 0
    assert cli_main(["tiny-pairs", str(tmp_path / "p"), "--n", "2"]) == 2
    assert "pairs.jsonl: already exists; pass --overwrite" in capsys.readouterr().err
    assert cli_main(["tiny-pairs", str(tmp_path / "p"), "--n", "2", "--overwrite"]) == 0


# --- config values ---------------------------------------------------------------------------------------
def test_text_keys_keep_the_word_as_typed(tmp_path):
    from diffalign.config import load_config
    from tests.reliability.conftest import write_config

    cfg = load_config(write_config(tmp_path), ["--train.mixed_precision", "no", "--objective.loss_type", "hinge",
                                               "--data.cache_dir", "null", "--train.lr", "1e-4"])
    assert cfg.train.mixed_precision == "no" and cfg.objective.loss_type == "hinge"
    assert cfg.data.cache_dir is None and cfg.train.lr == 1e-4


@pytest.mark.parametrize("override,text", [
    (["--data.prompt_dropout", "2"], "data.prompt_dropout: Input should be less than or equal to 1"),
    (["--data.prompt_dropout", "-0.1"], "data.prompt_dropout: Input should be greater than or equal to 0"),
    (["--model.lora_rank", "0"], "model.lora_rank: Input should be greater than or equal to 1"),
], ids=["dropout2", "dropout-neg", "rank0"])
def test_out_of_range_values_name_the_key(override, text, tmp_path):
    from diffalign.config import ConfigError, load_config
    from tests.reliability.conftest import write_config

    with pytest.raises(ConfigError, match=text):
        load_config(write_config(tmp_path), override)


def test_yaml_boolean_word_gets_a_hint(tmp_path):
    from diffalign.config import ConfigError, load_config
    from tests.reliability.conftest import write_config

    cfg = write_config(tmp_path)
    cfg.write_text(cfg.read_text().replace('"progress": false', '"progress": false, "mixed_precision": no'))
    with pytest.raises(ConfigError, match=r"train.mixed_precision: .*got False\) \(YAML reads no/yes"):
        load_config(cfg)


def test_peft_errors_name_our_key(tmp_path, capsys):
    from tests.reliability.conftest import write_config

    cfg = write_config(tmp_path)
    assert cli_main(["train", str(cfg), "--model.lora_targets", "[no_such_layer]"]) == 2
    err = capsys.readouterr().err
    assert "diffalign train: error: model.lora_targets: peft refused the LoRA" in err and "no_such_layer" in err
