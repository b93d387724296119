"""Bad inputs: each one is a clear error naming the file and row, or, with on_bad_row="skip", is
skipped and counted; odd but valid images (RGBA, grayscale, 16-bit, palette, huge) are converted.
Bad configs name the key and the file. The same through `diffalign train`."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from diffalign.cli import main as cli_main
from diffalign.config import ConfigError, load_config
from diffalign.data.pairs import PairDataError, PreferencePairs, decode_image
from diffalign.training import train


def _png(path, img):
    img.save(path)
    return path.name


def _rgb(size=(16, 16), color=(200, 30, 30)):
    return Image.new("RGB", size, color)


def _dataset(tmp_path, bad_row: dict, good: int = 3, name="pairs.jsonl"):
    """``good`` valid rows, then ``bad_row`` (fields override a valid row) as row ``good``."""
    d = tmp_path
    ok0, ok1 = _png(d / "ok0.png", _rgb()), _png(d / "ok1.png", _rgb(color=(0, 0, 200)))
    rows = [{"caption": "a red square", "jpg_0": ok0, "jpg_1": ok1, "label_0": 1} for _ in range(good)]
    row = {"caption": "a red square", "jpg_0": ok0, "jpg_1": ok1, "label_0": 1}
    row.update(bad_row)
    rows.append({k: v for k, v in row.items() if v is not _DROP})
    p = d / name
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return p


_DROP = object()


def _image_file(tmp_path, kind):
    p = tmp_path / f"{kind}.png"
    if kind == "corrupt":
        p.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not an image" * 10)
    elif kind == "truncated":
        buf = io.BytesIO()
        _rgb((64, 64)).save(buf, format="PNG")
        p.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    elif kind == "tiny":
        _rgb((2, 2)).save(p)
    elif kind == "elongated":
        _rgb((400, 20)).save(p)
    return p.name


# (case, row fields, reason counted in skip mode, text the error must hold)
BAD_ROWS = [
    ("label 2", {"label_0": 2}, "bad label", "label_0 must be 0, 0.5 or 1, got 2"),
    ("label -1", {"label_0": -1}, "bad label", "got -1"),
    ("label text", {"label_0": "yes"}, "bad label", "got 'yes'"),
    ("label null", {"label_0": None}, "bad label", "got None"),
    ("empty caption", {"caption": ""}, "empty caption", "caption is empty"),
    ("blank caption", {"caption": "   "}, "empty caption", "caption is empty"),
    ("null caption", {"caption": None}, "empty caption", "caption is null"),
    ("caption not text", {"caption": 42}, "bad caption", "caption must be a string"),
    ("over-long caption", {"caption": "x" * 10_001}, "caption too long", "10001 characters, more than 10000"),
    ("missing image file", {"jpg_1": "nowhere.png"}, "missing image file", "image file not found"),
    ("null image", {"jpg_0": None}, "missing image", "jpg_0 is null"),
    ("missing column", {"label_0": _DROP}, "missing column", "missing key(s) label_0"),
]


@pytest.mark.parametrize("case,fields,reason,text", BAD_ROWS, ids=[c[0] for c in BAD_ROWS])
def test_bad_row_error_names_file_and_row_or_is_skipped_and_counted(case, fields, reason, text, tmp_path, caplog):
    p = _dataset(tmp_path, fields)
    with pytest.raises(PairDataError) as e:
        PreferencePairs(p, resolution=16)
    msg = str(e.value)
    assert f"{p}: row 3 (line 4)" in msg and text in msg and "on_bad_row='skip'" in msg
    with caplog.at_level("WARNING"):
        ds = PreferencePairs(p, resolution=16, on_bad_row="skip")
    assert len(ds) == 3 and ds.skip_counts == {reason: 1}
    assert f"skipped 1 bad row(s) of 4 ({reason}: 1)" in caplog.text


BAD_IMAGES = [
    ("corrupt bytes", "corrupt", "cannot decode image"),
    ("truncated file", "truncated", "cannot decode image"),
    ("tiny image", "tiny", "image is 2x2 pixels; the short side must be at least 8"),
    ("elongated image", "elongated", "image is 400x20 pixels; the aspect ratio is over 8"),
]


@pytest.mark.parametrize("case,kind,text", BAD_IMAGES, ids=[c[0] for c in BAD_IMAGES])
def test_bad_image_found_at_load_or_up_front(case, kind, text, tmp_path):
    p = _dataset(tmp_path, {"jpg_1": _image_file(tmp_path, kind)})
    ds = PreferencePairs(p, resolution=16, random_flip=False)  # decoded lazily: found when loaded
    for i in range(3):
        ds[i]
    with pytest.raises(PairDataError) as e:
        ds[3]
    assert f"{p}: row 3 (line 4): jpg_1" in str(e.value) and text in str(e.value)
    with pytest.raises(PairDataError, match=r"row 3 \(line 4\): jpg_1"):
        PreferencePairs(p, resolution=16, check_images=True)  # ... or up front
    ds = PreferencePairs(p, resolution=16, check_images=True, on_bad_row="skip")
    assert len(ds) == 3 and ds.skip_counts == {"bad image": 1}
    lazy = PreferencePairs(p, resolution=16, on_bad_row="skip")
    assert lazy[3]["row"] == 0 and lazy.load_skips == 1  # replaced by the next loadable item, counted


def test_bad_image_in_parquet_bytes_names_file_and_row(tmp_path):
    good = io.BytesIO()
    _rgb().save(good, format="PNG")
    rows = {"caption": ["a", "b", "c"], "jpg_0": [good.getvalue()] * 3,
            "jpg_1": [good.getvalue(), b"garbage", good.getvalue()], "label_0": [1, 0, 1]}
    p = tmp_path / "pairs.parquet"
    pq.write_table(pa.table(rows), p)
    with pytest.raises(PairDataError, match=rf"{p}: row 1: jpg_1: cannot decode image"):
        PreferencePairs(p, resolution=16, check_images=True)


def test_missing_parquet_columns_name_file_and_columns(tmp_path):
    p = tmp_path / "pairs.parquet"
    pq.write_table(pa.table({"caption": ["a"], "jpg_0": [b"x"]}), p)
    with pytest.raises(PairDataError, match=rf"{p}: missing column\(s\) jpg_1, label_0"):
        PreferencePairs(p)


def test_invalid_json_line_names_line(tmp_path):
    p = _dataset(tmp_path, {})
    p.write_text(p.read_text() + "{not json\n")
    with pytest.raises(PairDataError, match=r"row 4 \(line 5\): invalid JSON"):
        PreferencePairs(p, resolution=16)


@pytest.mark.parametrize("mode", ["RGBA", "LA", "L", "I;16", "P", "1", "CMYK"])
def test_odd_but_valid_images_become_rgb_in_0_1(mode, tmp_path):
    arr = np.zeros((16, 16), np.uint16 if mode == "I;16" else np.uint8)
    if mode == "RGBA":
        img = Image.new("RGBA", (16, 16), (255, 0, 0, 0))  # fully transparent red: white after compositing
        expect = 1.0
    elif mode == "LA":
        img = Image.new("LA", (16, 16), (0, 0))
        expect = 1.0
    elif mode == "I;16":
        arr[:] = 32768
        img = Image.fromarray(arr)  # a 16-bit PNG
        expect = 32768 / 65535
    elif mode == "CMYK":
        img = Image.new("CMYK", (16, 16), (0, 0, 0, 0))
        expect = 1.0
    else:
        img = Image.new(mode, (16, 16), 0 if mode != "P" else 0)
        expect = 0.0
    name = f"img_{mode.replace(';', '_')}.{'jpg' if mode == 'CMYK' else 'png'}"
    img.save(tmp_path / name)
    p = _dataset(tmp_path, {"jpg_0": name})
    x = PreferencePairs(p, resolution=16, random_flip=False)[3]["pixels_w"]
    assert x.shape == (3, 16, 16) and x.dtype.is_floating_point
    assert float(x.min()) >= 0 and float(x.max()) <= 1
    assert float(x.mean()) == pytest.approx(expect, abs=0.02)


def test_huge_image_is_reduced_before_conversion_and_a_bomb_is_refused(tmp_path, monkeypatch):
    big = Image.new("RGB", (4096, 3072), (10, 200, 30))
    big.save(tmp_path / "big.png")
    big.save(tmp_path / "big.jpg", quality=95)
    for name in ("big.png", "big.jpg"):
        x = decode_image(tmp_path / name, target_side=32)
        assert min(x.shape[1:]) < 4 * 32 and min(x.shape[1:]) >= 2 * 32  # never the 4096x3072 float tensor
        p = _dataset(tmp_path, {"jpg_0": name}, name=f"{name}.jsonl")
        item = PreferencePairs(p, resolution=32, random_flip=False)[3]["pixels_w"]
        assert item.shape == (3, 32, 32)
        assert [round(v) for v in (item.mean((1, 2)) * 255).tolist()] == pytest.approx([10, 200, 30], abs=3)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_000_000)  # 12.6 MP is then over twice the limit
    p = _dataset(tmp_path, {"jpg_0": "big.png"}, name="bomb.jsonl")
    with pytest.raises(PairDataError, match=r"row 3 \(line 4\): jpg_0: cannot decode image \(DecompressionBombError"):
        PreferencePairs(p, resolution=32)[3]


# ---------------------------------------------------------------------------------------------------
# through `diffalign train`
# ---------------------------------------------------------------------------------------------------
def _train_config(tmp_path, h, rows_extra):
    cfg = h.write_config(tmp_path, steps=2, checkpoint_every=0)
    data = tmp_path / "pairs.jsonl"
    with data.open("a") as f:
        for r in rows_extra:
            f.write(json.dumps(r) + "\n")
    return cfg, data


def test_train_stops_on_a_bad_row_naming_it_and_skips_it_when_asked(tmp_path, h, capsys):
    cfg, data = _train_config(tmp_path, h, [
        {"caption": "a red square", "jpg_0": "img/0_0.png", "jpg_1": "img/0_1.png", "label_0": 3},
        {"caption": "", "jpg_0": "img/0_0.png", "jpg_1": "img/0_1.png", "label_0": 1},
        {"caption": "a red square", "jpg_0": "img/missing.png", "jpg_1": "img/0_1.png", "label_0": 1},
    ])
    rc = cli_main(["train", str(cfg)])
    err = capsys.readouterr().err
    assert rc == 2 and f"diffalign train: error: {data}: row 8 (line 9): label_0 must be 0, 0.5 or 1, got 3" in err
    rc = cli_main(["train", str(cfg), "--data.on_bad_row", "skip"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "data: skipped 3 bad row(s) when reading ({'bad label': 1, 'empty caption': 1, 'missing image file': 1})" in out
    result = json.loads((tmp_path / "run" / "final" / "result.json").read_text())
    assert result["data"]["skipped_rows"] == 3 and result["data"]["items"] == 8


def test_corrupt_image_mid_run_stops_with_its_row_and_keeps_the_checkpoints(tmp_path, h):
    cfg = h.write_config(tmp_path, steps=8, checkpoint_every=1)
    (tmp_path / "img" / "5_1.png").write_bytes(b"garbage")
    with pytest.raises(PairDataError, match=r"row 5 \(line 6\): jpg_1: cannot decode image"):
        train(load_config(cfg))
    from diffalign.training import checkpoints as ckpt

    saved = ckpt.list_checkpoints(tmp_path / "run")
    assert saved  # the steps before the bad item are kept, and verify
    for c in saved:
        ckpt.verify_checkpoint(c)


BAD_CONFIGS = [
    ("train.steps", "0", "greater than or equal to 1"),
    ("train.log_every", "0", "greater than or equal to 1"),
    ("train.lr", "-1e-4", "greater than 0"),
    ("train.batch_size", "four", "valid integer"),
    ("train.max_nonfinite_steps", "0", "greater than or equal to 1"),
    ("train.keep_checkpoints", "-1", "greater than or equal to 0"),
    ("train.rng", "random", "'stream' or 'per_batch'"),
    ("train.stepz", "10", "unknown key"),
    ("data.on_bad_row", "ignore", "'error' or 'skip'"),
]


@pytest.mark.parametrize("key,value,text", BAD_CONFIGS, ids=[c[0] for c in BAD_CONFIGS])
def test_bad_config_names_key_and_file(key, value, text, tmp_path, h):
    cfg = h.write_config(tmp_path)
    with pytest.raises(ConfigError) as e:
        load_config(cfg, [f"--{key}", value])
    assert str(cfg) in str(e.value) and f"{key}:" in str(e.value) and text in str(e.value)
