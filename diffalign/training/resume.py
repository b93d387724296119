"""Resuming a run: which checkpoint (``--resume latest|auto|DIR``), whether it fits the config, and
loading it on every process with a fall-back past damaged ones."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from ..config import RunConfig
from . import checkpoints as ckpt
from .metrics import agreed_max
from .state import check_rng_file, load_extra_state

logger = logging.getLogger(__name__)


def resolve_resume_mode(out: Path, resume: str | None) -> str | None:
    existing = ckpt.list_checkpoints(out)
    if resume == "auto":
        return "latest" if existing else None
    if resume is None and existing:
        raise FileExistsError(
            f"{out} already holds checkpoints (newest: {existing[-1].name}) of an earlier run: continue it with "
            "--resume latest (or --resume auto), or choose another --train.output_dir"
        )
    return resume


def run_facts(cfg: RunConfig, num_processes: int, dataset_len: int) -> dict[str, Any]:
    """What a checkpoint records about its run; a resume checks them against the current config."""
    m, t = cfg.model, cfg.train
    return {
        "model.path": m.path, "model.lora": m.lora, "model.lora_rank": m.lora_rank if m.lora else None,
        "model.lora_targets": list(m.lora_targets) if m.lora else None, "objective.name": cfg.objective.name,
        "num_processes": num_processes, "train.batch_size": t.batch_size, "train.grad_accum": t.grad_accum,
        "train.seed": t.seed, "train.rng": t.rng, "train.ema": t.ema, "dataset_items": dataset_len,
    }


# a different value of these makes the saved state unusable: refuse with a clear message
MUST_MATCH = ("model.lora", "model.lora_rank", "model.lora_targets", "objective.name", "train.ema")


def check_facts(where: Path, saved: dict[str, Any], now: dict[str, Any]) -> None:
    diff = {k: (saved[k], now[k]) for k in now if k in saved and saved[k] != now[k]}
    hard = {k: v for k, v in diff.items() if k in MUST_MATCH}
    if hard:
        lines = "; ".join(f"{k}: checkpoint {a!r}, config {b!r}" for k, (a, b) in hard.items())
        raise ValueError(f"{where}: written by a run with a different setup ({lines}); resume with the same "
                         "settings, or start a new run in another train.output_dir")
    if diff:
        lines = "; ".join(f"{k}: checkpoint {a!r}, now {b!r}" for k, (a, b) in diff.items())
        logger.warning("resuming %s with a changed setup (%s): the run continues but is not an exact "
                       "continuation of the interrupted one", where, lines)


def load_checkpoint(accelerator: Any, out: Path, mode: str, facts: dict[str, Any], ema: Any, stateful: Any) -> tuple[Path, int]:
    """Load the newest checkpoint that verifies and loads on every process; set damaged ones aside."""
    cands = ckpt.resolve_resume(out, mode)
    for c in cands:  # the run's setup, from the newest intact metadata
        try:
            meta = ckpt.verified_meta(c)
        except ckpt.CheckpointError:
            continue
        check_facts(c, meta, facts)
        break
    main = accelerator.is_main_process
    rank = accelerator.process_index

    def verify(p: Path) -> None:
        if main:  # one process reads and hashes the files; agree() shares the verdict
            ckpt.verify_checkpoint(p)

    def load(p: Path) -> None:
        check_rng_file(p / "state", rank, accelerator.num_processes)
        accelerator.load_state(str(p / "state"))
        load_extra_state(p / "state", rank, ema, stateful)

    used, step = ckpt.load_with_fallback(cands, load, verify=verify, agree=lambda ok: not agreed_max(accelerator, int(not ok)))
    if main:
        for bad in cands[: cands.index(used)]:
            moved = ckpt.quarantine(bad)
            logger.warning("damaged checkpoint %s moved to %s (kept for inspection, never loaded)", bad, moved)
    accelerator.wait_for_everyone()
    logger.info("resumed from %s at step %d", used, step)
    return used, step


def truncate_metrics(path: Path, step: int) -> None:
    """Drop the lines a killed run wrote after its last checkpoint (and a torn last line)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if int(rec.get("step", 0)) <= step:
            keep.append(line)
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(x + "\n" for x in keep))
    tmp.replace(path)
