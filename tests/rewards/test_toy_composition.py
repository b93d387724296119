"""Toy composition heads: caption structure, Bradley-Terry refinement, accuracy, the reward by name."""

import torch

import rewards
from diffalign.toyworld.shapes import render_captions
from rewards.toy_composition import (
    HEADS,
    CompositionHeads,
    Rankings,
    bt_log_likelihood,
    caption_features,
    ranking_accuracy,
    refine,
)


def _rankings(n_groups=6, per=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    caps = ["a red circle left of a blue square", "a small green triangle at the top", "a yellow square",
            "a large cyan circle below a magenta triangle", "a blue circle in the center", "a red square at the bottom"]
    prompts = [caps[k % len(caps)] for k in range(n_groups) for _ in range(per)]
    images = render_captions(prompts, seed=seed)
    images = (images + 0.3 * torch.rand(images.shape, generator=g)).clamp(0, 1)
    group = torch.arange(n_groups).repeat_interleave(per)
    scores = {h: torch.rand(len(prompts), generator=g) for h in HEADS}
    return Rankings(images, prompts, group, scores)


def test_caption_features_separate_attributes_relations_and_counts():
    f = caption_features(["a red circle", "a blue circle", "a red circle at the top",
                          "a red circle left of a blue square", "a red circle right of a blue square"])
    assert f.shape[0] == 5 and ((f == 0) | (f == 1)).all()
    assert len({tuple(r.tolist()) for r in f}) == 5


def test_one_refinement_step_raises_the_likelihood_of_the_rankings_it_was_given():
    torch.manual_seed(0)
    heads = CompositionHeads()
    rk = _rankings()
    before = bt_log_likelihood(heads, rk)
    refine(heads, rk, steps=1, lr=1e-3, pairs_per_step=10_000)
    after = bt_log_likelihood(heads, rk)
    for h in HEADS:
        assert after[h] > before[h], h
    # and more steps fit the rankings: accuracy on them climbs well above chance
    refine(heads, rk, steps=60, lr=3e-3, pairs_per_step=10_000)
    acc = ranking_accuracy(heads, rk)
    assert all(acc[h] > 0.8 for h in HEADS), acc


def test_pairs_stay_inside_a_group_and_follow_the_scores():
    rk = _rankings(n_groups=2, per=3)
    for h in HEADS:
        p = rk.pairs(h)
        assert len(p) == 2 * 3  # 3 distinct scores per group: 3 ordered pairs each
        assert (rk.group[p[:, 0]] == rk.group[p[:, 1]]).all()
        assert (rk.scores[h][p[:, 0]] > rk.scores[h][p[:, 1]]).all()
    st = Rankings.from_state(rk.state_dict())
    assert st.images.dtype == torch.uint8 and st.prompts == rk.prompts and torch.equal(st.scores["count"], rk.scores["count"])


def test_saved_heads_load_as_a_differentiable_reward(tmp_path):
    torch.manual_seed(0)
    heads = CompositionHeads()
    heads.save(tmp_path / "heads")
    r = rewards.load("toy_composition", path=str(tmp_path / "heads"))
    assert r.differentiable
    imgs = render_captions(["a red circle", "a blue square at the top"]).requires_grad_(True)
    s = r(imgs, ["a red circle", "a blue square at the top"])
    expected = sum(heads(imgs.detach(), ["a red circle", "a blue square at the top"])[h] for h in HEADS) / 3
    assert torch.allclose(s.detach(), expected.detach(), atol=1e-6)
    s.sum().backward()
    assert imgs.grad.abs().sum() > 0
    hinge = rewards.load("toy_composition", path=str(tmp_path / "heads"), combine="hinge")
    assert (hinge(imgs.detach(), ["a red circle", "a blue square at the top"]) <= 0).all()
