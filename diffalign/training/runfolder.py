"""The run folder (``train.output_dir``): nothing in it is lost or silently replaced.

- One run at a time: :func:`lock` writes ``.diffalign.lock`` (PID, host, start time) with ``O_EXCL``.
  A second run into the folder is a :class:`RunFolderError` naming the PID holding it; a lock left by
  a process that no longer runs (killed with -9, a crashed machine) is taken over with a warning. A
  lock from another host cannot be checked and is refused, with the file to remove.
- A fresh run into a folder holding an earlier run's results (``final/``, ``metrics.jsonl``,
  ``checkpoints/``) is refused unless ``overwrite=True`` (``diffalign train --overwrite``), which
  removes those results first, naming them.
- A finished run stays finished: resuming a run whose ``final/result.json`` says it completed at
  ``train.steps`` or later returns that result without training or writing anything.
- A resume states what changed in the config, key by key. Keys that only steer the bookkeeping
  (``RESUME_FREE``, e.g. ``train.steps``) may change; any other change is refused unless
  ``allow_config_change=True`` (``--allow-config-change``). ``config.yaml`` is never rewritten: the
  first run writes it, a resume with a changed config writes ``config.resume-N.yaml`` beside it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

logger = logging.getLogger(__name__)

LOCK = ".diffalign.lock"
CONFIG = "config.yaml"
RESULTS = ("final", "metrics.jsonl", "checkpoints", "samples", "logs")  # what a run writes

# keys that may differ on resume without changing what is being trained
RESUME_FREE = frozenset({
    "train.steps", "train.output_dir", "train.progress", "train.log_every", "train.checkpoint_every",
    "train.keep_checkpoints", "train.checkpoint_checksums", "train.sample_every", "train.sample_prompts",
    "train.sample_steps", "train.sample_guidance", "train.max_nonfinite_steps", "data.num_workers",
})


class RunFolderError(RuntimeError):
    """The run folder is in use, holds another run's results, or does not fit this run."""


# --------------------------------------------------------------------------------------------------
# the lock
# --------------------------------------------------------------------------------------------------
def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _write_lock(path: Path) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    with os.fdopen(fd, "w") as f:
        json.dump({"pid": os.getpid(), "host": socket.gethostname(),
                   "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}, f)


def _read_lock(path: Path) -> dict[str, Any]:
    try:
        info = json.loads(path.read_text())
        return info if isinstance(info, dict) else {}
    except (OSError, ValueError):
        return {}


def acquire(out: str | Path) -> Path:
    """Create ``out`` and take its lock; returns the lock file. See the module docstring."""
    from .checkpoints import write_error_message

    out = Path(out)
    path = out / LOCK
    try:
        out.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            try:
                _write_lock(path)
                return path
            except FileExistsError:
                pass
            info = _read_lock(path)
            pid, host = info.get("pid"), info.get("host")
            if not isinstance(pid, int):  # torn or foreign: written by a process killed mid-write
                if time.time() - path.stat().st_mtime < 5:
                    time.sleep(1)  # maybe being written right now
                    continue
                logger.warning("%s: unreadable lock file, taken over", path)
            elif host != socket.gethostname():
                raise RunFolderError(
                    f"{out}: in use by a diffalign run on {host} (PID {pid}, started {info.get('started')}); if no "
                    f"run is writing to it any more, remove {path}"
                )
            elif pid == os.getpid():
                return path  # our own (train() called twice in one process, e.g. from a notebook)
            elif _alive(pid):
                raise RunFolderError(
                    f"{out}: another diffalign run (PID {pid}, started {info.get('started')}) is writing to this "
                    "folder; wait for it to finish, or choose another train.output_dir"
                )
            else:
                logger.warning("%s: taking over the lock of PID %s, which is no longer running (started %s)",
                               out, pid, info.get("started"))
            path.unlink(missing_ok=True)
    except OSError as e:
        raise RunFolderError(f"train.output_dir: {write_error_message(e, out, 'to the run folder')}") from e
    raise RunFolderError(f"{path}: could not take the lock (another run is starting in this folder?)")


def release(path: Path) -> None:
    """Remove the lock if it is still ours."""
    if _read_lock(path).get("pid") == os.getpid():
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def lock(out: str | Path, enabled: bool = True) -> Iterator[None]:
    """Hold the run folder's lock for the block (``enabled=False``: a no-op, for non-main processes)."""
    if not enabled:
        yield
        return
    path = acquire(out)
    try:
        yield
    finally:
        release(path)


# --------------------------------------------------------------------------------------------------
# earlier results, finished runs
# --------------------------------------------------------------------------------------------------
def earlier_results(out: str | Path) -> list[Path]:
    """What an earlier run left in ``out`` that a fresh run would overwrite or mix with."""
    out = Path(out)
    found = []
    for name in RESULTS:
        p = out / name
        if p.is_file() or (p.is_dir() and any(p.iterdir())):
            found.append(p)
    return found


def check_fresh(out: str | Path, overwrite: bool = False, only: tuple[str, ...] = RESULTS) -> None:
    """Refuse a fresh run into a folder holding results (those named in ``only``), or remove every
    result of the earlier run when ``overwrite``."""
    out = Path(out)
    found = earlier_results(out)
    if not any(p.name in only for p in found):
        found = [] if not overwrite else found
    if not found:
        return
    names = ", ".join(p.name + ("/" if p.is_dir() else "") for p in found)
    if not overwrite:
        raise RunFolderError(
            f"{out}: holds an earlier run's results ({names}); continue it with --resume latest, choose another "
            "train.output_dir, or pass --overwrite to delete them and start again"
        )
    for p in found:
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    for p in out.glob("config*.yaml"):
        p.unlink()
    logger.warning("%s: --overwrite: removed the earlier run's %s", out, names)


def prepare(out: str | Path, resume: str | None, overwrite: bool, main: bool) -> None:
    """Before a run starts: a fresh run (``resume`` None) must not meet an earlier run's results;
    ``--resume auto`` without a checkpoint starts fresh too, and must not meet a finished run's
    ``final/`` (a run killed before its first checkpoint restarts). Only the main process acts."""
    from .checkpoints import list_checkpoints

    if not main:
        return
    if resume is None:
        if list_checkpoints(out) and not overwrite:
            return  # resume.resolve_resume_mode refuses, naming the newest checkpoint
        check_fresh(out, overwrite)
    elif resume == "auto" and not list_checkpoints(out):
        check_fresh(out, overwrite, only=("final",))
    elif overwrite:
        raise RunFolderError("--overwrite starts a new run: it cannot be combined with --resume")


def finished_run(cfg: Any, out: str | Path) -> dict[str, Any] | None:
    """The saved result when ``out`` holds a run finished at ``cfg.train.steps`` or later (announced;
    nothing is trained or written), else None. A finished run asked for with a config that changes
    what is trained is a :class:`RunFolderError` naming the keys, not its old result."""
    result = completed_result(out, cfg.train.steps)
    if result is None:
        return None
    first = Path(out) / CONFIG
    if first.is_file():
        with contextlib.suppress(yaml.YAMLError):
            diff = config_changes(yaml.safe_load(first.read_text()) or {}, _as_dict(cfg))
            hard = {k: v for k, v in diff.items() if k not in RESUME_FREE}
            if hard:
                text = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in hard.items())
                raise RunFolderError(f"{out}: holds a finished run trained with another config ({text}); start "
                                     "the new one in another train.output_dir (or pass --overwrite without --resume)")
    return already_complete(out, result)


def already_complete(out: str | Path, result: dict[str, Any]) -> dict[str, Any]:
    """The saved result of a finished run, announced; nothing is trained or written."""
    logger.warning("%s: this run is already complete (step %s; %s); nothing was trained or rewritten. Raise "
                   "train.steps to train further, or start a new run in another train.output_dir",
                   out, result.get("step"), Path(out) / "final" / "result.json")
    return {**result, "already_complete": True}


def completed_result(out: str | Path, steps: int) -> dict[str, Any] | None:
    """The result of a run in ``out`` that completed at ``steps`` or later, else None."""
    f = Path(out) / "final" / "result.json"
    try:
        result = json.loads(f.read_text())
    except (OSError, ValueError):
        return None
    if isinstance(result, dict) and result.get("status") == "completed" and int(result.get("step", -1)) >= steps:
        return result
    return None


# --------------------------------------------------------------------------------------------------
# config changes on resume
# --------------------------------------------------------------------------------------------------
def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        out.update(_flatten(v, key) if isinstance(v, dict) else {key: v})
    return out


def config_changes(old: dict[str, Any], new: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``{"objective.beta": (5000.0, 2500.0), ...}`` for every key whose value differs."""
    a, b = _flatten(old), _flatten(new)
    missing = object()
    diff = {}
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k, missing), b.get(k, missing)
        if isinstance(va, tuple):
            va = list(va)
        if isinstance(vb, tuple):
            vb = list(vb)
        if va != vb:
            diff[k] = (None if va is missing else va, None if vb is missing else vb)
    return diff


def _as_dict(cfg: Any) -> dict[str, Any]:
    return yaml.safe_load(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))


def write_config(cfg: Any, out: str | Path, resuming: bool, allow_config_change: bool = False) -> Path | None:
    """Write ``config.yaml`` for a fresh run; on resume compare with it, key by key (see the module
    docstring). Returns the file written, or None when the config is unchanged."""
    out = Path(out)
    first = out / CONFIG
    now = _as_dict(cfg)
    if not resuming or not first.is_file():
        first.write_text(yaml.safe_dump(now, sort_keys=False))
        return first
    try:
        old = yaml.safe_load(first.read_text()) or {}
    except yaml.YAMLError as e:
        raise RunFolderError(f"{first}: unreadable ({e}); it records the run's config, restore it to resume") from e
    from .resume import MUST_MATCH

    diff = config_changes(old, now)
    if not diff or any(k in MUST_MATCH for k in diff):
        return None  # unchanged; or a change the checkpoint cannot take, refused by resume.check_facts
    text = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items())
    hard = [k for k in diff if k not in RESUME_FREE]
    if hard and not allow_config_change:
        raise RunFolderError(
            f"{first}: resuming with a changed config ({text}). Changed keys that alter what is trained: "
            f"{', '.join(hard)}. Resume with the run's own config, start a new run in another train.output_dir, "
            "or pass --allow-config-change"
        )
    n = 1
    while (out / f"config.resume-{n}.yaml").exists():
        n += 1
    new = out / f"config.resume-{n}.yaml"
    new.write_text(yaml.safe_dump(now, sort_keys=False))
    logger.warning("resuming %s with a changed config (%s); %s is kept, the new config is in %s",
                   out, text, first.name, new.name)
    return new
