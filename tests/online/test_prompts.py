"""Prompt sources for online training."""

import json

import pytest
from torch.utils.data import DataLoader

from diffalign.data.prompts import PromptDataError, PromptDataset, collate_prompts, load_prompts


def test_text_and_jsonl(tmp_path):
    t = tmp_path / "p.txt"
    t.write_text("a red circle\n\n# a comment\n  a blue square \n")
    assert load_prompts(t) == ["a red circle", "a blue square"]
    j = tmp_path / "p.jsonl"
    j.write_text(json.dumps({"prompt": "a"}) + "\n\n" + json.dumps({"caption": "b", "x": 1}) + "\n")
    assert load_prompts(j) == ["a", "b"]


@pytest.mark.parametrize("body,msg", [
    ('{"prompt": "a"}\nnot json\n', "line 2: not valid JSON"),
    ('{"prompt": "a"}\n{"text": "b"}\n', "line 2: no \"prompt\" or \"caption\""),
    ('{"prompt": ""}\n', "line 1: the prompt must be a non-empty string"),
    ('[1, 2]\n', "line 1: expected a JSON object"),
    ('{"prompt": 3}\n', "line 1: the prompt must be"),
])
def test_jsonl_errors_name_file_and_line(tmp_path, body, msg):
    j = tmp_path / "bad.jsonl"
    j.write_text(body)
    with pytest.raises(PromptDataError, match=msg) as e:
        load_prompts(j)
    assert "bad.jsonl" in str(e.value)


def test_errors(tmp_path):
    with pytest.raises(PromptDataError, match="no such prompt file"):
        load_prompts(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(PromptDataError, match="no prompts"):
        load_prompts(tmp_path / "empty.txt")
    (tmp_path / "long.txt").write_text("ok\n" + "x" * 50 + "\n")
    with pytest.raises(PromptDataError, match="line 2: prompt of 50 characters"):
        load_prompts(tmp_path / "long.txt", max_chars=10)
    with pytest.raises(PromptDataError, match="toy:train"):
        load_prompts("toy:test")
    with pytest.raises(PromptDataError, match="positive integer"):
        load_prompts("toy:train:x")


def test_toy_splits_are_disjoint():
    from diffalign.toyworld.shapes import is_heldout

    train, held = load_prompts("toy:train"), load_prompts("toy:heldout")
    assert train and held and not set(train) & set(held)
    assert all(is_heldout(p) for p in held) and not any(is_heldout(p) for p in train[:500])
    assert len(load_prompts("toy:heldout:16")) == 16


def test_toy_source_with_a_two_object_fraction():
    from diffalign.toyworld.shapes import parse_caption, prompts

    ps = load_prompts("toy:train:50:0.8")
    assert len(ps) == 50 and sum(len(parse_caption(p).objects) == 2 for p in ps) == 40
    assert load_prompts("toy:train:50:0.5") == prompts("train", n=50)  # half and half: the same draw as toy:train:50
    for bad in ("toy:train:50:1.5", "toy:train:50:x", "toy:train:50:0.5:1"):
        with pytest.raises(PromptDataError, match="two-object fraction|expected toy:train"):
            load_prompts(bad)
    with pytest.raises(PromptDataError, match="toy:heldout:500:0.5.*the split has 54"):
        load_prompts("toy:heldout:500:0.5")  # never fewer prompts, or another mix, than asked


def test_dataset_and_collate(tmp_path):
    ds = PromptDataset(["a", "b", "c"])
    batch = next(iter(DataLoader(ds, batch_size=2, collate_fn=collate_prompts)))
    assert batch == {"prompts": ["a", "b"], "rows": [0, 1]}
    assert len(PromptDataset("toy:heldout:8")) == 8
