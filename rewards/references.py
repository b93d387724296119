"""Reference images for rewards that compare against a reference (the identity rewards): read from files.

``load_reference_faces("faces/")`` -> ``[1, K, 3, H, W]`` in [0,1]: the K image files of a folder (sorted by
name) or a single file, all of one size; the shape the identity rewards read from ``context["reference_faces"]``
as "K references for every image" (their embeddings are averaged). Every error names the file and the flag
or config key it came from (``source``).
"""

from __future__ import annotations

from pathlib import Path

import torch

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


class ReferenceError(ValueError):
    """Reference images that cannot be read; the message names the file and where it was given."""


def read_image(path: str | Path, source: str = "reference") -> torch.Tensor:
    """One image file as ``[3,H,W]`` float in [0,1] (RGB)."""
    from PIL import Image

    p = Path(path)
    if not p.is_file():
        raise ReferenceError(f"{source}: {str(p)!r} is not a file")
    try:
        with Image.open(p) as im:
            arr = torch.frombuffer(bytearray(im.convert("RGB").tobytes()), dtype=torch.uint8)
            w, h = im.size
    except Exception as e:  # noqa: BLE001  (PIL raises many types for a bad file)
        raise ReferenceError(f"{source}: cannot read image {str(p)!r}: {type(e).__name__}: {e}") from None
    return arr.reshape(h, w, 3).permute(2, 0, 1).float() / 255.0


def reference_files(path: str | Path, source: str = "reference") -> list[Path]:
    p = Path(path)
    if not p.exists():
        raise ReferenceError(f"{source}: {str(p)!r} does not exist (an image file or a folder of images)")
    if p.is_file():
        if p.suffix.lower() not in IMAGE_EXTS:
            raise ReferenceError(f"{source}: {str(p)!r} is not an image file ({', '.join(sorted(IMAGE_EXTS))})")
        return [p]
    files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_EXTS and f.name != "grid.png")
    if not files:
        raise ReferenceError(f"{source}: no image files in folder {str(p)!r}")
    return files


def stack_images(files: list[Path], source: str = "reference") -> torch.Tensor:
    """``[K,3,H,W]``; every file must have the first one's size (the error names the one that differs)."""
    imgs = [read_image(f, source) for f in files]
    for f, im in zip(files, imgs, strict=True):
        if im.shape != imgs[0].shape:
            raise ReferenceError(f"{source}: {str(f)!r} is {im.shape[2]}x{im.shape[1]}, but {str(files[0])!r} is "
                                 f"{imgs[0].shape[2]}x{imgs[0].shape[1]}; give reference images of one size")
    return torch.stack(imgs)


def load_reference_faces(path: str | Path, source: str = "--reference-faces") -> torch.Tensor:
    """A file or folder of reference images -> ``[1, K, 3, H, W]`` (K references shared by every image)."""
    return stack_images(reference_files(path, source), source)[None]
