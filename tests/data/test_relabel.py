"""AI-feedback relabelling and expert selection with a reward."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from diffalign.cli import main
from diffalign.data import PreferencePairs
from diffalign.data.experts import ExpertImages
from diffalign.data.pairs import PairDataError
from diffalign.data.relabel import label_from_scores, relabel_pairs, select_experts


def redness(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """A reward: mean red minus mean green (images in [0,1])."""
    return images[:, 0].mean((1, 2)) - images[:, 1].mean((1, 2))


def _img(path, rgb):
    Image.fromarray(np.full((16, 16, 3), rgb, np.uint8)).save(path)


CAPTIONS = ["a red circle", "a green circle", "a red square", "a blue circle"]


@pytest.fixture
def pairs(tmp_path):
    rows = []
    for i, (c0, c1, lab) in enumerate([((250, 0, 0), (0, 250, 0), 0), ((0, 250, 0), (250, 0, 0), 0),
                                       ((120, 100, 0), (121, 100, 0), 1), ((0, 0, 250), (0, 0, 250), 0.5)]):
        _img(tmp_path / f"{i}_0.png", c0)
        _img(tmp_path / f"{i}_1.png", c1)
        rows.append({"caption": CAPTIONS[i], "jpg_0": f"{i}_0.png", "jpg_1": f"{i}_1.png", "label_0": lab})
    (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return tmp_path / "pairs.jsonl"


def test_labels_from_scores_with_a_tie_margin():
    lab = label_from_scores(torch.tensor([1.0, 0.0, 0.50, 0.3]), torch.tensor([0.0, 1.0, 0.52, 0.3]), tie_margin=0.05)
    assert lab.tolist() == [1.0, 0.0, 0.5, 0.5]


def test_relabel_writes_reward_labels_ties_and_agreement(pairs, tmp_path):
    out = tmp_path / "relabelled"
    summary = relabel_pairs(pairs, redness, out, tie_margin=0.01, resolution=16, progress=False)
    rows = [json.loads(s) for s in (out / "pairs.jsonl").read_text().splitlines()]
    assert [r["label_0"] for r in rows] == [1.0, 0.0, 0.5, 0.5]  # red wins; near-equal and equal are ties
    assert [r["label_0_source"] for r in rows] == [0.0, 0.0, 1.0, 0.5]
    assert rows[0]["score_0"] > rows[0]["score_1"]
    assert summary["ties"] == 2 and summary["decided_in_both"] == 2 and summary["agreement_with_source"] == 0.5
    ds = PreferencePairs(out / "pairs.jsonl", resolution=16, random_flip=False)  # readable by every objective
    assert len(ds) == 2 and ds.load(0)["pixels_w"][0].mean() > ds.load(0)["pixels_w"][1].mean()


def test_relabel_cli_and_a_bad_row_names_the_file(pairs, tmp_path, capsys):
    assert main(["relabel", "--pairs", str(pairs), "--reward", "toy_color", "--out", str(tmp_path / "r"),
                 "--resolution", "16"]) == 0
    assert json.loads(capsys.readouterr().out)["pairs"] == 4
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"caption": "x", "jpg_0": "missing.png", "jpg_1": "0_1.png", "label_0": 1}) + "\n")
    with pytest.raises(PairDataError, match="bad.jsonl"):
        relabel_pairs(bad, redness, tmp_path / "r2", progress=False)


def test_select_experts_keeps_the_top_images_and_expert_images_reads_them(pairs, tmp_path):
    out = tmp_path / "experts"
    summary = select_experts(pairs, redness, out, top=2, resolution=16, progress=False)
    assert summary["experts"] == 2 and summary["pool_images"] == 8
    ds = ExpertImages(out, resolution=16)
    assert len(ds) == 2 and {ds[i]["caption"] for i in range(2)} == {"a red circle", "a green circle"}  # the two pure reds
    assert ds[0]["pixels"][0].mean() > 0.9
    per = select_experts(pairs, redness, tmp_path / "per", top=None, per_prompt=1, min_score=0.0,
                         resolution=16, progress=False)
    assert per["experts"] == 3  # one per caption, and the blue pair scores below 0


def test_expert_images_errors_name_the_file(tmp_path):
    d = tmp_path / "ex"
    d.mkdir()
    _img(d / "a.png", (1, 2, 3))
    with pytest.raises(PairDataError, match=r"a\.png: no caption file"):
        ExpertImages(d, resolution=16)
    (d / "a.txt").write_text("a caption")
    _img(d / "b.png", (1, 2, 3))
    assert len(ExpertImages(d, resolution=16, on_bad_row="skip")) == 1
    j = tmp_path / "e.jsonl"
    j.write_text(json.dumps({"image": "ex/a.png"}) + "\n")
    with pytest.raises(PairDataError, match=r"e\.jsonl: line 1: needs the keys"):
        ExpertImages(j, resolution=16)
