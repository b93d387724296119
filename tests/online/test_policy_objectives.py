"""DDPO, Flow-GRPO and DiffusionNFT as objectives: the on-policy ratio is exactly 1, the NFT loss at
initialisation is its hand-computed value, advantages are the references' statistics, the state
round-trips through torch.load(weights_only=True) and continues exactly, and every method trains on
the five tiny families."""

from __future__ import annotations

import io

import pytest
import torch

from diffalign.objectives.nft import DiffusionNFT
from diffalign.objectives.online import PerPromptStats, group_advantages
from diffalign.objectives.policy_gradient import DDPO, FlowGRPO
from tests.foundation.conftest import FAMILIES, make_backbone  # noqa: F401  (fixture)

PROMPTS = ["a red circle", "a blue square"]


class MeanPixel:
    """A deterministic reward: the image's mean brightness."""

    def __call__(self, images, prompts):
        return images.float().mean((1, 2, 3))


def _batch(bb, prompts=PROMPTS):
    return {"prompts": list(prompts), "cond": bb.encode_prompts(list(prompts))}


def _make(name, **kw):
    base = {"steps": 3, "group_size": 2}
    if name == "ddpo":
        return DDPO(**{**base, "guidance_scale": 3.0, **kw})
    if name == "grpo":
        return FlowGRPO(**{**base, "guidance_scale": 3.0, **kw})
    return DiffusionNFT(**{**base, **kw})


def _lora(bb):
    return {n: p for n, p in bb.denoiser.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", ["ddpo", "grpo", "nft"])
def test_every_method_trains_on_every_family(make_backbone, family, name):  # noqa: F811
    torch.manual_seed(0)
    bb = make_backbone(family, lora=True)
    obj = _make(name)
    obj.setup(bb, reward=MeanPixel())
    params = list(_lora(bb).values())
    assert params and all(".old." not in n for n in _lora(bb))  # NFT's old adapter is not trained
    opt = torch.optim.Adam(params, lr=1e-2)  # steps of ~lr whatever the gradient's scale
    losses = []
    for _ in range(3):
        loss, metrics = obj.loss(_batch(bb), bb)
        assert torch.isfinite(loss) and all(not v.requires_grad for v in metrics.values())
        opt.zero_grad()
        loss.backward()
        assert sum(float(p.grad.abs().sum()) for p in params if p.grad is not None) > 0
        opt.step()
        obj.on_update(bb)
        losses.append(metrics)
    assert obj.rollouts >= 1 and "reward_mean" in losses[0]
    if name != "nft":  # the second call trains the same rollout after an update: the ratio is no longer 1
        assert losses[0]["ratio_dev"] == 0 and "reward_mean" not in losses[1]
        assert losses[1]["ratio_dev"] > 0


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", ["ddpo", "grpo"])
def test_on_policy_importance_ratio_is_exactly_one(make_backbone, family, name):  # noqa: F811
    """Every trained transition of a fresh rollout, recomputed with grad before any update: ratio == 1
    exactly, so the PPO loss is -mean(A) and no sample is clipped."""
    from diffalign.backbones.base import Cond  # noqa: F401

    bb = make_backbone(family, lora=True)
    from tests.foundation.conftest import perturb_lora

    perturb_lora(bb, 0.05)  # a policy different from the reference
    obj = _make(name, kl_beta=0.1, guidance_scale=3.0)
    obj.setup(bb, reward=MeanPixel())
    for _ in range(len(obj.buffer) or obj.steps):
        loss, m = obj.loss(_batch(bb), bb)
        assert m["ratio"].item() == 1.0 and m["ratio_dev"].item() == 0.0 and m["clipfrac"].item() == 0.0
        assert m["kl"].item() > 0  # the policy differs from the reference (adapter disabled)
        if obj.buffer.empty:
            break


@pytest.mark.parametrize("family", ["sd15", "sd2v", "sd3"])
def test_nft_loss_at_init_equals_hand_computed_value(make_backbone, family):  # noqa: F811
    """At initialisation old == current, so x0+ = x0- = x0_th and
    L = adv_clip_max * mean_i( mean((x0_th - x0)^2) / mean|x0_th - x0| ) / beta  (KL = 0: B = 0 LoRA)."""
    torch.manual_seed(0)
    bb = make_backbone(family, lora=True)
    obj = _make("nft", beta=0.5, kl_beta=0.3)
    obj.setup(bb, reward=MeanPixel())
    obj.collect(_batch(bb), bb)
    buf = obj.buffer.data
    from diffalign.objectives.online import row_noise

    loss, m = obj.loss(_batch(bb), bb)
    x0 = buf["x0"].float()
    t = buf["levels"][:, 0]
    eps = row_noise(tuple(x0.shape[1:]), buf["rows"], obj.seed, 0, 0, "train")
    xt = bb.add_noise(x0, eps, t)
    with torch.no_grad():
        x0_hat = bb.to_x0(bb.predict(xt, t, bb.encode_prompts([p for p in PROMPTS for _ in range(2)])), xt, t).float()
    per = (x0_hat - x0).pow(2).flatten(1).mean(1) / (x0_hat - x0).abs().flatten(1).mean(1)
    expected = 5.0 * per.mean() / 0.5
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert m["kl"].item() == 0.0 and m["old_deviate"].item() == 0.0


def test_nft_implicit_policies_weight_by_optimality():
    """r = 1 trains only x0+ = beta x0_th + (1 - beta) x0_old; r = 0 only x0- = (1 + beta) x0_old - beta x0_th."""
    class FlowStub:
        def to_x0(self, out, xt, t):
            return xt - out

    obj = DiffusionNFT(beta=0.5)
    x0, xt = torch.zeros(2, 1, 2, 2), torch.zeros(2, 1, 2, 2)
    out, old = torch.full_like(x0, -2.0), torch.full_like(x0, -1.0)  # x0_th = 2, x0_old = 1
    loss1, _ = obj.nft_loss(FlowStub(), out, old, xt, None, x0, torch.ones(2))
    loss0, _ = obj.nft_loss(FlowStub(), out, old, xt, None, x0, torch.zeros(2))
    pos, neg = 0.5 * 2 + 0.5 * 1, 1.5 * 1 - 0.5 * 2  # 1.5 and 0.5
    assert loss1.item() == pytest.approx(5 * (pos**2 / pos) / 0.5)
    assert loss0.item() == pytest.approx(5 * (neg**2 / neg) / 0.5)


def test_advantages_match_the_reference_statistics():
    r = torch.tensor([1.0, 2.0, 3.0, 5.0])
    prompts = ["a", "a", "b", "b"]
    a = group_advantages(r, prompts, global_std=False)
    torch.testing.assert_close(a, torch.tensor([-0.5 / (0.5 + 1e-4), 0.5 / (0.5 + 1e-4), -1 / (1 + 1e-4), 1 / (1 + 1e-4)]))
    g = group_advantages(r, prompts, global_std=True)
    std = r.std(unbiased=False).item()
    torch.testing.assert_close(g, torch.tensor([-0.5, 0.5, -1.0, 1.0]) / (std + 1e-4))
    stats = PerPromptStats(buffer_size=3, min_count=3)
    first = stats.update(r, prompts)  # 2 rewards per prompt < 3: batch statistics
    torch.testing.assert_close(first, (r - r.mean()) / (r.std(unbiased=False) + 1e-6))
    second = stats.update(torch.tensor([4.0, 0.0, 7.0]), ["a", "b", "c"])  # a: [1,2,4], b: [3,5,0]; c: 1 < 3
    hist_a, hist_b = torch.tensor([1.0, 2.0, 4.0]), torch.tensor([3.0, 5.0, 0.0])
    assert second[0].item() == pytest.approx(((4 - hist_a.mean()) / (hist_a.std(unbiased=False) + 1e-6)).item(), rel=1e-5)
    assert second[1].item() == pytest.approx(((0 - hist_b.mean()) / (hist_b.std(unbiased=False) + 1e-6)).item(), rel=1e-5)
    batch = torch.tensor([4.0, 0.0, 7.0])
    assert second[2].item() == pytest.approx(((7 - batch.mean()) / (batch.std(unbiased=False) + 1e-6)).item(), rel=1e-5)
    stats.update(torch.tensor([8.0]), ["a"])  # the buffer keeps the last 3
    assert torch.equal(stats.stats["a"], torch.tensor([2.0, 4.0, 8.0], dtype=torch.float64))


@pytest.mark.parametrize("name", ["ddpo", "grpo", "nft"])
def test_state_round_trips_and_continues_exactly(make_backbone, name):  # noqa: F811
    """Save the objective's state mid-rollout (torch.save / torch.load(weights_only=True)), build a fresh
    objective on a fresh copy of the weights, load: the following losses equal the uninterrupted ones."""
    def run(stop_after=None, state=None, weights=None):
        torch.manual_seed(0)
        bb = make_backbone("sd3", lora=True)
        obj = _make(name, steps=2)
        obj.setup(bb, reward=MeanPixel())
        if weights is not None:
            with torch.no_grad():
                for n, p in bb.denoiser.named_parameters():
                    if n in weights:
                        p.copy_(weights[n])
        if state is not None:
            obj.load_state_dict(state)
        opt = torch.optim.SGD(list(_lora(bb).values()), lr=0.05)
        out = []
        for i in range(5):
            if stop_after is not None and i == stop_after:
                buf = io.BytesIO()
                torch.save(obj.state_dict(), buf)
                buf.seek(0)
                w = {n: p.detach().clone() for n, p in bb.denoiser.named_parameters() if "lora" in n}
                return torch.load(buf, weights_only=True), w, out
            loss, _ = obj.loss(_batch(bb, ["a red circle", "a green triangle"] if i % 2 else PROMPTS), bb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            obj.on_update(bb)
            out.append(loss.item())
        return out

    full = run()
    state, weights, head = run(stop_after=3)
    # continue from call 3 with the saved state (the loop restores the LoRA and optimizer itself)
    torch.manual_seed(0)
    bb = make_backbone("sd3", lora=True)
    obj = _make(name, steps=2)
    obj.setup(bb, reward=MeanPixel())
    with torch.no_grad():
        for n, p in bb.denoiser.named_parameters():
            if n in weights:
                p.copy_(weights[n])
    obj.load_state_dict(state)
    opt = torch.optim.SGD(list(_lora(bb).values()), lr=0.05)
    tail = []
    for i in range(3, 5):
        loss, _ = obj.loss(_batch(bb, ["a red circle", "a green triangle"] if i % 2 else PROMPTS), bb)
        opt.zero_grad()
        loss.backward()
        opt.step()
        obj.on_update(bb)
        tail.append(loss.item())
    assert head + tail == full
