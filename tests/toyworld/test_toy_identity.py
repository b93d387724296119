"""Toy identities: characters, reference images, the identity network and the ``toy_identity`` reward."""

import csv
import subprocess
import sys

import pytest
import torch

import rewards
from diffalign.toyworld.identity import (
    CHARACTERS,
    HELDOUT_CHARACTERS,
    TRAIN_CHARACTERS,
    load_identity_net,
    portrait_prompt,
    reference_images,
    train_identity_net,
)
from rewards.base import RewardInputError


def test_characters_are_distinct_and_split():
    combos = {(c.head, c.body) for c in CHARACTERS.values()}
    assert len(combos) == len(CHARACTERS) == 12
    assert set(TRAIN_CHARACTERS).isdisjoint(HELDOUT_CHARACTERS) and len(HELDOUT_CHARACTERS) == 4
    assert portrait_prompt("Ada") == "a portrait of Ada"
    a, b = reference_images("Ada", 3, seed=0), reference_images("Ada", 3, seed=1)
    assert a.shape == (3, 3, 32, 32) and torch.equal(a, reference_images("Ada", 3, seed=0)) and not torch.equal(a, b)
    with pytest.raises(ValueError, match="unknown toy character 'Zed'"):
        reference_images("Zed")


def test_toy_identity_reward_is_higher_for_the_reference_identity():
    r = rewards.load("toy_identity")
    names = list(CHARACTERS)
    refs = {n: reference_images(n, 4, seed=0) for n in names}
    for i, n in enumerate(names):
        images = reference_images(n, 6, seed=7)  # other renders of the same character
        own = r(images, None, {"reference_faces": refs[n][None]})
        other = r(images, None, {"reference_faces": refs[names[(i + 1) % 12]][None]})
        assert float(own.mean()) > 0.8 and float(own.mean()) > float(other.mean()) + 0.5, n
        assert bool((own > other).all()), n


def test_toy_identity_context_forms_and_gradients():
    r = rewards.load("toy_identity")
    x = reference_images("Ben", 2, seed=3).requires_grad_(True)
    ref = reference_images("Ben", 2, seed=0)
    one_each = r(x, None, {"reference_faces": ref})  # [B,3,H,W]: one reference per image
    shared = r(x, None, {"reference_faces": ref[None]})  # [1,K,3,H,W]: K for every image
    per_row = r(x, None, {"reference_faces": ref[None].expand(2, -1, -1, -1, -1)})  # [B,K,3,H,W]
    torch.testing.assert_close(shared, per_row)
    assert one_each.shape == (2,)
    emb = torch.nn.functional.normalize(r.net(ref).mean(0, keepdim=True), dim=-1)
    torch.testing.assert_close(r(x, None, {"reference_embeddings": emb}), shared)
    shared.sum().backward()
    assert x.grad.abs().sum() > 0  # differentiable in the pixels
    with pytest.raises(RewardInputError, match="reference_faces"):
        r(x, None, None)
    with pytest.raises(RewardInputError, match="3 references for 2 images"):
        r(x, None, {"reference_faces": reference_images("Ben", 3)})
    assert rewards.load("toy_identity").differentiable


def test_train_identity_net_saves_and_loads(tmp_path):
    net = train_identity_net(tmp_path / "net", steps=3, batch=8, dim=8, width=4, progress=False)
    loaded = load_identity_net(tmp_path / "net")
    x = reference_images("Cleo", 2)
    torch.testing.assert_close(loaded(x), net(x))
    assert loaded(x).shape == (2, 8)
    r = rewards.load("toy_identity", path=str(tmp_path / "net"))
    assert r(x, None, {"reference_faces": x}).shape == (2,)
    with pytest.raises(FileNotFoundError, match="not a toy identity network folder"):
        load_identity_net(tmp_path)


def test_train_identity_net_can_leave_characters_out(tmp_path):
    import json

    train_identity_net(tmp_path / "net", steps=1, batch=4, dim=8, width=4, progress=False, exclude=HELDOUT_CHARACTERS)
    cfg = json.loads((tmp_path / "net" / "config.json").read_text())
    assert cfg["classes"] == 270 - len(HELDOUT_CHARACTERS) and cfg["excluded"] == list(HELDOUT_CHARACTERS)


def _png(images, folder, prefix):
    from torchvision.utils import save_image

    folder.mkdir(parents=True, exist_ok=True)
    for i, im in enumerate(images):
        save_image(im, folder / f"{prefix}{i}.png")


def test_score_cli_reference_faces(tmp_path):
    _png(reference_images("Ada", 2, seed=5), tmp_path / "imgs", "a")
    _png(reference_images("Dev", 2, seed=5), tmp_path / "imgs", "d")
    _png(reference_images("Ada", 3, seed=0), tmp_path / "ref", "r")
    (tmp_path / "p.txt").write_text("a portrait of Ada\n")
    cmd = [sys.executable, "-m", "diffalign.cli", "score", "--reward", "toy_identity", "--images",
           str(tmp_path / "imgs"), "--prompts", str(tmp_path / "p.txt"), "--out", str(tmp_path / "s.csv"),
           "--no-progress", "--device", "cpu"]
    res = subprocess.run([*cmd, "--reference-faces", str(tmp_path / "ref")], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    rows = list(csv.DictReader(open(tmp_path / "s.csv")))
    score = {r["file"]: float(r["toy_identity"]) for r in rows}
    assert min(score["a0.png"], score["a1.png"]) > max(score["d0.png"], score["d1.png"])
    missing = subprocess.run([*cmd, "--reference-faces", str(tmp_path / "nope.png")], capture_output=True, text=True)
    assert missing.returncode == 2 and "--reference-faces" in missing.stderr and "nope.png" in missing.stderr
    none = subprocess.run(cmd, capture_output=True, text=True)
    assert none.returncode == 2 and "reference_faces" in none.stderr
