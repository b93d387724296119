"""``diffalign score``: score image files with one or more rewards and write a CSV.

    diffalign score --reward NAME[=PATH][,NAME[=PATH]] --images DIR|FILE --prompts FILE --out scores.csv

* ``--reward`` may be repeated; ``NAME`` is a registry name (``rewards.available()``), ``PATH`` its local
  weights (rewards that need none, e.g. ``toy_color``, take no path). Extra loader options: ``--reward-arg NAME.KEY=VALUE`` (string values, e.g.
  ``--reward-arg imagereward.tokenizer_path=/models/bert-base-uncased``).
* ``--images``: a folder (its .png/.jpg/.jpeg/.webp/.bmp files, sorted by name) or a single image file. A
  ``diffalign sample`` folder (one with settings.json) gives the images its settings.json lists, so its
  ``grid.png`` is not scored as an image; in any other folder a ``grid.png`` is skipped too, with a note.
* ``--prompts``: a UTF-8 text file with one prompt per line, matched to the images in sorted order; the line
  count must equal the image count, or the file holds a single line used for every image. Blank lines at the
  end are ignored; a blank line elsewhere is the empty prompt.
* ``--reference-faces``: an image file or folder (one size) of reference faces for the identity rewards
  (``identity``, ``toy_identity``); they reach every reward as ``context["reference_faces"]`` ``[1,K,3,H,W]``.
* ``--out``: CSV with a header ``file,prompt,<reward>...`` and one row per image. It must name a file in a
  writable folder; that is checked before anything is scored, and the CSV is written atomically.

Consecutive images of the same size are scored together, up to ``--batch-size``.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path
from typing import Any

import torch

from .base import RewardInputError

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


class ScoreCLIError(ValueError):
    pass


def parse_reward_specs(specs: list[str]) -> list[tuple[str, str | None]]:
    """``(name, path)`` of every reward named by the ``--reward`` values, in the one reward grammar
    (``rewards.parse_spec``: NAME, NAME=PATH, comma-separated); one CSV column each."""
    from .spec import parse_spec

    out: list[tuple[str, str | None]] = []
    for spec in specs:
        try:
            members = parse_spec(spec)
        except ValueError as e:
            raise ScoreCLIError(f"--reward: {e}") from None
        for m in members:
            if m.weight is not None:
                raise ScoreCLIError(f"--reward {spec!r}: a weight ({m.name}:{m.weight:g}) has no meaning here "
                                    "(score writes one column per reward)")
            out.append((m.name, m.path))
    names = [n for n, _ in out]
    dups = {n for n in names if names.count(n) > 1}
    if dups:
        raise ScoreCLIError(f"--reward: {sorted(dups)} given more than once")
    return out


def parse_reward_args(items: list[str], names: list[str]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {n: {} for n in names}
    for item in items:
        key, sep, value = item.partition("=")
        name, dot, k = key.partition(".")
        if not sep or not dot or not k:
            raise ScoreCLIError(f"--reward-arg {item!r}: expected NAME.KEY=VALUE")
        if name not in out:
            raise ScoreCLIError(f"--reward-arg {item!r}: {name!r} is not one of the rewards {names}")
        out[name][k] = value
    return out


def list_images(path: str) -> list[Path]:
    p = Path(path)
    if not p.exists():
        raise ScoreCLIError(f"--images: {path!r} does not exist")
    if p.is_file():
        if p.suffix.lower() not in IMAGE_EXTS:
            raise ScoreCLIError(f"--images: {path!r} is not an image file ({', '.join(sorted(IMAGE_EXTS))})")
        return [p]
    listed = _sample_folder_images(p)
    if listed is not None:
        return listed
    files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_EXTS)
    if any(f.name == "grid.png" for f in files) and len(files) > 1:
        print(f"note: {p / 'grid.png'} skipped (a contact sheet, not an image to score)", file=sys.stderr)
        files = [f for f in files if f.name != "grid.png"]
    if not files:
        raise ScoreCLIError(f"--images: no image files in {path!r}")
    return files


def _sample_folder_images(folder: Path) -> list[Path] | None:
    """The images a ``diffalign sample`` folder's settings.json lists (None: not such a folder)."""
    import json

    settings = folder / "settings.json"
    if not settings.is_file():
        return None
    try:
        records = json.loads(settings.read_text(encoding="utf-8")).get("images")
        names = [r["file"] for r in records]
    except (ValueError, TypeError, KeyError, AttributeError):
        return None  # not our settings.json: list the folder
    files = [folder / n for n in names]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise ScoreCLIError(f"--images: {settings} lists {len(missing)} image(s) that are missing: {missing[:3]}")
    return files


def check_out(path: str) -> Path:
    """``--out`` names a CSV file in a writable folder (checked by creating and removing a file there)."""
    import os

    out = Path(path)
    if out.is_dir() or path.endswith(("/", os.sep)):
        raise ScoreCLIError(f"--out {path!r}: is a folder; name the CSV file to write (e.g. {out / 'scores.csv'})")
    if not out.parent.exists():
        raise ScoreCLIError(f"--out: folder {str(out.parent)!r} does not exist")
    probe = out.parent / f".{out.name}.tmp-{os.getpid()}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ScoreCLIError(f"--out {path!r}: cannot write there ({type(e).__name__}: {e})") from None
    return out


def read_prompts(path: str, n_images: int) -> list[str]:
    p = Path(path)
    if not p.is_file():
        raise ScoreCLIError(f"--prompts: {path!r} is not a file")
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise ScoreCLIError(f"--prompts: {path!r} is not UTF-8 text (byte offset {e.start})") from None
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines:
        raise ScoreCLIError(f"--prompts: {path!r} is empty")
    if len(lines) == 1:
        return lines * n_images
    if len(lines) != n_images:
        raise ScoreCLIError(f"--prompts: {path!r} has {len(lines)} prompts for {n_images} images "
                            "(need one per image, or a single prompt)")
    return lines


def load_image(path: Path) -> torch.Tensor:
    from PIL import Image

    from .preprocess import pil_to_tensor

    try:
        with Image.open(path) as im:
            return pil_to_tensor(im.convert("RGB"))
    except Exception as e:
        raise ScoreCLIError(f"cannot read image {str(path)!r}: {type(e).__name__}: {e}") from e


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .registry import load

    try:
        specs = parse_reward_specs(args.reward)
        kwargs = parse_reward_args(args.reward_arg, [n for n, _ in specs])
        files = list_images(args.images)
        prompts = read_prompts(args.prompts, len(files))
        if args.batch_size < 1:
            raise ScoreCLIError("--batch-size must be >= 1")
        out = check_out(args.out)
        context = None
        if getattr(args, "reference_faces", None):
            from .references import ReferenceError, load_reference_faces

            try:
                context = {"reference_faces": load_reference_faces(args.reference_faces, "--reference-faces")}
            except ReferenceError as e:
                raise ScoreCLIError(str(e)) from None
    except ScoreCLIError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        rewards = {name: load(name, path=path, **kwargs[name]).to(args.device) for name, path in specs}
    except (KeyError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    rows: list[list[Any]] = []
    bar = tqdm(total=len(files), unit="img", desc="scoring", disable=args.no_progress)
    i = 0
    try:
        while i < len(files):
            batch = [load_image(files[i])]
            j = i + 1
            while j < len(files) and len(batch) < args.batch_size:
                t = load_image(files[j])
                if t.shape != batch[0].shape:
                    break
                batch.append(t)
                j += 1
            x = torch.stack(batch).to(args.device)
            ps = prompts[i:j]
            with torch.no_grad():
                cols = {n: r(x, ps, context).float().cpu().tolist() for n, r in rewards.items()}
            for k in range(j - i):
                rows.append([files[i + k].name, ps[k]] + [cols[n][k] for n, _ in specs])
            bar.update(j - i)
            i = j
    except (ScoreCLIError, RewardInputError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        bar.close()
    import os

    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["file", "prompt"] + [n for n, _ in specs])
            w.writerows(rows)
        os.replace(tmp, out)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        print(f"error: --out {str(out)!r}: cannot write the scores ({type(e).__name__}: {e})", file=sys.stderr)
        return 2
    print(f"wrote {len(rows)} rows to {out}", file=sys.stderr)
    return 0
