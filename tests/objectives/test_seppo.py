"""SePPO: the per-sample criterion, the DPO limit, random checkpoint replay (LoRA tensors only, in the
objective's state), the loop end to end with exact resume, and every tiny family."""

import io
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diffalign.config import load_config
from diffalign.objectives import DiffusionDPO, build_objective
from diffalign.objectives.seppo import SePPO, winning_mask
from diffalign.training import train
from tests.helpers import write_experts

from .conftest import FAMILIES, perturb_lora

ROOT = Path(__file__).resolve().parents[2]


def _nls(z):
    return math.log1p(math.exp(-z))  # -log sigmoid(z)


def test_anchor_criterion_picks_the_dpo_term_and_the_sft_like_term_on_hand_made_cases():
    # the paper's AAF: the sign comes from the policy's and the checkpoint's errors on the WINNER (anchor)
    # pair 0: policy fits the winner BETTER than checkpoint j (D_w = -0.01): x^l is a loser, DPO term
    # pair 1: checkpoint j fits the winner better (D_w = +0.02): x^l is taken as a winner, SFT-like term
    err = torch.tensor([0.50, 0.44, 0.62, 0.57])
    err_ref = torch.tensor([0.51, 0.42, 0.60, 0.60])
    d_w, d_l = [-0.01, 0.02], [0.02, -0.03]
    beta = 100.0
    obj = SePPO(beta=beta)
    assert obj.criterion == "anchor"
    loss, m = obj.seppo_loss(err, err_ref)
    dpo0 = _nls(-beta / 2 * (d_w[0] - d_l[0]))  # DPO on pair 0
    sft1 = _nls(-beta / 2 * (d_w[1] + d_l[1]))  # SFT-like on pair 1
    assert loss.item() == pytest.approx((dpo0 + sft1) / 2, rel=1e-5)
    assert m["sft_fraction"].item() == 0.5
    # the SFT-like term pulls the reference sample's error DOWN; the DPO term pushes it UP; both pull the
    # winner's error down
    e = err.clone().requires_grad_(True)
    obj.seppo_loss(e, err_ref)[0].backward()
    assert e.grad[2] < 0 and e.grad[3] > 0 and e.grad[0] > 0 and e.grad[1] > 0
    # the decision ignores x^l's own errors; a tie on the anchor is a loser
    assert winning_mask(torch.tensor([0.02, 0.02]), torch.tensor([0.5, -0.5]), "anchor").tolist() == [True, True]
    assert winning_mask(torch.tensor([0.0, -0.02]), torch.tensor([-0.5, 0.5]), "anchor").tolist() == [False, False]


def test_reference_criterion_reads_the_reference_samples_own_fit():
    # pair 0: policy fits x^l WORSE than its checkpoint (D_l = +0.02): a loser, DPO term
    # pair 1: policy fits x^l BETTER than its checkpoint (D_l = -0.03): a winner, SFT-like
    err = torch.tensor([0.50, 0.40, 0.62, 0.57])
    err_ref = torch.tensor([0.51, 0.42, 0.60, 0.60])
    beta = 100.0
    loss, m = SePPO(beta=beta, criterion="reference").seppo_loss(err, err_ref)
    d_w, d_l = [-0.01, -0.02], [0.02, -0.03]
    assert loss.item() == pytest.approx((_nls(-beta / 2 * (d_w[0] - d_l[0])) + _nls(-beta / 2 * (d_w[1] + d_l[1]))) / 2,
                                        rel=1e-5)
    assert m["sft_fraction"].item() == 0.5
    # here the anchor criterion takes both as losers (the policy fits both winners better)
    assert SePPO(beta=beta).seppo_loss(err, err_ref)[1]["sft_fraction"].item() == 0.0
    assert winning_mask(torch.tensor([-0.05]), torch.tensor([-0.03]), "reference").tolist() == [True]
    assert not winning_mask(torch.tensor(d_w), torch.tensor(d_l), "never").any()


def test_loss_equals_the_dpo_loss_when_every_reference_sample_is_a_loser():
    g = torch.Generator().manual_seed(0)
    err_ref = torch.rand(16, generator=g)
    err = err_ref + torch.cat([-(torch.rand(8, generator=g) * 0.01 + 1e-4), torch.rand(8, generator=g) * 0.01 + 1e-4])
    for criterion in ("reference", "anchor", "never"):  # all D_l > 0, all D_w < 0: no sample is flagged winning
        loss, m = SePPO(beta=500.0, criterion=criterion).seppo_loss(err, err_ref)
        dpo, _ = DiffusionDPO(beta=500.0).preference_loss(err, err_ref)
        assert m["sft_fraction"].item() == 0.0
        assert torch.equal(loss, dpo)
    # "never" is the DPO loss whatever the errors are
    err2 = err_ref - 0.01
    assert torch.equal(SePPO(beta=500.0, criterion="never").seppo_loss(err2, err_ref)[0],
                       DiffusionDPO(beta=500.0).preference_loss(err2, err_ref)[0])


def test_options_are_validated():
    with pytest.raises(ValueError, match=r"objective\.criterion"):
        build_objective("seppo", criterion="sometimes")
    with pytest.raises(ValueError, match=r"objective\.snapshot_every"):
        build_objective("seppo", snapshot_every=0)


def test_checkpoint_replay_keeps_lora_tensors_and_survives_save_load(make_backbone):
    bb = make_backbone("sd15", lora=True)
    obj = SePPO(snapshot_every=2, max_snapshots=3)
    obj.setup(bb)
    assert len(obj.snapshots) == 1 and all("lora" in n for n in obj.snapshots[0])
    n_snap = sum(v.numel() for v in obj.snapshots[0].values())
    assert n_snap < 0.2 * sum(p.numel() for p in bb.denoiser.parameters())
    for k in range(6):  # 6 updates, a snapshot every 2: 3 more, capped at 3 (start kept, oldest after it dropped)
        perturb_lora(bb, seed=k)
        obj.on_update(bb)
    assert len(obj.snapshots) == 3 and obj.updates == 6
    assert all(v.abs().sum() == 0 for n, v in obj.snapshots[0].items() if "lora_B" in n)  # the start
    lora_b = next(n for n in obj.snapshots[2] if "lora_B" in n)
    assert torch.equal(obj.snapshots[2][lora_b], dict(bb.denoiser.named_parameters())[lora_b].detach())
    buf = io.BytesIO()
    torch.save(obj.state_dict(), buf)
    buf.seek(0)
    other = SePPO(snapshot_every=2, max_snapshots=3)
    other.load_state_dict(torch.load(buf, weights_only=True))
    assert other.updates == 6 and len(other.snapshots) == 3
    assert all(torch.equal(a[n], b[n]) for a, b in zip(obj.snapshots, other.snapshots, strict=True) for n in a)


def test_the_reference_is_the_drawn_checkpoint_and_the_policy_is_restored(make_backbone):
    bb = make_backbone("sd15", lora=True)
    obj = SePPO(rollout_steps=2, snapshot_every=1)
    obj.setup(bb)  # snapshot 0: the start (LoRA B = 0)
    perturb_lora(bb, seed=1)
    obj.on_update(bb)  # snapshot 1: the current weights
    cond = bb.encode_prompts(["a red circle", "a blue square"])
    batch = {"latents": torch.randn(bb.latent_shape(2)), "cond": cond}
    before = {n: p.detach().clone() for n, p in bb.denoiser.named_parameters() if p.requires_grad}
    torch.manual_seed(0)
    obj.collect(batch, bb)
    j = obj.current[0]
    loss, m = obj.loss(batch, bb)
    assert m["snapshot"].item() == j
    assert all(torch.equal(p, before[n]) for n, p in bb.denoiser.named_parameters() if p.requires_grad)
    if j == 1:  # reference == policy: both relative errors are exactly 0, loss = ln 2
        assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in bb.trainable_parameters())
    # drawing snapshot 1 (== policy) gives ln 2 exactly; find a seed that draws it
    for s in range(20):
        torch.manual_seed(s)
        obj.collect(batch, bb)
        if obj.current[0] == 1:
            loss, m = obj.loss(batch, bb)
            assert loss.item() == pytest.approx(math.log(2), abs=1e-6) and m["rel_err_l"].item() == 0.0
            break
    else:
        pytest.fail("snapshot 1 never drawn")


@pytest.mark.parametrize("family", FAMILIES)
def test_loss_runs_and_moves_the_policy_on_every_tiny_family(family, make_backbone):
    bb = make_backbone(family, lora=True)
    obj = SePPO(rollout_steps=2, snapshot_every=1)
    obj.setup(bb)
    g = torch.Generator().manual_seed(0)
    batch = {"latents": torch.randn(bb.latent_shape(2), generator=g),
             "cond": bb.encode_prompts(["a red circle", "a blue square"])}
    with torch.no_grad():
        obj.collect(batch, bb)
    loss, m = obj.loss(batch, bb)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)  # policy == the only snapshot (the start)
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in bb.trainable_parameters())


def _cfg(tmp_path, out, steps=4):
    f = tmp_path / "seppo.yaml"
    f.write_text(f"""
model: {{path: "tiny:sd15", lora_rank: 4}}
data: {{train: {tmp_path / 'experts.jsonl'}, prompt_dropout: 0.2}}
objective: {{name: seppo, beta: 500, rollout_steps: 2, snapshot_every: 1}}
train: {{steps: {steps}, batch_size: 2, lr: 1.0e-3, lr_scheduler: constant, checkpoint_every: 2, sample_every: 0,
        sample_steps: 2, log_every: 1, progress: false, output_dir: {out}}}
""")
    return load_config(f)


def test_trains_through_the_loop_and_resume_restores_the_snapshots_exactly(tmp_path):
    """4 steps straight == 2 steps, stop, resume to 4, bit for bit: the snapshots are objective state."""
    write_experts(tmp_path)
    straight = train(_cfg(tmp_path, tmp_path / "a"))
    train(_cfg(tmp_path, tmp_path / "b", steps=2))
    state = torch.load(tmp_path / "b" / "checkpoints" / "step_00000002" / "state" / "diffalign_state_0.pt",
                       weights_only=True)
    assert len(state["objective"]["snapshots"]) == 3 and state["objective"]["updates"] == 2
    resumed = train(_cfg(tmp_path, tmp_path / "b"), resume="latest")
    a = load_file(str(Path(straight["weights"]) / "pytorch_lora_weights.safetensors"))
    b = load_file(str(Path(resumed["weights"]) / "pytorch_lora_weights.safetensors"))
    assert any(v.abs().sum() > 0 for k, v in a.items() if "up" in k)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("recipe", ["tiny_seppo", "sd15_seppo"])
def test_recipes_validate(recipe):
    cfg = load_config(ROOT / "configs" / f"{recipe}.yaml")
    assert cfg.objective.name == "seppo"


def test_reference_samples_can_use_cfg(make_backbone):
    bb = make_backbone("sd15", lora=True)
    obj = SePPO(rollout_steps=2, guidance_scale=3.0)
    obj.setup(bb)
    batch = {"latents": torch.randn(bb.latent_shape(2)), "cond": bb.encode_prompts(["a red circle", "a blue square"])}
    torch.manual_seed(0)
    with torch.no_grad():
        obj.collect(batch, bb)
    guided = obj.current[1].clone()
    obj.guidance_scale = 1.0
    torch.manual_seed(0)
    with torch.no_grad():
        obj.collect(batch, bb)
    assert guided.shape == obj.current[1].shape and not torch.equal(guided, obj.current[1])
    loss, _ = obj.loss(batch, bb)
    assert torch.isfinite(loss)
