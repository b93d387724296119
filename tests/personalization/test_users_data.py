"""Multi-user pairs (user_id column, k-shot embeddings from other pairs, dropout, errors) and toy users."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from diffalign.data.pairs import PreferencePairs
from diffalign.data.users import UserDataError, UserPairs, collate_user_pairs, read_user_ids, user_choices


class MeanColour:
    """A stand-in user encoder: g = mean RGB of the winner - mean RGB of the loser (3-d)."""

    name, dim = "mean_colour", 3

    def encode_triples(self, prompts, w, lose):
        return w.mean((2, 3)) - lose.mean((2, 3))


def _write(tmp_path, users):
    (tmp_path / "images").mkdir(exist_ok=True)
    rows, rng = [], np.random.default_rng(0)
    for u, n in users.items():
        for j in range(n):
            names = []
            for s in range(2):
                name = f"images/{u}_{j}_{s}.png"
                Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(tmp_path / name)
                names.append(name)
            rows.append({"caption": f"a red circle {j}", "jpg_0": names[0], "jpg_1": names[1],
                         "label_0": 1.0 if j % 2 else 0.0, "user_id": u})
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_embedding_comes_from_other_pairs_of_the_same_user(tmp_path):
    path = _write(tmp_path, {"alice": 6, "bob": 5})
    assert read_user_ids(path) == ["alice"] * 6 + ["bob"] * 5
    ds = UserPairs(PreferencePairs(path, resolution=16, random_flip=False), MeanColour(), k=4,
                   embedding_dropout=0.0, progress=False)
    assert len(ds) == 11 and ds.users == ["alice", "bob"] and ds.dim == 3
    # bob has 5 pairs: the embedding of each is exactly the pool of the 4 others
    from diffalign.personalization.encoder import pool

    for i in range(6, 11):
        item = ds[i]
        row = item["row"]
        others = [r for r in ds.rows_by_user["bob"] if r != row]
        assert item["user_id"] == "bob"
        assert torch.allclose(item["user_embedding"], pool(torch.stack([ds.vectors[r] for r in others])), atol=1e-6)
    batch = collate_user_pairs([ds[0], ds[7]])
    assert batch["cond_extra"]["user_embedding"].shape == (2, 3) and batch["user_ids"] == ["alice", "bob"]


def test_embedding_dropout_zeroes(tmp_path):
    path = _write(tmp_path, {"alice": 6})
    ds = UserPairs(PreferencePairs(path, resolution=16, random_flip=False), MeanColour(), k=2,
                   embedding_dropout=0.5, progress=False)
    torch.manual_seed(0)
    zeros = [bool((ds[i % 6]["user_embedding"] == 0).all()) for i in range(200)]
    assert 60 < sum(zeros) < 140


def test_too_few_pairs_names_user_and_file(tmp_path):
    path = _write(tmp_path, {"alice": 6, "bob": 3})
    with pytest.raises(UserDataError, match=r"pairs\.jsonl.*'bob' \(3\)"):
        UserPairs(PreferencePairs(path, resolution=16), MeanColour(), k=4, progress=False)
    ds = UserPairs(PreferencePairs(path, resolution=16), MeanColour(), k=4, on_few_pairs="skip", progress=False)
    assert ds.users == ["alice"] and len(ds) == 6


def test_missing_user_id_names_the_row(tmp_path):
    path = _write(tmp_path, {"alice": 2})
    lines = path.read_text().splitlines()
    row = json.loads(lines[1])
    del row["user_id"]
    path.write_text(lines[0] + "\n\n" + json.dumps(row) + "\n")
    with pytest.raises(UserDataError, match=r"row 1 \(line 3\): no user_id"):
        read_user_ids(path)


def test_user_choices(tmp_path):
    path = _write(tmp_path, {"alice": 4, "bob": 5})
    prompts, w, lose = user_choices(path, "alice", 16, min_pairs=4)
    assert len(prompts) == 4 and w.shape == (4, 3, 16, 16)
    with pytest.raises(UserDataError, match="'carol' has 0 decided pairs.*users in the file: alice, bob"):
        user_choices(path, "carol", 16, min_pairs=4)


def test_toy_users_disagree_on_open_attributes(tmp_path):
    from diffalign.toyworld.shapes import Obj, Placement, Scene, parse_caption, render_placements
    from diffalign.toyworld.users import FEATURES, SyntheticUser, features, open_prompts, population, user_pairs

    small_left = torch.from_numpy(render_placements([Placement("red", "circle", 8, 16, 4.5)]))
    large_right = torch.from_numpy(render_placements([Placement("red", "circle", 24, 16, 7)]))
    f = features(torch.stack([small_left, large_right]))
    assert f[0, 0] < -0.3 < 0.3 < f[1, 0]  # size
    assert f[0, 1] < -0.3 and f[1, 1] > 0.3  # right
    assert abs(float(f[0, 2])) < 0.1  # low: both centred vertically
    likes_big = SyntheticUser("big", (1.0, 0.0, 0.0, 0.0))
    likes_left = SyntheticUser("left", (0.0, -1.0, 0.0, 0.0))
    imgs = torch.stack([small_left, large_right])
    assert likes_big.reward(imgs).argmax() == 1 and likes_left.reward(imgs).argmax() == 0
    seen, unseen = population(6, 2, seed=0)
    assert len(seen) == 6 and len(unseen) == 2 and {u.user_id for u in seen}.isdisjoint(u.user_id for u in unseen)
    assert all(abs(np.linalg.norm(u.weights) - 1) < 1e-6 for u in seen + unseen)
    assert population(6, 2, seed=0) == (seen, unseen) and len(FEATURES) == 4
    prompts = open_prompts(20, seed=1)
    for p in prompts:
        s = parse_caption(p)
        assert s.position is None and all(o.size is None for o in s.objects)
    assert isinstance(Scene((Obj("red", "circle"),)), Scene)
    # a pool of pairs labelled by each user (opposite users get opposite labels)
    rng = np.random.default_rng(0)
    pool = torch.stack([torch.stack([torch.from_numpy(render_placements(
        [Placement("red", "circle", float(rng.uniform(8, 24)), 16, float(rng.uniform(4, 7.5)))])) for _ in range(2)])
        for _ in range(20)])
    anti = SyntheticUser("small", (-1.0, 0.0, 0.0, 0.0))
    path = user_pairs(tmp_path / "toy", prompts, pool, [likes_big, anti], pairs_per_user=8, seed=0)
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    assert len(rows) == 16 and {r["user_id"] for r in rows} == {"big", "small"}
    by = {(r["user_id"], r["jpg_0"]): r["label_0"] for r in rows}
    common = [j for (u, j) in by if u == "big" and ("small", j) in by]
    assert all(by[("big", j)] == 1 - by[("small", j)] for j in common)
    ds = PreferencePairs(path, resolution=32)
    assert len(ds) == 16
