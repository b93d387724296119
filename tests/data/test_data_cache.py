"""The latent cache: round trip, sampling, resume after a crash, staleness, skips, CLI."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch.utils.data import DataLoader

import diffalign.backbones
from diffalign.backbones.base import Cond
from diffalign.cli import add_cache_arguments
from diffalign.data import (
    CachedPairs,
    CacheError,
    PreferencePairs,
    StaleCacheError,
    build_cache,
    cache_main,
    collate_cached,
    collate_pairs,
    is_cached_batch,
)

R = 16
SPECS = [
    ("a red thing", "red", "blue", 1),
    ("a blue thing", "red", "blue", 0),
    ("a tie", "green", "yellow", 0.5),
    ("a red thing", "cyan", "magenta", 1),
    ("another", "gray", "black", 0),
    ("a blue thing", "yellow", "red", 1),
    ("last one", "magenta", "green", 0),
]


def _dataset(path: Path, **kw) -> PreferencePairs:
    kw.setdefault("random_flip", False)
    kw.setdefault("ties", "keep")
    return PreferencePairs(path, R, **kw)


def _build(ds, bb, out, **kw):
    kw.setdefault("progress", False)
    kw.setdefault("shard_size", 3)
    kw.setdefault("dtype", "float32")
    kw.setdefault("flips", False)  # the flipped views have their own tests below
    return build_cache(ds, bb, out, kw.pop("batch_size", 2), **kw)


def _shard_tensors(d: Path) -> dict[str, dict[str, torch.Tensor]]:
    out = {}
    for f in sorted(d.glob("shard-*.safetensors")):
        with safe_open(str(f), framework="pt") as s:
            out[f.name] = {k: s.get_tensor(k) for k in list(s.keys())} | {"__md": s.metadata()}
    return out


def test_round_trip_equals_on_the_fly(make_pairs, h, tmp_path) -> None:
    ds = _dataset(make_pairs(SPECS))
    bb = h.FakeBackbone()
    meta = _build(ds, bb, tmp_path / "cache")
    assert meta["complete"] and meta["num_rows"] == len(ds) == 8 and meta["num_shards"] == 3
    assert meta["family"] == "fake" and meta["resolution"] == R and meta["latents"] == "dist"
    assert len(list((tmp_path / "cache").glob("shard-*.safetensors"))) == 3
    assert bb.images_encoded == 2 * len(ds)
    assert bb.prompts_encoded == 1 + 3 + 3 + 2  # empty prompt + unique captions of each shard

    cached = CachedPairs(tmp_path / "cache", sample=False)
    assert len(cached) == len(ds) and cached.family == "fake" and cached.resolution == R
    ref = h.FakeBackbone()
    for i in range(len(ds)):
        it, c = ds[i], cached[i]
        mean, std = ref.encode_images_dist(torch.stack([it["pixels_w"], it["pixels_l"]]))
        assert torch.equal(c["latents_w"], mean[0]) and torch.equal(c["latents_l"], mean[1])
        raw = cached.raw(i)
        assert torch.equal(raw["latents_w_std"], std[0]) and torch.equal(raw["latents_l_std"], std[1])
        cond = ref.encode_prompts([it["caption"]])
        assert set(c["cond"]) == set(cond.tensors)
        for k, v in cond.tensors.items():
            assert torch.equal(c["cond"][k], v[0]) and c["cond"][k].dtype == v.dtype
        assert (c["caption"], c["weight"], c["row"]) == (it["caption"], it["weight"], it["row"])
    empty = cached.empty_cond
    assert isinstance(empty, Cond) and len(empty) == 1
    assert torch.equal(empty.tensors["encoder_hidden_states"], ref.encode_prompts([""]).tensors["encoder_hidden_states"])


def test_collate_and_is_cached_batch(make_pairs, h, tmp_path) -> None:
    path = make_pairs(SPECS)
    ds = _dataset(path)
    _build(ds, h.FakeBackbone(), tmp_path / "cache")
    cached = CachedPairs(tmp_path / "cache")
    batch = next(iter(DataLoader(cached, batch_size=4, num_workers=1, collate_fn=collate_cached)))
    assert set(batch) == {"captions", "latents_w", "latents_l", "cond", "weight", "rows"}
    assert batch["latents_w"].shape == (4, 4, R // 4, R // 4) and batch["latents_w"].dtype == torch.float32
    assert isinstance(batch["cond"], Cond) and len(batch["cond"]) == 4
    assert batch["cond"].tensors["encoder_hidden_states"].shape == (4, 3, 8)
    assert batch["weight"].tolist() == [1.0, 1.0, 0.5, 0.5] and batch["rows"].tolist() == [0, 1, 2, 2]
    assert is_cached_batch(batch)
    assert not is_cached_batch(collate_pairs([ds[0], ds[1]]))


def test_sampling_uses_std(make_pairs, h, tmp_path) -> None:
    _build(_dataset(make_pairs(SPECS)), h.FakeBackbone(), tmp_path / "cache")
    cached = CachedPairs(tmp_path / "cache")
    raw = cached.raw(0)
    draws = torch.stack([cached[0]["latents_w"] for _ in range(200)])
    z = (draws - raw["latents_w_mean"]) / raw["latents_w_std"]
    assert not torch.equal(draws[0], draws[1])
    assert abs(float(z.mean())) < 0.1 and abs(float(z.std()) - 1) < 0.1


def _asymmetric_pair(h, tmp_path: Path) -> Path:
    for name, (a, b) in {"w.png": ((255, 0, 0), (0, 0, 255)), "l.png": ((0, 255, 0), (255, 255, 0))}.items():
        img = h.solid("red", (32, 32))
        img.paste(a, (0, 0, 32, 32))
        img.paste(b, (0, 0, 11, 32))  # asymmetric, so that a flip shows
        img.save(tmp_path / name)
    return h.write_jsonl(tmp_path / "asym.jsonl", [{"caption": "c", "jpg_0": "w.png", "jpg_1": "l.png", "label_0": 1}])


def test_hflip_needs_a_cache_with_flips(make_pairs, h, tmp_path) -> None:
    _build(_dataset(make_pairs(SPECS)), h.FakeBackbone(), tmp_path / "noflip")
    CachedPairs(tmp_path / "noflip", hflip=False)
    with pytest.raises(CacheError, match=r"data\.random_flip: false.*data\.cache_dir"):
        CachedPairs(tmp_path / "noflip", hflip=True)


def test_cached_flip_is_the_latents_of_the_flipped_images(h, tmp_path) -> None:
    """The VAE is not flip-equivariant: a flipped item must be the encoding of the flipped images,
    never the flip of the cached latents (the bug this replaces)."""
    from diffalign.backbones import load_backbone
    from diffalign.backbones.tiny import build_tiny_pipeline

    bb = load_backbone(build_tiny_pipeline("sd15"))
    ds = PreferencePairs(_asymmetric_pair(h, tmp_path), 32, random_flip=False)
    meta = build_cache(ds, bb, tmp_path / "c", 2, progress=False, dtype="float32")  # flips=True: the default
    assert meta["flips"] is True
    px = torch.stack([ds[0]["pixels_w"], ds[0]["pixels_l"]])
    plain, _ = bb.encode_images_dist(px)
    flipped, flipped_std = bb.encode_images_dist(px.flip(-1))
    assert (flipped - plain.flip(-1)).abs().max() > 1e-2  # the case that matters: flipping latents is wrong
    cached = CachedPairs(tmp_path / "c", sample=False, hflip=True)
    raw = cached.raw(0, flipped=True)
    assert torch.allclose(raw["latents_w_std"], flipped_std[0], atol=1e-5)
    seen = set()
    for _ in range(40):
        it = cached[0]
        is_flip = torch.allclose(it["latents_w"], flipped[0], atol=1e-5)
        assert is_flip or torch.allclose(it["latents_w"], plain[0], atol=1e-5)
        target_l = flipped[1] if is_flip else plain[1]  # one flip shared by the pair
        assert torch.allclose(it["latents_l"], target_l, atol=1e-5)
        seen.add(is_flip)
    assert seen == {True, False}
    # the on-the-fly pipeline's flipped item encodes to the same latents as the cached flipped view
    otf = PreferencePairs(tmp_path / "asym.jsonl", 32, random_flip=True)
    for _ in range(20):
        it = otf[0]
        if not torch.equal(it["pixels_w"], ds[0]["pixels_w"]):
            mean, _ = bb.encode_images_dist(torch.stack([it["pixels_w"], it["pixels_l"]]))
            assert torch.allclose(mean, flipped, atol=1e-5)
            break
    else:
        pytest.fail("no flipped item in 20 draws")


def test_float16_storage(make_pairs, h, tmp_path) -> None:
    ds = _dataset(make_pairs(SPECS))
    _build(ds, h.FakeBackbone(), tmp_path / "c16", dtype="float16")
    with safe_open(str(tmp_path / "c16" / "shard-00000.safetensors"), framework="pt") as f:
        assert f.get_tensor("latents_w_mean").dtype == torch.float16
        assert f.get_tensor("cond.ids").dtype == torch.int64  # integer tensors are kept
    c = CachedPairs(tmp_path / "c16", sample=False)[1]
    mean, _ = h.FakeBackbone().encode_images_dist(ds[1]["pixels_w"][None])
    assert c["latents_w"].dtype == torch.float32 and torch.allclose(c["latents_w"], mean[0], atol=2e-3)


def test_interrupted_build_resumes_from_completed_shards(make_pairs, h, tmp_path) -> None:
    ds = _dataset(make_pairs(SPECS))
    out = tmp_path / "cache"
    crashing = h.FakeBackbone(fail_after_image_batches=3)  # shard 0 = batches 1-2, crash in shard 1
    with pytest.raises(RuntimeError, match="simulated crash"):
        _build(ds, crashing, out)
    assert sorted(p.name for p in out.glob("shard-*")) == ["shard-00000.safetensors"]
    assert not list(out.glob(".*tmp*"))
    meta = json.loads((out / "meta.json").read_text())
    assert not meta["complete"] and [s["file"] for s in meta["shards"]] == ["shard-00000.safetensors"]
    with pytest.raises(CacheError, match=r"incomplete \(1 of 3 shards\)"):
        CachedPairs(out)
    (out / ".shard-00001.safetensors.tmp-999").write_bytes(b"half a shard")  # a torn write

    resumed = h.FakeBackbone()
    _build(ds, resumed, out)
    assert resumed.images_encoded == 2 * (len(ds) - 3)  # shard 0 was not recomputed
    assert not list(out.glob(".*tmp*"))
    clean = tmp_path / "clean"
    _build(ds, h.FakeBackbone(), clean)
    a, b = _shard_tensors(out), _shard_tensors(clean)
    assert a.keys() == b.keys()
    for name in a:
        assert a[name]["__md"] == b[name]["__md"]
        for k, v in a[name].items():
            if k != "__md":
                assert torch.equal(v, b[name][k]), (name, k)
    assert len(CachedPairs(out)) == len(ds)

    again = h.FakeBackbone()
    _build(ds, again, out)  # everything cached: nothing to encode
    assert again.images_encoded == 0


def test_stale_cache_detected(make_pairs, h, tmp_path) -> None:
    path = make_pairs(SPECS)
    ds = _dataset(path)
    out = tmp_path / "cache"
    _build(ds, h.FakeBackbone(), out)
    CachedPairs(out)
    st = path.stat()
    text = path.read_text()
    path.write_text(text.replace('"label_0": 1}', '"label_0": 0}', 1))  # same size, other content
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # even with the old mtime
    with pytest.raises(StaleCacheError) as ei:
        CachedPairs(out)
    assert "stale cache" in str(ei.value) and f"{path.resolve()}: content changed" in str(ei.value)
    CachedPairs(out, check_stale=False)
    with pytest.raises(StaleCacheError, match="content changed"):
        _build(_dataset(path), h.FakeBackbone(), out)
    path.write_text(text + json.dumps({"caption": "new", "jpg_0": "img/pairs.jsonl-0-0.png",
                                       "jpg_1": "img/pairs.jsonl-0-1.png", "label_0": 1}) + "\n")
    with pytest.raises(StaleCacheError, match="size changed"):
        CachedPairs(out)
    meta = _build(_dataset(path), h.FakeBackbone(), out, overwrite=True)
    assert meta["num_rows"] == len(ds) + 1 and len(CachedPairs(out)) == len(ds) + 1


def test_other_settings_are_stale_and_missing_data_only_warns(make_pairs, h, tmp_path, caplog) -> None:
    path = make_pairs(SPECS)
    out = tmp_path / "cache"
    _build(_dataset(path), h.FakeBackbone(), out)
    with pytest.raises(StaleCacheError, match="resolution: 16 -> 8"):
        _build(PreferencePairs(path, 8, random_flip=False, ties="keep"), h.FakeBackbone(), out)
    with pytest.raises(StaleCacheError, match="dataset.ties: 'keep' -> 'drop'"):
        _build(_dataset(path, ties="drop"), h.FakeBackbone(), out)
    with pytest.raises(StaleCacheError, match="dtype: 'float32' -> 'float16'"):
        _build(_dataset(path), h.FakeBackbone(), out, dtype="float16")
    path.rename(tmp_path / "moved.jsonl")
    CachedPairs(out)  # data gone (cache copied elsewhere): usable, with a warning
    assert "staleness not checked" in caplog.text


def test_random_augmentation_rejected(make_pairs, h, tmp_path) -> None:
    with pytest.raises(ValueError, match="random_flip=False"):
        build_cache(PreferencePairs(make_pairs(SPECS), R), h.FakeBackbone(), tmp_path / "c", progress=False)


def test_unknown_directory_with_shards_refused(make_pairs, h, tmp_path) -> None:
    out = tmp_path / "c"
    out.mkdir()
    (out / "shard-00000.safetensors").write_bytes(b"x")
    with pytest.raises(StaleCacheError, match="no meta.json"):
        _build(_dataset(make_pairs(SPECS)), h.FakeBackbone(), out)
    with pytest.raises(CacheError, match="not a latent cache"):
        CachedPairs(tmp_path)


def test_skip_unloadable_rows_in_cache(tmp_path, h, caplog) -> None:
    good, other = h.png_bytes(h.solid("red")), h.png_bytes(h.solid("blue"))
    recs = [{"caption": f"c{i}", "jpg_0": good, "jpg_1": other, "label_0": 1.0} for i in range(5)]
    recs[3]["jpg_1"] = b"corrupt"
    path = h.write_parquet(tmp_path / "p.parquet", recs)
    with pytest.raises(Exception, match=r"row 3: jpg_1: cannot decode image"):
        _build(_dataset(path), h.FakeBackbone(), tmp_path / "err")
    meta = _build(_dataset(path, on_bad_row="skip"), h.FakeBackbone(), tmp_path / "c")
    assert meta["num_rows"] == 4 and meta["skipped"] == 1
    assert [CachedPairs(tmp_path / "c")[i]["row"] for i in range(4)] == [0, 1, 2, 4]
    assert "row 3: jpg_1" in caplog.text


def test_sample_only_backbone_is_seeded(make_pairs, h, tmp_path) -> None:
    ds = _dataset(make_pairs(SPECS))
    m1 = _build(ds, h.SampleOnlyBackbone(), tmp_path / "a")
    _build(ds, h.SampleOnlyBackbone(), tmp_path / "b")
    assert m1["latents"] == "sample"
    a, b = CachedPairs(tmp_path / "a"), CachedPairs(tmp_path / "b")
    assert "latents_w_std" not in a.raw(0)
    assert torch.equal(a[0]["latents_w"], b[0]["latents_w"]) and torch.equal(a[0]["latents_w"], a[0]["latents_w"])
    mean, _ = h.FakeBackbone().encode_images_dist(ds[0]["pixels_w"][None])
    assert not torch.equal(a[0]["latents_w"], mean[0]) and torch.allclose(a[0]["latents_w"], mean[0], atol=1.0)


def test_cache_cli(make_pairs, h, tmp_path, monkeypatch, capsys) -> None:
    path = make_pairs(SPECS)
    loaded = []

    def fake_load(p: str):
        loaded.append(p)
        return h.FakeBackbone()

    monkeypatch.setattr(diffalign.backbones, "load_backbone", fake_load)
    parser = add_cache_arguments(argparse.ArgumentParser())
    args = parser.parse_args(["--model", str(tmp_path / "model"), "--data", str(path), "--out", str(tmp_path / "c"),
                              "--batch-size", "3", "--ties", "keep", "--no-progress", "--device", "cpu"])
    assert cache_main(args) == 0
    assert loaded == [str(tmp_path / "model")]
    out = capsys.readouterr().out
    assert "cached 8 pair(s)" in out and "16px" in out  # resolution defaults to the backbone's
    assert CachedPairs(tmp_path / "c").meta["dtype"] == "float16"
    bad = h.write_jsonl(tmp_path / "bad.jsonl", [{"caption": "", "jpg_0": "a", "jpg_1": "b", "label_0": 1}])
    args = parser.parse_args(["--model", "m", "--data", str(bad), "--out", str(tmp_path / "d"), "--no-progress"])
    assert cache_main(args) == 2
    err = capsys.readouterr().err
    assert f"{bad}: row 0 (line 1): caption is empty" in err


# --- with the project's real (tiny) backbones ------------------------------------------------------
@pytest.mark.parametrize("family", ["sdxl", "sd3"])  # sd15 is covered by the CLI test below
def test_round_trip_with_tiny_backbone(make_pairs, tmp_path, family) -> None:
    from diffalign.backbones import load_backbone
    from diffalign.backbones.tiny import build_tiny_pipeline

    bb = load_backbone(build_tiny_pipeline(family))
    ds = PreferencePairs(make_pairs(SPECS[:3]), 32, random_flip=False, ties="keep")
    meta = build_cache(ds, bb, tmp_path / "c", 2, progress=False, shard_size=3, dtype="float32")
    assert meta["family"] == bb.family and meta["latents"] == "dist"
    cached = CachedPairs(tmp_path / "c", sample=False)
    batch = collate_cached([cached[i] for i in range(len(cached))])
    px = torch.cat([torch.stack([ds[i]["pixels_w"] for i in range(len(ds))]),
                    torch.stack([ds[i]["pixels_l"] for i in range(len(ds))])])
    mean, _ = bb.encode_images_dist(px)
    assert torch.allclose(batch["latents_w"], mean[: len(ds)], atol=1e-5)
    assert torch.allclose(batch["latents_l"], mean[len(ds):], atol=1e-5)
    cond = bb.encode_prompts(batch["captions"])
    assert set(batch["cond"].tensors) == set(cond.tensors)
    for k, v in cond.tensors.items():
        assert torch.allclose(batch["cond"].tensors[k], v, atol=1e-5), k
    empty = bb.encode_prompts([""])
    for k, v in empty.tensors.items():
        assert torch.allclose(cached.empty_cond.tensors[k], v, atol=1e-5), k


def test_cache_cli_with_saved_tiny_model(make_pairs, tmp_path, capsys) -> None:
    from diffalign.backbones.tiny import save_tiny

    model = save_tiny("sd15", tmp_path / "model")
    args = add_cache_arguments(argparse.ArgumentParser()).parse_args(
        ["--model", str(model), "--data", str(make_pairs(SPECS)), "--out", str(tmp_path / "c"), "--no-progress"]
    )
    assert cache_main(args) == 0
    cached = CachedPairs(tmp_path / "c")
    assert cached.family == "sd" and cached.resolution == 32 and len(cached) == 6  # the tie dropped
    assert cached[0]["latents_w"].shape == (4, 16, 16)
    assert "cached 6 pair(s)" in capsys.readouterr().out
