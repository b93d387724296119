"""Registry names and the `diffalign score` CLI end to end on a tiny transformers CLIP folder."""

from __future__ import annotations

import argparse
import csv
import shutil

import pytest
import torch

import rewards
from diffalign.cli import add_score_arguments
from rewards import score_cli
from rewards.testing import make_test_images, tiny_hf_clip


def test_available_and_unknown():
    names = rewards.available()
    for n in ("aesthetic", "clipscore", "pickscore", "hpsv2", "hpsv2.1", "imagereward", "identity", "itercomp"):
        assert n in names
    with pytest.raises(KeyError, match="unknown reward 'nope'"):
        rewards.load("nope")


@pytest.fixture()
def setup(tmp_path, clip_tok_dir):
    model_dir = tmp_path / "clip"
    tiny_hf_clip(seed=4).save_pretrained(model_dir)
    for f in clip_tok_dir.iterdir():
        shutil.copy(f, model_dir / f.name)
    img_dir = tmp_path / "imgs"
    img_dir.mkdir()
    sizes = ((64, 64), (64, 64), (80, 48))
    for i, im in enumerate(make_test_images(3, sizes=sizes, seed=2)):
        im.save(img_dir / f"{i:02d}.png")
    (img_dir / "notes.txt").write_text("ignored")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\na cat\n\n")
    return model_dir, img_dir, prompts


def _run(*argv):
    p = argparse.ArgumentParser()
    add_score_arguments(p)
    return score_cli.run(p.parse_args([*argv, "--no-progress"]))


def test_score_cli_writes_one_row_per_image(setup, tmp_path):
    model_dir, img_dir, prompts = setup
    out = tmp_path / "scores.csv"
    rc = _run("--reward", f"clipscore={model_dir},pickscore={model_dir}", "--images", str(img_dir),
              "--prompts", str(prompts), "--out", str(out), "--batch-size", "2",
              "--reward-arg", "clipscore.prefix=")
    assert rc == 0
    rows = list(csv.reader(out.open()))
    assert rows[0] == ["file", "prompt", "clipscore", "pickscore"]
    assert [r[0] for r in rows[1:]] == ["00.png", "01.png", "02.png"]
    assert [r[1] for r in rows[1:]] == ["a red circle", "a blue square", "a cat"]
    # the CSV equals scoring the images directly
    from PIL import Image

    from rewards.preprocess import pil_to_tensor

    pick = rewards.load("pickscore", path=str(model_dir))
    with torch.no_grad():
        direct = pick(pil_to_tensor(Image.open(img_dir / "02.png"))[None], ["a cat"])
    assert abs(float(rows[3][3]) - float(direct)) < 1e-4


def test_score_cli_single_prompt_and_single_file(setup, tmp_path):
    model_dir, img_dir, _ = setup
    one = tmp_path / "one.txt"
    one.write_text("a photo\n")
    out = tmp_path / "s.csv"
    assert _run("--reward", f"pickscore={model_dir}", "--images", str(img_dir), "--prompts", str(one), "--out", str(out)) == 0
    assert {r[1] for r in list(csv.reader(out.open()))[1:]} == {"a photo"}
    assert _run("--reward", f"pickscore={model_dir}", "--images", str(img_dir / "01.png"), "--prompts", str(one),
                "--out", str(out)) == 0
    assert len(list(csv.reader(out.open()))) == 2


def test_score_cli_errors(setup, tmp_path, capsys):
    model_dir, img_dir, prompts = setup
    two = tmp_path / "two.txt"
    two.write_text("a\nb\n")
    cases = [
        (["--reward", f"pickscore={model_dir}", "--images", str(img_dir), "--prompts", str(two)], "2 prompts for 3 images"),
        (["--reward", f"pickscore={model_dir}", "--images", str(tmp_path / "none"), "--prompts", str(two)], "does not exist"),
        (["--reward", "pickscore", "--images", str(img_dir), "--prompts", str(prompts)], "pickscore: no path given"),
        (["--reward", f"pickscore={tmp_path / 'nowhere'}", "--images", str(img_dir), "--prompts", str(prompts)], "not found"),
        (["--reward", f"nope={model_dir}", "--images", str(img_dir), "--prompts", str(prompts)], "unknown reward"),
        (["--reward", f"pickscore={model_dir}", "--reward-arg", "clip.x=1", "--images", str(img_dir),
          "--prompts", str(prompts)], "not one of the rewards"),
    ]
    for argv, msg in cases:
        assert _run(*argv, "--out", str(tmp_path / "x.csv")) == 2
        assert msg in capsys.readouterr().err, msg
