import pytest
import torch

from diffalign.backbones.base import Cond
from diffalign.objectives import DiffusionDRO
from diffalign.objectives.replay import LaggedSampler, ReplayBuffer
from diffalign.sampling.trajectories import rollout, rollout_levels

from .conftest import FAMILIES, perturb_lora


def _experts(bb, b=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"latents": torch.randn(bb.latent_shape(b), generator=g),
            "cond": bb.encode_prompts(["a red circle", "a blue square"][:b])}


def test_loss_is_zero_once_the_expert_beats_the_policy_sample_by_the_margin():
    dro = DiffusionDRO(margin=0.01)
    err_ref = torch.tensor([1.0, 1.0, 1.0, 1.0])
    # expert relative errors -0.05, -0.02; policy relative errors 0.0, 0.0: both beat it by > 0.01
    loss, m = dro.ranking_loss(torch.tensor([0.95, 0.98, 1.0, 1.0]), err_ref)
    assert loss.item() == 0.0 and m["margin_met"] == 1.0
    # second pair beaten by only 0.005 < margin: hinge = 0.005 on it
    loss, m = dro.ranking_loss(torch.tensor([0.95, 0.995, 1.0, 1.0]), err_ref)
    assert loss.item() == pytest.approx(0.005 / 2, abs=1e-6) and m["margin_met"] == 0.5
    # the policy sample fits better than the expert: positive loss, as the equation says
    loss, _ = dro.ranking_loss(torch.tensor([1.0, 1.0, 0.9, 0.9]), err_ref)
    assert loss.item() == pytest.approx(0.1 + 0.01, abs=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_replay_buffer_stores_the_samplers_own_predictions(family, make_backbone, monkeypatch):
    bb = make_backbone(family, lora=True)
    perturb_lora(bb)
    cond = bb.encode_prompts(["a red circle", "a blue square"])
    used = []
    real = bb.predict

    def spy(xt, t, c, reference=False):
        out = real(xt, t, c, reference=reference)
        used.append((xt.clone(), t.clone(), out.clone()))
        return out

    monkeypatch.setattr(bb, "predict", spy)
    traj = rollout(bb, cond, steps=4, jitter=0.05)
    assert len(used) == 4
    for i, (xt, t, out) in enumerate(used):
        assert torch.equal(traj["xt"][i], xt) and torch.equal(traj["t"][i], t) and torch.equal(traj["pred"][i], out)
    for i in range(3):  # each state is the DDIM step of the previous one with the stored prediction
        nxt = bb.ddim_step(traj["pred"][i], traj["xt"][i], traj["t"][i], traj["t"][i + 1])
        assert torch.equal(nxt, traj["xt"][i + 1])
    buf = ReplayBuffer(2)
    buf.add(traj, torch.zeros(bb.latent_shape(2)), cond)
    torch.manual_seed(0)
    t, _, c, xt, pred = buf.sample(torch.device("cpu"))
    for j in range(2):  # a drawn state is one of the stored (t, x_t, prediction) triples of its sample
        k = int((traj["t"][:, j] == t[j]).nonzero()[0])
        assert torch.equal(xt[j], traj["xt"][k, j]) and torch.equal(pred[j], traj["pred"][k, j])
    assert c.tensors.keys() == cond.tensors.keys()
    assert all(torch.equal(c.tensors[k], cond.tensors[k]) for k in cond.tensors)  # the conditioning it was rolled out for


@pytest.mark.parametrize("family", ["sd15", "sd3"])
def test_rollout_levels_run_from_pure_noise_to_clean_with_per_sample_jitter(family, make_backbone):
    bb = make_backbone(family)
    torch.manual_seed(0)
    lv = rollout_levels(bb, 64, steps=20, jitter=0.05, device=torch.device("cpu"))
    assert lv.shape == (21, 64)
    assert (lv[0] == bb.max_timestep).all() and (lv[-1] == 0).all()
    assert (lv[1:] < lv[:-1]).all()  # strictly decreasing per sample
    interior = bb.num_train_timesteps - torch.arange(1, 20)[:, None] * 50 - lv[1:-1]
    assert (interior >= 0).all() and (interior < 50).all() and len(set(lv[1].tolist())) > 10


def test_buffer_keeps_the_last_k_trajectories_and_round_trips_its_state():
    buf = ReplayBuffer(2)
    cond = Cond({"e": torch.zeros(1, 3)})
    for n in range(3):
        traj = {"t": torch.full((2, 1), n), "xt": torch.full((2, 1, 4), float(n)), "pred": torch.zeros(2, 1, 4)}
        buf.add(traj, torch.zeros(1, 4), cond)
    assert len(buf) == 2 and [int(it["t"][0, 0]) for it in buf.items] == [1, 2]
    other = ReplayBuffer(5)
    other.load_state_dict(buf.state_dict())
    assert other.size == 2 and all(torch.equal(a["xt"], b["xt"]) for a, b in zip(other.items, buf.items, strict=True))


def test_lagged_sampler_with_lora_keeps_only_the_lora_tensors_and_restores_the_policy(make_backbone):
    bb = make_backbone("sd15", lora=True)
    lag = LaggedSampler(refresh_every=2)
    lag.refresh(bb.denoiser)
    assert lag.snapshot and all("lora" in n for n in lag.snapshot)
    n_lagged = sum(v.numel() for v in lag.snapshot.values())
    assert n_lagged < 0.2 * sum(p.numel() for p in bb.denoiser.parameters())
    cond = bb.encode_prompts(["a red circle"])
    x, t = torch.randn(bb.latent_shape(1)), torch.tensor([500])
    with torch.no_grad():
        old = bb.predict(x, t, cond)
        perturb_lora(bb)  # an optimizer update moves the policy
        lag.on_update(bb.denoiser)  # update 1 of 2: no refresh yet
        new = bb.predict(x, t, cond)
        with lag.active(bb.denoiser):
            assert torch.equal(bb.predict(x, t, cond), old)  # rollouts see the lagged weights
        assert torch.equal(bb.predict(x, t, cond), new)  # and the policy is restored after
        lag.on_update(bb.denoiser)  # update 2: refresh
        with lag.active(bb.denoiser):
            assert torch.equal(bb.predict(x, t, cond), new)


def test_lagged_sampler_refreshed_every_update_keeps_no_copy(make_backbone):
    bb = make_backbone("sd15", lora=True)
    lag = LaggedSampler(refresh_every=1)
    lag.refresh(bb.denoiser)
    lag.on_update(bb.denoiser)
    assert lag.snapshot == {}  # weights only change at updates, so the lagged policy is the current one


@pytest.mark.parametrize("family", FAMILIES)
def test_loss_equals_the_margin_at_init_and_moves_the_policy(family, make_backbone):
    bb = make_backbone(family, lora=True)
    dro = DiffusionDRO(margin=0.001, rollout_steps=3)
    dro.setup(bb)
    batch = _experts(bb)
    dro.collect(batch, bb)  # the loop calls this before every loss: a rollout into the buffer
    assert len(dro.buffer) == 1
    loss, m = dro.loss(batch, bb)
    # policy == reference: both relative errors are exactly 0, so the hinge is the margin
    assert loss.item() == pytest.approx(0.001, abs=1e-7) and m["rel_err_expert"] == 0.0
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in bb.trainable_parameters())
