"""Checkpoints: written atomically (a temporary folder, then a rename), the last K kept, verified
against a manifest of sizes and SHA-256 sums, and ``--resume latest`` falling back to the previous
checkpoint, with a warning naming both, when the newest one is damaged.

Layout of ``OUTPUT_DIR/checkpoints/``::

    step_00000500/                 complete: holds diffalign_checkpoint.json (written last)
    .tmp_step_00000600/            being written (or left by a crash: removed at the next start)
    .old_step_00000600/            the previous copy while a checkpoint of the same step is replaced
    .del_step_00000100/            rotated out (past the last K), being deleted
    damaged_step_00000700/         failed verification on resume; kept for inspection, never loaded

The metadata file records the step, the run's shape (processes, batch, accumulation, seed), the
facts a resume must agree with (model, LoRA, objective) and the manifest.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

META = "diffalign_checkpoint.json"
FORMAT = 2


class CheckpointError(RuntimeError):
    """A checkpoint that is incomplete, damaged or does not fit the run; the message names the file."""


LOW_SPACE = 256 << 20  # a failed write with less free space than this is reported as a full disk


def _existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def write_error_message(e: BaseException, path: str | Path, what: str = "checkpoint") -> str:
    """One line for a failed write under ``path``: disk full, read-only or not writable, else the cause.

    torch.save reports a full disk as ``[enforce fail at inline_container.cc] ... unexpected pos``
    or ``file write failed`` (no errno), so after any failure the free space is measured too."""
    path = Path(path)
    code = getattr(e, "errno", None)
    try:
        free = shutil.disk_usage(_existing(path)).free
    except OSError:
        free = None
    text = str(e).lower()
    if code in (errno.ENOSPC, errno.EDQUOT) or "no space left" in text or (free is not None and free < LOW_SPACE):
        room = f" ({free / 2**20:.0f} MiB free)" if free is not None else ""
        return f"cannot write {what} {path}: no space left on device{room}; free some space and run again"
    if code in (errno.EROFS, errno.EACCES, errno.EPERM) or not os.access(_existing(path), os.W_OK):
        return f"cannot write {what} {path}: the folder is read-only or not writable ({type(e).__name__}: {e})"
    return f"cannot write {what} {path}: {type(e).__name__}: {e}"


@contextlib.contextmanager
def writing(path: str | Path, what: str = "checkpoint") -> Iterator[None]:
    """Turn an ``OSError``/``RuntimeError`` raised while writing ``path`` (torch.save, safetensors,
    accelerate) into a :class:`CheckpointError` naming the path and the cause; completed checkpoints
    are never touched by a failed write (they are renamed into place only when complete)."""
    try:
        yield
    except CheckpointError:
        raise
    except (OSError, RuntimeError) as e:
        raise CheckpointError(write_error_message(e, path, what)) from e


def checkpoint_dir(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / "checkpoints" / f"step_{step:08d}"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints (with their metadata file), oldest first."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step_*") if p.is_dir() and (p / META).is_file())


def read_meta(ckpt: str | Path) -> dict[str, Any]:
    p = Path(ckpt) / META
    try:
        meta = json.loads(p.read_text())
        int(meta["step"])
    except FileNotFoundError as e:
        raise CheckpointError(f"{p}: missing (an incomplete checkpoint)") from e
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{p}: unreadable checkpoint metadata ({type(e).__name__}: {e})") from e
    return meta


def clean_partial(output_dir: str | Path) -> list[Path]:
    """Remove what a crash left behind: ``.tmp_*`` folders (incomplete by construction), ``.del_*``
    folders (checkpoints rotated out, deletion interrupted) and ``.old_*``
    copies whose replacement is complete (an ``.old_*`` without one is renamed back). Returns what was
    removed. Call on the main process before a run writes checkpoints."""
    root = Path(output_dir) / "checkpoints"
    removed: list[Path] = []
    if not root.is_dir():
        return removed
    for old in sorted(root.glob(".old_step_*")):
        final = root / old.name.removeprefix(".old_")
        if (final / META).is_file() or not (old / META).is_file():
            shutil.rmtree(old, ignore_errors=True)
            removed.append(old)
        else:  # killed between the two renames of a replacement: put the old copy back
            if final.exists():
                shutil.rmtree(final, ignore_errors=True)
            old.rename(final)
    for tmp in sorted([*root.glob(".tmp_step_*"), *root.glob(".del_step_*")]):
        shutil.rmtree(tmp, ignore_errors=True)
        removed.append(tmp)
    for odd in sorted(p for p in root.glob("step_*") if p.is_dir() and not (p / META).is_file()):
        logger.warning("%s has no %s: not a complete checkpoint, never loaded (left as it is)", odd, META)
    if removed:
        logger.info("removed incomplete checkpoint folders left by an interrupted run: %s", ", ".join(map(str, removed)))
    return removed


def begin_checkpoint(output_dir: str | Path, step: int) -> tuple[Path, Path]:
    """Create an empty temporary folder for checkpoint ``step``; returns (tmp, final)."""
    final = checkpoint_dir(output_dir, step)
    tmp = final.with_name(f".tmp_{final.name}")
    with writing(tmp):
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    return tmp, final


def _file_digest(path: Path, sync: bool = True) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
        if sync:
            os.fsync(f.fileno())
    return h.hexdigest()


def manifest(folder: Path, checksums: bool = True) -> dict[str, dict[str, Any]]:
    """``{relative path: {"size": n, "sha256": hex}}`` for every file under ``folder`` (fsynced)."""
    out: dict[str, dict[str, Any]] = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name != META:
            entry: dict[str, Any] = {"size": p.stat().st_size}
            if checksums:
                entry["sha256"] = _file_digest(p)
            out[p.relative_to(folder).as_posix()] = entry
    return out


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def finish_checkpoint(
    output_dir: str | Path, tmp: Path, final: Path, step: int, keep: int = 3, extra: dict[str, Any] | None = None,
    checksums: bool = True,
) -> Path:
    """Write the manifest and metadata into ``tmp``, rename it to ``final`` (atomic on one file
    system), keep the last ``keep`` (0: all). A checkpoint of the same step is replaced without a
    moment where neither copy is complete."""
    with writing(tmp):
        return _finish_checkpoint(output_dir, tmp, final, step, keep, extra, checksums)


def _finish_checkpoint(
    output_dir: str | Path, tmp: Path, final: Path, step: int, keep: int, extra: dict[str, Any] | None,
    checksums: bool,
) -> Path:
    meta = {"format": FORMAT, "step": step, **(extra or {}), "files": manifest(tmp, checksums)}
    meta["meta_sha256"] = _meta_digest(meta)
    meta_tmp = tmp / (META + ".part")
    with open(meta_tmp, "w") as f:
        f.write(json.dumps(meta, indent=2))
        f.flush()
        os.fsync(f.fileno())
    meta_tmp.rename(tmp / META)
    _fsync_dir(tmp)
    old = None
    if final.exists():
        old = final.with_name(f".old_{final.name}")
        if old.exists():
            shutil.rmtree(old)
        final.rename(old)
    tmp.rename(final)
    _fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    if keep > 0:
        for stale in list_checkpoints(output_dir)[:-keep]:
            _remove(stale)
    return final


def _remove(ckpt: Path) -> None:
    """Rename out of the listing first, then delete: a kill during the deletion leaves a ``.del_*``
    folder (removed at the next start), never a half-deleted ``step_*`` one."""
    trash = ckpt.with_name(f".del_{ckpt.name}")
    if trash.exists():
        shutil.rmtree(trash, ignore_errors=True)
    ckpt.rename(trash)
    shutil.rmtree(trash, ignore_errors=True)


def save_checkpoint(
    output_dir: str | Path, step: int, write: Callable[[Path], None], keep: int = 3, extra: dict[str, Any] | None = None,
    checksums: bool = True,
) -> Path:
    """Single-process form: ``write(tmp)`` between begin and finish. A failed write is a
    :class:`CheckpointError` naming the folder and the cause (disk full, read-only); the partial
    folder is removed and the earlier checkpoints are left as they are."""
    tmp, final = begin_checkpoint(output_dir, step)
    try:
        with writing(tmp):
            write(tmp)
    except CheckpointError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return finish_checkpoint(output_dir, tmp, final, step, keep, extra, checksums)


def _meta_digest(meta: dict[str, Any]) -> str:
    body = {k: v for k, v in meta.items() if k != "meta_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def verified_meta(ckpt: str | Path) -> dict[str, Any]:
    """The metadata, checked against its own checksum and the folder's step (no file is hashed)."""
    ckpt = Path(ckpt)
    meta = read_meta(ckpt)
    if "meta_sha256" in meta and _meta_digest(meta) != meta["meta_sha256"]:
        raise CheckpointError(f"{ckpt / META}: does not match its own checksum (corrupted)")
    name = ckpt.name.removeprefix("damaged_")
    if name.startswith("step_") and name[5:].isdigit() and int(name[5:]) != int(meta["step"]):
        raise CheckpointError(f"{ckpt / META}: says step {meta['step']}, the folder is {ckpt.name}")
    return meta


def verify_checkpoint(ckpt: str | Path) -> dict[str, Any]:
    """Check the metadata (its own checksum, the step against the folder name) and every file of the
    manifest (presence, size, SHA-256); returns the metadata. Raises :class:`CheckpointError` naming
    the first bad file."""
    ckpt = Path(ckpt)
    meta = verified_meta(ckpt)
    files = meta.get("files")
    if files is None:  # format 1 (no manifest): only the metadata can be checked
        return meta
    for rel, entry in files.items():
        p = ckpt / rel
        if not p.is_file():
            raise CheckpointError(f"{p}: missing")
        size = p.stat().st_size
        if size != entry["size"]:
            raise CheckpointError(f"{p}: {size} bytes, the manifest says {entry['size']} (truncated or overwritten)")
        if "sha256" in entry and _file_digest(p, sync=False) != entry["sha256"]:
            raise CheckpointError(f"{p}: SHA-256 does not match the manifest (corrupted)")
    return meta


def quarantine(ckpt: Path) -> Path:
    """Move a damaged checkpoint out of the rotation (``damaged_step_N``) so it is never loaded or
    counted among the last K again; it is kept for inspection."""
    target = ckpt.with_name(f"damaged_{ckpt.name}")
    n = 1
    while target.exists():
        target, n = ckpt.with_name(f"damaged_{ckpt.name}.{n}"), n + 1
    ckpt.rename(target)
    return target


def resolve_resume(output_dir: str | Path, resume: str) -> list[Path]:
    """Candidates to resume from, best first: ``latest`` gives every complete checkpoint newest first;
    a path gives just that checkpoint."""
    if resume == "latest":
        found = list_checkpoints(output_dir)[::-1]
        if not found:
            raise FileNotFoundError(f"--resume latest: no checkpoint under {Path(output_dir) / 'checkpoints'}")
        return found
    p = Path(resume)
    if not (p / META).is_file():
        raise FileNotFoundError(f"--resume {resume}: not a diffalign checkpoint (no {META})")
    return [p]


def load_with_fallback(
    candidates: list[Path],
    load: Callable[[Path], None],
    verify: Callable[[Path], Any] | None = verify_checkpoint,
    agree: Callable[[bool], bool] = lambda ok: ok,
) -> tuple[Path, int]:
    """Load the first candidate that verifies and loads; warn, naming both, when falling back.
    Returns (dir, step).

    ``verify(ckpt)`` raises for a damaged checkpoint (default: :func:`verify_checkpoint`); ``agree(ok)``
    combines a success flag over all processes (every process must take the same candidate), so a
    multi-process run passes an all-reduce there and runs ``verify`` on one process only.
    """
    errors = []
    for i, ckpt in enumerate(candidates):
        reason = None
        try:
            if verify is not None:
                verify(ckpt)
        except Exception as e:
            reason = f"{type(e).__name__}: {e}"
        if not agree(reason is None):
            reason = reason or "failed verification on another process"
        else:
            try:
                load(ckpt)
            except Exception as e:  # a damaged checkpoint: try the previous one
                reason = f"{type(e).__name__}: {e}"
            if not agree(reason is None):
                reason = reason or "failed to load on another process"
        if reason is None:
            return ckpt, int(read_meta(ckpt)["step"])
        errors.append(f"{ckpt}: {reason}")
        if i + 1 < len(candidates):
            logger.warning("checkpoint %s is damaged (%s); falling back to %s", ckpt, reason, candidates[i + 1])
    raise CheckpointError("no checkpoint could be loaded:\n  " + "\n  ".join(errors))
