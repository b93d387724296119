"""PreferencePairs: the Pick-a-Pic schema, winner-first ordering, ties, bad rows, image modes."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from diffalign.data import (
    PairDataError,
    PreferencePairs,
    collate_pairs,
    decode_image,
    image_to_tensor,
)

R = 8


def _ds(path: Path, **kw) -> PreferencePairs:
    kw.setdefault("random_flip", False)
    return PreferencePairs(path, R, **kw)


# --- ordering --------------------------------------------------------------------------------------
def test_jsonl_paths_winner_first(make_pairs, h) -> None:
    path = make_pairs([("a", "red", "blue", 1), ("b", "red", "blue", 0), ("c", "green", "yellow", 1.0)])
    ds = _ds(path)
    assert len(ds) == 3
    it0, it1, it2 = ds[0], ds[1], ds[2]
    assert h.is_color(it0["pixels_w"], "red") and h.is_color(it0["pixels_l"], "blue")
    assert h.is_color(it1["pixels_w"], "blue") and h.is_color(it1["pixels_l"], "red")  # label 0: jpg_1 wins
    assert h.is_color(it2["pixels_w"], "green")
    assert [it["row"] for it in (it0, it1, it2)] == [0, 1, 2]
    assert [it["caption"] for it in (it0, it1, it2)] == ["a", "b", "c"]
    for it in (it0, it1, it2):
        assert it["weight"] == 1.0
        assert it["pixels_w"].shape == (3, R, R) and it["pixels_w"].dtype == torch.float32
        assert 0.0 <= float(it["pixels_w"].min()) and float(it["pixels_w"].max()) <= 1.0


@pytest.mark.parametrize("form", ["binary", "large_binary", "struct", "path"])
def test_parquet_forms_winner_first(tmp_path, h, form) -> None:
    recs = []
    for i, (c0, c1, lab) in enumerate([("red", "blue", 1), ("red", "blue", 0), ("cyan", "magenta", 0)]):
        b0, b1 = h.png_bytes(h.solid(c0)), h.png_bytes(h.solid(c1), "JPEG")
        if form == "path":
            h.solid(c0).save(tmp_path / f"{i}_0.png")
            h.solid(c1).save(tmp_path / f"{i}_1.jpg")
            v0, v1 = f"{i}_0.png", f"{i}_1.jpg"
        elif form == "struct":
            v0, v1 = {"bytes": b0, "path": None}, {"bytes": b1, "path": None}
        else:
            v0, v1 = b0, b1
        recs.append({"caption": f"cap {i}", "jpg_0": v0, "jpg_1": v1, "label_0": float(lab), "extra": i})
    schema = None
    if form == "large_binary":
        schema = pa.schema([("caption", pa.string()), ("jpg_0", pa.large_binary()), ("jpg_1", pa.large_binary()),
                            ("label_0", pa.float64()), ("extra", pa.int64())])
    path = h.write_parquet(tmp_path / "p.parquet", recs, schema)
    ds = _ds(path)
    assert len(ds) == 3
    assert h.is_color(ds[0]["pixels_w"], "red") and h.is_color(ds[0]["pixels_l"], "blue", tol=8)
    assert h.is_color(ds[1]["pixels_w"], "blue", tol=8) and h.is_color(ds[1]["pixels_l"], "red")
    assert h.is_color(ds[2]["pixels_w"], "magenta", tol=8) and ds[2]["row"] == 2


def test_directory_rows_numbered_across_files(tmp_path, make_pairs) -> None:
    d = tmp_path / "data"
    d.mkdir()
    a = make_pairs([("a0", "red", "blue", 1), ("a1", "red", "blue", 0.5)], name="a.jsonl")
    b = make_pairs([("b0", "red", "blue", 0)], name="b.jsonl")
    a.rename(d / "a.jsonl")
    b.rename(d / "b.jsonl")
    ds = _ds(d, image_root=tmp_path)
    assert [ds[i]["caption"] for i in range(len(ds))] == ["a0", "b0"]
    assert [ds[i]["row"] for i in range(len(ds))] == [0, 2]


def test_image_root_option(tmp_path, h) -> None:
    root = tmp_path / "images"
    root.mkdir()
    h.solid("red").save(root / "x.png")
    h.solid("blue").save(root / "y.png")
    path = h.write_jsonl(tmp_path / "p.jsonl",
                         [{"caption": "c", "jpg_0": "x.png", "jpg_1": "y.png", "label_0": 0}])
    with pytest.raises(PairDataError, match="not found"):
        _ds(path)  # relative to the data file's directory by default: not there
    ds = _ds(path, image_root=root)
    assert h.is_color(ds[0]["pixels_w"], "blue")


# --- ties ------------------------------------------------------------------------------------------
def test_ties_dropped_by_default(make_pairs) -> None:
    ds = _ds(make_pairs([("a", "red", "blue", 0.5), ("b", "red", "blue", 1), ("c", "red", "blue", 0.5)]))
    assert len(ds) == 1 and ds[0]["caption"] == "b" and ds.num_ties == 2


def test_ties_keep_both_orders_half_weight(make_pairs, h) -> None:
    ds = _ds(make_pairs([("a", "red", "blue", 0.5), ("b", "green", "blue", 0)]), ties="keep")
    items = [ds[i] for i in range(len(ds))]
    assert len(items) == 3
    assert [it["weight"] for it in items] == [0.5, 0.5, 1.0]
    assert [it["row"] for it in items] == [0, 0, 1]
    assert h.is_color(items[0]["pixels_w"], "red") and h.is_color(items[1]["pixels_w"], "blue")
    assert h.is_color(items[0]["pixels_l"], "blue") and h.is_color(items[1]["pixels_l"], "red")
    with pytest.raises(ValueError, match="ties"):
        _ds(make_pairs([("a", "red", "blue", 1)], name="x.jsonl"), ties="duplicate")


# --- bad rows --------------------------------------------------------------------------------------
GOOD = {"caption": "ok", "jpg_0": "img/g0.png", "jpg_1": "img/g1.png", "label_0": 1}


@pytest.fixture
def good_images(tmp_path, h) -> None:
    (tmp_path / "img").mkdir(exist_ok=True)
    h.solid("red").save(tmp_path / "img" / "g0.png")
    h.solid("blue").save(tmp_path / "img" / "g1.png")


@pytest.mark.parametrize(
    ("bad", "needle"),
    [
        ({"label_0": 0.3}, "label_0 must be 0, 0.5 or 1, got 0.3"),
        ({"label_0": "1"}, "label_0 must be 0, 0.5 or 1, got '1'"),
        ({"label_0": None}, "label_0 must be 0, 0.5 or 1, got None"),
        ({"label_0": 2}, "got 2"),
        ({"caption": ""}, "caption is empty"),
        ({"caption": "   "}, "caption is empty"),
        ({"caption": None}, "caption is null"),
        ({"caption": 5}, "caption must be a string"),
        ({"jpg_1": "img/nope.png"}, "jpg_1: image file not found"),
        ({"jpg_0": None}, "jpg_0 is null"),
    ],
)
def test_bad_jsonl_row_names_file_row_and_line(tmp_path, h, good_images, bad, needle) -> None:
    path = h.write_jsonl(tmp_path / "p.jsonl", [GOOD, "", GOOD, GOOD | bad])  # blank line 2
    with pytest.raises(PairDataError) as ei:
        _ds(path)
    msg = str(ei.value)
    assert f"{path}: row 2 (line 4)" in msg
    assert needle in msg


def test_missing_key_and_invalid_json(tmp_path, h, good_images) -> None:
    rec = {k: v for k, v in GOOD.items() if k != "label_0"}
    path = h.write_jsonl(tmp_path / "p.jsonl", [GOOD, rec])
    with pytest.raises(PairDataError, match=r"p\.jsonl: row 1 \(line 2\): missing key\(s\) label_0"):
        _ds(path)
    path = h.write_jsonl(tmp_path / "q.jsonl", [GOOD, GOOD, '{"caption": "x", oops}'])
    with pytest.raises(PairDataError, match=r"q\.jsonl: row 2 \(line 3\): invalid JSON"):
        _ds(path)


def test_parquet_missing_columns_named(tmp_path, h) -> None:
    path = h.write_parquet(tmp_path / "p.parquet", [{"caption": "x", "jpg_0": b"", "label": 1}])
    with pytest.raises(PairDataError) as ei:
        _ds(path)
    msg = str(ei.value)
    assert str(path) in msg and "missing column(s) jpg_1, label_0" in msg and "found: caption, jpg_0, label" in msg


def test_parquet_bad_label_and_corrupt_bytes(tmp_path, h) -> None:
    good = h.png_bytes(h.solid("red"))
    recs = [{"caption": "a", "jpg_0": good, "jpg_1": good, "label_0": 1.0} for _ in range(4)]
    recs[3]["label_0"] = 0.7
    path = h.write_parquet(tmp_path / "p.parquet", recs)
    with pytest.raises(PairDataError, match=r"p\.parquet: row 3: label_0 must be 0, 0.5 or 1, got 0.7"):
        _ds(path)
    recs[3]["label_0"] = 0.0
    recs[2]["jpg_1"] = b"\x89PNG not really an image"
    path = h.write_parquet(tmp_path / "p.parquet", recs)
    ds = _ds(path)  # bytes are decoded lazily
    ds[1]
    with pytest.raises(PairDataError) as ei:
        ds[2]
    assert f"{path}: row 2: jpg_1: cannot decode image" in str(ei.value)
    with pytest.raises(PairDataError, match=r"row 2: jpg_1: cannot decode image"):
        _ds(path, check_images=True)  # ... or up front


def test_missing_data_file_and_format(tmp_path) -> None:
    with pytest.raises(PairDataError, match="not found"):
        _ds(tmp_path / "nope.jsonl")
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(PairDataError, match="unsupported"):
        _ds(tmp_path / "x.csv")


def test_skip_mode_counts_and_logs(tmp_path, h, good_images, caplog) -> None:
    recs = [GOOD, GOOD | {"label_0": 0.2}, GOOD | {"caption": ""}, GOOD | {"jpg_0": "img/missing.png"},
            GOOD | {"caption": "second good"}, "{broken", GOOD | {"label_0": 7}]
    path = h.write_jsonl(tmp_path / "p.jsonl", recs)
    with caplog.at_level(logging.WARNING, logger="diffalign.data.pairs"):
        ds = _ds(path, on_bad_row="skip")
    assert len(ds) == 2 and [ds[i]["row"] for i in range(2)] == [0, 4]
    assert ds.skip_counts == {"bad label": 2, "empty caption": 1, "missing image file": 1, "invalid JSON": 1}
    text = caplog.text
    assert "skipped 5 bad row(s) of 7" in text and "bad label: 2" in text and str(path) in text


def test_skip_mode_corrupt_image_at_load(tmp_path, h, caplog) -> None:
    good = h.png_bytes(h.solid("red"))
    recs = [{"caption": f"c{i}", "jpg_0": good, "jpg_1": good, "label_0": 1.0} for i in range(3)]
    recs[1]["jpg_0"] = b"garbage"
    path = h.write_parquet(tmp_path / "p.parquet", recs)
    ds = _ds(path, on_bad_row="skip")
    with caplog.at_level(logging.WARNING):
        item = ds[1]
    assert item["row"] == 2 and ds.load_skips == 1 and "row 1: jpg_0" in caplog.text
    ds2 = _ds(path, on_bad_row="skip", check_images=True)
    assert len(ds2) == 2 and ds2.skip_counts == {"bad image": 1}


# --- image modes and transforms --------------------------------------------------------------------
def _roundtrip(img: Image.Image, tmp_path: Path, fmt: str = "PNG") -> torch.Tensor:
    p = tmp_path / f"x.{fmt.lower()}"
    img.save(p, format=fmt)
    return decode_image(p)


def test_rgba_composited_on_white(tmp_path) -> None:
    a = np.zeros((4, 6, 4), np.uint8)
    a[..., 0] = 255  # red
    a[:, :3, 3] = 255  # left half opaque, right half transparent
    t = _roundtrip(Image.fromarray(a, "RGBA"), tmp_path)
    assert t.shape == (3, 4, 6) and t.dtype == torch.float32
    assert torch.allclose(t[:, :, 0], torch.tensor([1.0, 0, 0])[:, None])
    assert torch.allclose(t[:, :, 5], torch.ones(3, 1))
    la = Image.fromarray(np.stack([np.full((4, 4), 0, np.uint8), np.full((4, 4), 0, np.uint8)], -1), "LA")
    assert torch.allclose(_roundtrip(la, tmp_path), torch.ones(3, 4, 4))  # fully transparent black -> white


def test_palette_with_transparency_and_gray_modes(tmp_path) -> None:
    p = Image.new("P", (4, 4), 0)
    p.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    p.paste(1, (0, 0, 2, 4))
    p.info["transparency"] = 0
    t = _roundtrip(p, tmp_path)
    assert torch.allclose(t[:, 0, 0], torch.tensor([1.0, 0, 0])) and torch.allclose(t[:, 0, 3], torch.ones(3))
    g = _roundtrip(Image.new("L", (5, 3), 51), tmp_path)
    assert g.shape == (3, 3, 5) and torch.allclose(g, torch.full((3, 3, 5), 0.2))
    b = _roundtrip(Image.new("1", (5, 3), 1), tmp_path)
    assert torch.allclose(b, torch.ones(3, 3, 5))
    c = _roundtrip(Image.new("CMYK", (5, 3), (0, 0, 0, 0)), tmp_path, "JPEG")
    assert c.shape == (3, 3, 5) and float(c.min()) > 0.95


def test_16bit_grayscale_keeps_precision(tmp_path) -> None:
    a = np.array([[0, 32768, 65535, 1000]], dtype=np.uint16)
    img = Image.fromarray(a)
    t = _roundtrip(img, tmp_path)
    assert t.shape == (3, 1, 4)
    expect = torch.tensor([0, 32768, 65535, 1000], dtype=torch.float32) / 65535
    assert torch.allclose(t[0, 0], expect, atol=1e-6) and torch.equal(t[0], t[2])
    i32 = image_to_tensor(Image.fromarray(np.array([[70000, 65535]], dtype=np.int32), "I"))
    assert torch.allclose(i32[:, 0], torch.ones(3, 2))  # clipped
    f = image_to_tensor(Image.fromarray(np.array([[-1.0, 0.25, 3.0]], dtype=np.float32), "F"))
    assert torch.allclose(f[0, 0], torch.tensor([0.0, 0.25, 1.0]))


def test_all_modes_through_dataset_are_rgb_float(tmp_path, h) -> None:
    imgs = {
        "rgba": Image.new("RGBA", (12, 10), (10, 20, 30, 128)),
        "gray": Image.new("L", (12, 10), 99),
        "g16": Image.fromarray(np.full((10, 12), 40000, np.uint16)),
        "pal": Image.new("RGB", (12, 10), (1, 2, 3)).convert("P"),
    }
    recs = []
    for k, im in imgs.items():
        im.save(tmp_path / f"{k}.png")
        recs.append({"caption": k, "jpg_0": f"{k}.png", "jpg_1": "rgba.png" if k == "gray" else "gray.png", "label_0": 1})
    ds = _ds(h.write_jsonl(tmp_path / "p.jsonl", recs))
    for i in range(len(ds)):
        x = ds[i]["pixels_w"]
        assert x.shape == (3, R, R) and x.dtype == torch.float32
        assert 0 <= float(x.min()) and float(x.max()) <= 1


def test_resize_short_side_then_center_crop(tmp_path, h) -> None:
    band = np.zeros((8, 24, 3), np.uint8)
    band[:, :8] = (255, 0, 0)
    band[:, 8:16] = (0, 255, 0)
    band[:, 16:] = (0, 0, 255)
    Image.fromarray(band).save(tmp_path / "wide.png")
    Image.fromarray(band.transpose(1, 0, 2).copy()).save(tmp_path / "tall.png")
    path = h.write_jsonl(tmp_path / "p.jsonl", [{"caption": "c", "jpg_0": "wide.png", "jpg_1": "tall.png", "label_0": 1}])
    it = PreferencePairs(path, 8, random_flip=False)[0]
    assert h.is_color(it["pixels_w"], "green", tol=0.5) and h.is_color(it["pixels_l"], "green", tol=0.5)
    big = PreferencePairs(path, 4, random_flip=False, interpolation="bicubic")[0]  # 8x24 -> 4x12 -> crop 4x4
    assert big["pixels_w"].shape == (3, 4, 4) and h.is_color(big["pixels_w"], "green", tol=40)
    up = PreferencePairs(path, 16, random_flip=False)[0]  # upsampled
    assert up["pixels_w"].shape == (3, 16, 16)


def _flipped(x: torch.Tensor) -> bool:
    return bool(x[0, :, 0].mean() > x[0, :, -1].mean())  # the source has red on the right


def test_flip_shared_within_pair(tmp_path, h) -> None:
    a = np.zeros((8, 8, 3), np.uint8)
    a[:, 4:, 0] = 255
    Image.fromarray(a).save(tmp_path / "half.png")
    Image.fromarray(a).save(tmp_path / "half2.png")  # one file twice in a row is a bad row
    path = h.write_jsonl(tmp_path / "p.jsonl", [{"caption": "c", "jpg_0": "half.png", "jpg_1": "half2.png", "label_0": 1}])
    torch.manual_seed(0)
    shared = PreferencePairs(path, 8, random_flip=True)
    states = [(_flipped(it["pixels_w"]), _flipped(it["pixels_l"])) for it in (shared[0] for _ in range(40))]
    assert all(w == lo for w, lo in states) and {w for w, _ in states} == {True, False}
    indep = PreferencePairs(path, 8, random_flip=True, same_augment=False)
    states = [(_flipped(it["pixels_w"]), _flipped(it["pixels_l"])) for it in (indep[0] for _ in range(40))]
    assert any(w != lo for w, lo in states)
    off = PreferencePairs(path, 8, random_flip=False)
    assert not any(_flipped(off[0]["pixels_w"]) for _ in range(10))


def test_random_crop_shared_position(tmp_path, h) -> None:
    grad = np.tile(np.linspace(0, 255, 32).astype(np.uint8)[None, :, None], (8, 1, 3))
    Image.fromarray(grad).save(tmp_path / "g.png")
    Image.fromarray(grad).save(tmp_path / "g2.png")
    path = h.write_jsonl(tmp_path / "p.jsonl", [{"caption": "c", "jpg_0": "g.png", "jpg_1": "g2.png", "label_0": 0}])
    ds = PreferencePairs(path, 8, random_crop=True, random_flip=False)
    lefts = set()
    for _ in range(30):
        it = ds[0]
        assert torch.equal(it["pixels_w"], it["pixels_l"])
        lefts.add(round(float(it["pixels_w"][0, 0, 0]), 3))
    assert len(lefts) > 3


def test_collate_and_dataloader_workers(tmp_path, h) -> None:
    good = h.png_bytes(h.solid("red"))
    other = h.png_bytes(h.solid("blue"))
    recs = [{"caption": f"c{i}", "jpg_0": good, "jpg_1": other, "label_0": float(i % 2)} for i in range(5)]
    ds = _ds(h.write_parquet(tmp_path / "p.parquet", recs))
    dl = DataLoader(ds, batch_size=2, num_workers=1, collate_fn=collate_pairs)
    batches = list(dl)
    b = batches[0]
    assert set(b) == {"captions", "pixels_w", "pixels_l", "weight", "rows"}
    assert b["captions"] == ["c0", "c1"] and b["pixels_w"].shape == (2, 3, R, R)
    assert b["weight"].dtype == torch.float32 and b["rows"].tolist() == [0, 1]
    assert h.is_color(b["pixels_w"][0], "blue") and h.is_color(b["pixels_w"][1], "red")
    assert sum(len(x["captions"]) for x in batches) == 5
