"""Sampling pairs from a model and evaluating it (on a tiny random SD1.5; no toy base needed)."""

import json

import pytest
import torch

import rewards
from diffalign.backbones import load_backbone
from diffalign.backbones.tiny import build_tiny_pipeline
from diffalign.bench.experiment import diversity, evaluate, sample_images
from diffalign.data.pairs import PreferencePairs
from diffalign.toyworld.pairs import make_pairs


@pytest.fixture(scope="module")
def bb():
    b = load_backbone(build_tiny_pipeline("sd15"))
    b.resolution = 32
    return b


def test_image_noise_does_not_depend_on_batch_size(bb):
    prompts = ["a red circle", "a blue square", "a green triangle"]
    a = sample_images(bb, prompts, seed=3, steps=3, batch_size=3)
    b = sample_images(bb, prompts, seed=3, steps=3, batch_size=1)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    c = sample_images(bb, prompts, seed=4, steps=3, batch_size=3)
    assert (a - c).abs().max() > 1e-3


def test_make_pairs_labels_the_better_image_as_winner(bb, tmp_path):
    prompts = ["a red circle", "a blue square", "a green triangle", "a yellow circle on the left"]
    reward = rewards.load("toy_aesthetic")
    stats = make_pairs(bb, prompts, reward, tmp_path / "p", k=3, seed=0, steps=3, progress=False)
    assert stats["pairs"] == 4 and stats["k"] == 3
    rows = [json.loads(x) for x in (tmp_path / "p" / "pairs.jsonl").read_text().splitlines()]
    ranks = [json.loads(x) for x in (tmp_path / "p" / "rankings.jsonl").read_text().splitlines()]
    assert [r["caption"] for r in rows] == prompts
    ds = PreferencePairs(tmp_path / "p" / "pairs.jsonl", resolution=32, random_flip=False, ties="keep")
    for rk in ranks:
        assert sorted(rk["ranking"]) == [0, 1, 2]
        s = rk["scores"]
        assert s[rk["ranking"][0]] >= s[rk["ranking"][-1]]
    # the winner of each decided pair is the higher-scoring image (rescore the written PNGs)
    for i in range(len(ds)):
        item = ds[i]
        if item["weight"] == 1.0:
            sw = reward(item["pixels_w"][None], [item["caption"]])
            sl = reward(item["pixels_l"][None], [item["caption"]])
            assert sw.item() >= sl.item() - 0.02  # PNG quantisation


def test_evaluate_reports_every_reward_and_diversity(bb):
    rs = {"toy_color": rewards.load("toy_color"), "toy_aesthetic": rewards.load("toy_aesthetic")}
    m, imgs = evaluate(bb, ["a red circle", "a blue square"], rs, seeds=2, steps=3)
    assert set(m) == {"toy_color", "toy_aesthetic", "diversity"}
    assert imgs.shape == (4, 3, 32, 32)
    assert 0.0 <= m["toy_color"] <= 1.0 and m["diversity"] > 0


def test_diversity_is_zero_for_identical_images():
    x = torch.rand(1, 3, 8, 8).repeat(4, 1, 1, 1)
    assert diversity(x, 2) == 0.0
    y = torch.rand(4, 3, 8, 8)
    assert diversity(y, 2) > 0.1
