"""Best-of-N and rejection sampling."""

import pytest
import torch

import diffalign
import rewards
from diffalign.sampling import best_of_n

from .conftest import Brightness, ZeroReward, tiny

PROMPTS = ["a red circle", "a blue square", "a green triangle"]
KW = dict(steps=2, guidance_scale=3.0, seed=11, size=32, batch_size=2)


def test_selection_logic_with_known_scores():
    # candidate k of prompt i is a constant image of value table[k][i]; the reward is its brightness
    table = torch.tensor([[0.2, 0.9, 0.5], [0.6, 0.1, float("nan")], [0.4, 0.3, 0.7]])

    def round_(k, idx):
        return table[k, idx].reshape(-1, 1, 1, 1).expand(-1, 3, 2, 2).nan_to_num(0.0)

    class Score(Brightness):
        def score(self, images, prompts, context=None):
            s = images.flatten(1).mean(1)
            return torch.where(s == 0, torch.full_like(s, float("nan")), s)

    sel = best_of_n(round_, PROMPTS, Score(), 3)
    torch.testing.assert_close(sel.scores, torch.tensor([0.6, 0.9, 0.7]))
    assert sel.chosen.tolist() == [1, 0, 2] and sel.tries.tolist() == [3, 3, 3]  # NaN never wins
    rej = best_of_n(round_, PROMPTS, Score(), 3, threshold=0.55)
    assert rej.tries.tolist() == [2, 1, 3] and rej.chosen.tolist() == [1, 0, 2]
    with pytest.raises(ValueError, match="N >= 1"):
        best_of_n(round_, PROMPTS, Score(), 0)


def test_best_of_n_keeps_the_best_candidate_of_the_seeded_samples():
    bb = tiny("sd15")
    n = len(PROMPTS)
    reward = rewards.Ensemble({"b": Brightness(), "z": ZeroReward()}, {"b": 1.0, "z": 2.0})
    cands = torch.stack([diffalign.sample(bb, PROMPTS, **{**KW, "seed": KW["seed"] + k * n}).images for k in range(3)])
    scores = torch.stack([reward(c, PROMPTS) for c in cands])  # [3, P]
    out = diffalign.sample(bb, PROMPTS, best_of=3, reward=reward, **KW)
    best = scores.argmax(0)
    assert torch.equal(out.images, cands[best, torch.arange(n)])
    torch.testing.assert_close(out.scores, scores.max(0).values)
    assert out.tries.tolist() == [3, 3, 3]
    assert best.tolist() != [0, 0, 0]  # the choice is not always the plain sample
    # rejection sampling: a threshold every first candidate passes keeps the plain samples
    first = diffalign.sample(bb, PROMPTS, best_of=3, reject_below=-1.0, reward=reward, **KW)
    assert torch.equal(first.images, cands[0]) and first.tries.tolist() == [1, 1, 1]
    assert first.settings["candidates_drawn"] == 3
    unreachable = diffalign.sample(bb, PROMPTS, best_of=3, reject_below=2.0, reward=reward, **KW)
    assert torch.equal(unreachable.images, out.images) and unreachable.tries.tolist() == [3, 3, 3]


def test_best_of_needs_a_reward_and_takes_no_latents():
    bb = tiny("sd15")
    with pytest.raises(ValueError, match="needs a reward"):
        diffalign.sample(bb, PROMPTS, best_of=2, **KW)
    with pytest.raises(ValueError, match="latents cannot"):
        diffalign.sample(bb, PROMPTS, best_of=2, reward=Brightness(), latents=torch.zeros(3, 4, 4, 4), **KW)
