"""ID-Aligner: reward feedback with an identity reward whose references come with the batch, as a LoRA or as
an adapter (decoupled cross-attention fed the reference's image embedding)."""

import json
from pathlib import Path

import pytest
import torch

import rewards
from diffalign.backbones.user_attention import injection_parameters, set_scale, with_user
from diffalign.config import load_config
from diffalign.data.prompts import PromptDataError, PromptDataset, collate_prompts
from diffalign.objectives import build_objective
from diffalign.personalization.encoder import load_image_encoder
from diffalign.toyworld.identity import portrait_prompt, reference_images
from diffalign.training import train
from rewards.base import Reward
from tests.sampling.conftest import FAMILIES, tiny

D = 32  # the toy identity network's embedding size
OPTS = dict(steps=3, k_lo=1, k_hi=2, guidance_scale=2.0)


class Spy(Reward):
    """Brightness, recording the contexts it was given."""

    name = "spy"
    differentiable = True

    def __init__(self):
        super().__init__()
        self.contexts = []

    def score(self, images, prompts, context=None):
        self.contexts.append(context)
        return images.flatten(1).mean(1)


def _batch(bb, names=("Ada", "Ben"), encoder=None):
    prompts = ["a portrait"] * len(names)
    refs = torch.stack([reference_images(n, 2, seed=0) for n in names])  # [B,K,3,32,32]
    cond = bb.encode_prompts(prompts)
    if encoder is not None:
        cond = with_user(cond, torch.stack([encoder(r) for r in refs]))
    return {"prompts": prompts, "cond": cond, "references": refs}


@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_gradients_reach_only_the_new_projections(family):
    torch.manual_seed(0)
    bb = tiny(family, lora=True)
    obj = build_objective("idaligner", form="adapter", embed_dim=D, **OPTS)
    obj.setup(bb, reward=rewards.from_spec("toy_identity:1,toy_aesthetic:1"))
    new = injection_parameters(bb)
    assert {id(p) for p in new} == {id(p) for p in bb.trainable_parameters()}  # the LoRA is frozen
    batch = _batch(bb, encoder=load_image_encoder("toy_identity"))
    loss, m = obj.loss(batch, bb)
    assert torch.isfinite(loss) and {"reward/toy_identity", "reward/toy_aesthetic"} <= set(m)
    loss.backward()
    v = [p for n, p in bb.denoiser.named_parameters() if "to_v_user" in n and n.endswith("weight")]
    assert v and all(p.grad is not None and p.grad.abs().sum() > 0 for p in v)  # W'_v starts at 0: its grad first
    opt = torch.optim.SGD(new, lr=1.0)
    opt.step()
    opt.zero_grad()
    torch.manual_seed(0)
    obj.loss(batch, bb)[0].backward()
    for name in ("to_k_user", "user_projection"):
        ps = [p for n, p in bb.denoiser.named_parameters() if name in n]
        assert ps and any(p.grad is not None and p.grad.abs().sum() > 0 for p in ps), name


@pytest.mark.parametrize("family", ["sd15", "sd3", "flux"])
def test_adapter_scale_zero_is_the_base(family):
    bb = tiny(family, lora=True)
    reward = rewards.load("toy_identity")
    base = build_objective("refl", **OPTS)
    base.setup(bb, reward=reward)
    batch = _batch(bb)
    torch.manual_seed(3)
    want, _ = base.loss(batch, bb)
    obj = build_objective("idaligner", form="adapter", embed_dim=D, **OPTS)
    obj.setup(bb, reward=reward)
    with torch.no_grad():
        for p in injection_parameters(bb):
            p.add_(0.3 * torch.randn_like(p))
    batch = _batch(bb, encoder=load_image_encoder("toy_identity"))
    torch.manual_seed(3)
    acting, _ = obj.loss(batch, bb)
    assert not torch.allclose(acting, want)  # the adapter does act
    set_scale(bb, 0.0)
    torch.manual_seed(3)
    got, _ = obj.loss(batch, bb)
    assert torch.equal(got.detach(), want.detach())


def test_the_reward_sees_the_batch_references():
    bb = tiny("sd15", lora=True)
    spy = Spy()
    obj = build_objective("idaligner", form="lora", lora_weight=0.5, **OPTS)
    obj.setup(bb, reward=spy)
    batch = _batch(bb, names=("Cleo", "Dev"))
    _, m = obj.loss(batch, bb)
    assert spy.contexts[-1]["reference_faces"] is batch["references"]
    assert "pretrain_mse" in m  # L_id_lora: denoising loss on the encoded references
    draft = build_objective("draft", steps=3, lv_copies=2, guidance_scale=2.0)
    draft.setup(bb, reward=spy)
    draft.loss(batch, bb)
    tiled = spy.contexts[-1]["reference_faces"]  # the prompts are tiled [p0, p1, p0, p1]: so are the references
    assert tiled.shape[0] == 4 and torch.equal(tiled[2], batch["references"][0])
    with pytest.raises(ValueError, match="no reference images"):
        obj.loss({k: v for k, v in batch.items() if k != "references"}, bb)
    ad = build_objective("idaligner", form="adapter", embed_dim=D, **OPTS)
    ad.setup(tiny("sd15"), reward=spy)
    with pytest.raises(ValueError, match="no reference embedding"):
        ad.loss(batch, bb)


def _write_refs(root: Path, names):
    from torchvision.utils import save_image

    rows = []
    for n in names:
        (root / "refs").mkdir(parents=True, exist_ok=True)
        save_image(reference_images(n, 1, seed=0)[0], root / "refs" / f"{n}.png")
        rows.append({"prompt": "a portrait", "reference": f"refs/{n}.png"})
    f = root / "train.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return f


def test_prompt_rows_carry_references_and_embeddings(tmp_path):
    f = _write_refs(tmp_path, ["Ada", "Ben", "Cleo"])
    ds = PromptDataset(f, encoder=load_image_encoder("toy_identity"))
    b = collate_prompts([ds[0], ds[2]])
    assert b["references"].shape == (2, 1, 3, 32, 32) and b["cond_extra"]["user_embedding"].shape == (2, D)
    shared = PromptDataset([portrait_prompt("Ada")] * 3, references=reference_images("Ada", 2)[None])
    assert collate_prompts([shared[0], shared[1]])["references"].shape == (1, 2, 3, 32, 32)
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a portrait", "reference": "refs/Ada.png"}\n'
                                        '{"prompt": "a portrait", "reference": "refs/nobody.png"}\n')
    with pytest.raises(PromptDataError, match=r"bad.jsonl, line 2.*nobody.png"):
        PromptDataset(tmp_path / "bad.jsonl")


def _cfg(tmp_path, name, objective, data, reward_extra=""):
    f = tmp_path / f"{name}.yaml"
    f.write_text(f"""
model: {{path: "tiny:sd15", lora_rank: 4}}
data: {{train: "{data}"}}
objective: {{name: idaligner, steps: 3, k_lo: 1, k_hi: 2, guidance_scale: 2.0, {objective}}}
reward: {{train: "toy_identity:1,toy_aesthetic:1" {reward_extra}}}
train: {{steps: 2, batch_size: 2, lr: 1.0e-3, lr_scheduler: constant, checkpoint_every: 2, sample_every: 0,
        log_every: 1, progress: false, output_dir: {tmp_path / name}}}
""")
    return load_config(f)


def test_both_forms_train_through_the_loop(tmp_path):
    f = _write_refs(tmp_path, ["Ada", "Ben", "Cleo", "Dev"])
    res = train(_cfg(tmp_path, "adapter", "form: adapter, embed_dim: 32, encoder: toy_identity", f))
    assert res["status"] == "completed"
    assert (tmp_path / "adapter" / "final" / "user_injection.safetensors").is_file()
    metrics = [json.loads(s) for s in (tmp_path / "adapter" / "metrics.jsonl").read_text().splitlines()]
    assert all("reward/toy_identity" in m for m in metrics)
    (tmp_path / "prompts.txt").write_text("a portrait of Ada\n" * 4)
    res = train(_cfg(tmp_path, "lora", "form: lora, lora_weight: 0.1", tmp_path / "prompts.txt",
                     f', reference_faces: "{tmp_path / "refs" / "Ada.png"}"'))
    assert res["status"] == "completed"
    with pytest.raises(ValueError, match=r"reward.reference_faces.*missing.png"):
        train(_cfg(tmp_path, "bad", "form: lora", tmp_path / "prompts.txt",
                   f', reference_faces: "{tmp_path / "missing.png"}"'))


def test_tiny_recipe_runs(tmp_path):
    from torchvision.utils import save_image

    (tmp_path / "refs").mkdir()
    for i, x in enumerate(reference_images("Ada", 2)):
        save_image(x, tmp_path / "refs" / f"{i}.png")
    (tmp_path / "p.txt").write_text("a portrait of Ada\n" * 4)
    root = Path(__file__).resolve().parents[2]
    cfg = load_config(root / "configs" / "tiny_idaligner.yaml", [
        "--train.steps", "2", "--train.sample_every", "0", "--train.output_dir", str(tmp_path / "run"),
        "--data.train", str(tmp_path / "p.txt"), "--reward.reference_faces", str(tmp_path / "refs")])
    assert train(cfg)["status"] == "completed"
