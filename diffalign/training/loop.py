"""The one training loop, for every objective.

It owns accelerate (devices, mixed precision, gradient accumulation, multi-process), clipping, the
LR schedule with warm-up, optional EMA, checkpoints and ``--resume``, TensorBoard scalars and a
metrics.jsonl, the progress bar, and sample grids. Objectives compute ``loss(batch, backbone)``;
an objective may also define

    setup(backbone)          once, before the optimizer is built (e.g. a lagged sampler's copy)
    on_update(backbone)      after every optimizer update (e.g. refresh that copy)
    state_dict() / load_state_dict(state)   state saved in checkpoints (e.g. a replay buffer), one
                             file per process, read back with ``torch.load(weights_only=True)``
    data_kind                "pairs" (default) or "experts" (single demonstration images)

Reliability (docs/RELIABILITY.md):
- exact resume: a checkpoint holds the optimizer, scheduler, RNG of every process, EMA and the
  objective's state; the data order is a function of (seed, epoch), so a resumed run takes the
  same steps as an uninterrupted one, bit for bit on CPU;
- SIGTERM / SIGINT: the step in flight finishes, a checkpoint is saved, ``train`` returns with
  ``status="interrupted"`` (a second Ctrl-C aborts at once);
- a non-finite loss or gradient skips the update (on every process alike) and is counted;
  ``train.max_nonfinite_steps`` in a row stop the run with :class:`NonFiniteError`;
- checkpoints are verified (SHA-256 manifest) on resume; a damaged one is set aside and the
  previous one used, with a warning naming both;
- multi-process: every collective decision (skip, stop, which checkpoint) is agreed by all
  processes; only the main process writes metrics, logs, weights and images, and it alone creates,
  completes and renames checkpoint folders (each process adds its own RNG/objective-state file).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..config import RunConfig, dump_config
from ..objectives import build_objective
from . import checkpoints as ckpt
from .batches import SeededItems, model_inputs
from .setup import build_backbone, build_dataset, build_optimizer

logger = logging.getLogger(__name__)

STATE_FILE = "diffalign_state_{rank}.pt"  # per process, inside checkpoints/step_N/state/


class NonFiniteError(RuntimeError):
    """``train.max_nonfinite_steps`` consecutive steps had a non-finite loss or gradient."""


def train(cfg: RunConfig, resume: str | None = None) -> dict[str, Any]:
    """Run ``cfg`` to ``cfg.train.steps`` optimizer steps; returns the last metrics and output paths.

    ``resume``: ``None`` (a fresh run; an error if ``output_dir`` already holds checkpoints),
    ``"latest"`` (the newest loadable checkpoint; an error if there is none), ``"auto"`` (latest if
    any, else fresh) or a checkpoint folder. ``result["status"]`` is ``"completed"`` or
    ``"interrupted"`` (then ``result["signal"]`` names the signal and ``result["checkpoint"]`` the
    checkpoint it saved).
    """
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration

    t = cfg.train
    out = Path(t.output_dir)
    _check_launch()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    accelerator = Accelerator(
        cpu=world > 1 and not torch.cuda.is_available(),  # `accelerate launch --multi_gpu` on a CPU machine: gloo
        mixed_precision=t.mixed_precision,
        gradient_accumulation_steps=t.grad_accum,
        log_with="tensorboard",
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    if accelerator.num_processes != world:
        raise RuntimeError(
            f"launched as {world} processes (WORLD_SIZE) but accelerate set up {accelerator.num_processes}: "
            "each would train alone and they would overwrite each other's output"
        )
    resume = _resolve_resume_mode(out, resume)
    with _StopSignals() as stop:
        return _run(cfg, resume, accelerator, stop)


def _run(cfg: RunConfig, resume: str | None, accelerator: Any, stop: _StopSignals) -> dict[str, Any]:
    from accelerate.utils import set_seed
    from diffusers.optimization import get_scheduler

    t = cfg.train
    out = Path(t.output_dir)
    main = accelerator.is_main_process
    set_seed(t.seed)
    if main:
        out.mkdir(parents=True, exist_ok=True)
        ckpt.clean_partial(out)
        dump_config(cfg, out / "config.yaml")

    # model, data, objective, optimizer
    backbone = build_backbone(cfg, accelerator.device)
    objective = build_objective(cfg.objective.name, **cfg.objective.model_dump(exclude={"name"}))
    if hasattr(objective, "setup"):
        objective.setup(backbone)
    dataset, collate, empty_cond = build_dataset(cfg, backbone, getattr(objective, "data_kind", "pairs"))
    raw_dataset = dataset
    dataset = SeededItems(dataset, t.seed)
    if len(dataset) < t.batch_size * accelerator.num_processes:
        raise ValueError(f"data.train {cfg.data.train}: {len(dataset)} items, fewer than one batch of {t.batch_size}")
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=t.batch_size, shuffle=True, collate_fn=collate, drop_last=True,
        num_workers=cfg.data.num_workers, generator=torch.Generator().manual_seed(t.seed),
        worker_init_fn=_worker_ignores_stop_signals if cfg.data.num_workers else None,
    )
    params = backbone.trainable_parameters()
    optimizer = build_optimizer(cfg, params, accelerator.num_processes)
    lr_scheduler = get_scheduler(
        t.lr_scheduler if t.lr_scheduler != "constant" or t.warmup_steps == 0 else "constant_with_warmup",
        optimizer, num_warmup_steps=t.warmup_steps * accelerator.num_processes,
        num_training_steps=t.steps * accelerator.num_processes,
    )
    backbone.denoiser, optimizer, loader, lr_scheduler = accelerator.prepare(
        backbone.denoiser, optimizer, loader, lr_scheduler
    )
    fsdp = str(accelerator.distributed_type).endswith("FSDP")
    if fsdp and t.ema:
        raise ValueError("train.ema is not supported with FSDP (the EMA would follow one shard); use DDP or ZeRO-2")
    if fsdp and t.sample_every and main:
        logger.warning("FSDP: no sample grids are drawn during training (every process holds a shard); "
                       "sample from the final weights with `diffalign sample`")
    clip_params = list(backbone.denoiser.parameters()) if fsdp else params  # FSDP clips its own flat shards
    if _has_lora(backbone):  # checkpoints hold the adapter, not a copy of the frozen base per checkpoint
        accelerator.register_save_state_pre_hook(_keep_trainable_only)
        accelerator.register_load_state_pre_hook(_load_trainable_only)
    ema = None
    if t.ema:
        from diffusers.training_utils import EMAModel

        ema = EMAModel(params, decay=t.ema_decay)
    # EMA and objective state are written by save() below (one file per process) and read back with
    # torch.load(weights_only=True): accelerate's register_for_checkpointing would unpickle them
    # with weights_only=False and keep only the main process's objective state.
    stateful = objective if hasattr(objective, "state_dict") and hasattr(objective, "load_state_dict") else None
    run_facts = _run_facts(cfg, accelerator.num_processes, len(dataset))

    # resume
    step = 0
    resumed_from: Path | None = None
    if resume:
        resumed_from, step = _resume(accelerator, out, resume, run_facts, ema, stateful)
        accelerator.print(f"resumed from {resumed_from} at step {step}")
    if main:
        accelerator.init_trackers("diffalign", init_kwargs={"tensorboard": {"purge_step": step + 1}} if step else {})
        _truncate_metrics(out / "metrics.jsonl", step)

    saved = {"step": step, "path": resumed_from}  # the newest checkpoint of this run
    counters = {"skipped_steps": int(ckpt.read_meta(resumed_from).get("skipped_steps", 0)) if resumed_from else 0}

    def export_weights(out_dir: Path) -> Path | None:
        """Called on every process (FSDP gathers the full weights, a collective); the main one writes."""
        if fsdp:
            state = accelerator.get_state_dict(backbone.denoiser)
            return _save_weights_from_state(backbone, out_dir, state) if main else None
        return _save_weights(backbone, out_dir, ema) if main else None

    def save(step: int) -> Path | None:
        """Every process writes its own state (RNG, objective) into one temporary folder; the main
        process adds the weights and the manifest and renames it into place."""
        if saved["step"] == step:
            return saved["path"]
        tmp, final = ckpt.checkpoint_dir(out, step).with_name(f".tmp_step_{step:08d}"), None
        if main:
            tmp, final = ckpt.begin_checkpoint(out, step)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp / "state"))
        _save_extra_state(tmp / "state", accelerator.process_index, ema if main else None, stateful)
        export_weights(tmp)
        accelerator.wait_for_everyone()  # every process's files are in before the manifest is taken
        if main:
            final = ckpt.finish_checkpoint(out, tmp, final, step, keep=t.keep_checkpoints,
                                           extra={**run_facts, **counters}, checksums=t.checkpoint_checksums)
        accelerator.wait_for_everyone()
        saved.update(step=step, path=final or ckpt.checkpoint_dir(out, step))
        return final

    # train
    metrics_file = out / "metrics.jsonl"
    batches = _batches(loader, dataset, first_micro_step=step * t.grad_accum)
    bar = tqdm(total=t.steps, initial=step, desc="train", disable=not (t.progress and accelerator.is_local_main_process))
    last: dict[str, float] = {}
    window: list[dict[str, float]] = []
    t0, steps_timed = time.time(), 0
    skipped_total, in_a_row, last_good = counters["skipped_steps"], 0, resumed_from
    status, stop_signal = "completed", None
    rank, nproc = accelerator.process_index, accelerator.num_processes
    deepspeed = str(accelerator.distributed_type).endswith("DEEPSPEED")
    try:
        while step < t.steps:
            signum = _agreed_max(accelerator, stop.signum or 0)
            if signum:
                status, stop_signal = "interrupted", signal.Signals(signum).name
                break
            skipped = False
            bad_here = False
            for k in range(t.grad_accum):
                batch = next(batches)
                if t.rng == "per_batch":  # noise is a function of (seed, global micro-batch index)
                    torch.manual_seed(_batch_seed(t.seed, (step * t.grad_accum + k) * nproc + rank))
                with accelerator.accumulate(backbone.denoiser):
                    inputs = model_inputs(batch, backbone, cfg.data.prompt_dropout, empty_cond)
                    with accelerator.autocast():
                        loss, metrics = objective.loss(inputs, backbone)
                    finite = bool(torch.isfinite(loss.detach()).all())
                    bad_here |= not finite
                    if deepspeed and _agreed_max(accelerator, int(not finite)):
                        skipped, bad_here = True, False  # DeepSpeed updates inside backward: leave it out
                        continue
                    accelerator.backward(loss)  # always: with DDP every process must join the all-reduce
                    if accelerator.sync_gradients:
                        norm = _grad_norm(accelerator, clip_params, t.max_grad_norm)
                        if norm is not None and math.isfinite(norm):
                            metrics["grad_norm"] = norm
                        # fp16: an overflowing gradient is the GradScaler's business (it skips and rescales)
                        grad_bad = norm is not None and not math.isfinite(norm) and accelerator.scaler is None
                        if _agreed_max(accelerator, int(bad_here or grad_bad)):
                            optimizer.zero_grad(set_to_none=True)
                            skipped = True
                            if accelerator.scaler is not None:  # forget this step's unscale_ record
                                with contextlib.suppress(RuntimeError, AssertionError):
                                    accelerator.scaler.update(accelerator.scaler.get_scale())
                        else:
                            optimizer.step()
                            lr_scheduler.step()
                            optimizer.zero_grad(set_to_none=True)
                            if hasattr(objective, "on_update"):
                                objective.on_update(backbone)
                        bad_here = False
                if finite:
                    window.append(metrics)
            step += 1
            steps_timed += 1
            if skipped:
                skipped_total += 1
                counters["skipped_steps"] = skipped_total
                in_a_row += 1
                if main:
                    logger.warning("step %d: non-finite loss or gradient; update skipped (%d in a row, %d in all)",
                                   step, in_a_row, skipped_total)
                if in_a_row >= t.max_nonfinite_steps:
                    where = f"last good checkpoint: {last_good}" if last_good else "no checkpoint was saved yet"
                    raise NonFiniteError(
                        f"{in_a_row} steps in a row (up to step {step}) had a non-finite loss or gradient "
                        f"(train.max_nonfinite_steps={t.max_nonfinite_steps}); stopping. {where}. "
                        "Lower train.lr or check the data, then resume with --resume latest"
                    )
            else:
                in_a_row = 0
                if ema is not None:
                    ema.step(params)
            if step % t.log_every == 0 or step == t.steps:
                last = _window_means(accelerator, window)
                last["lr"] = lr_scheduler.get_last_lr()[0]
                last["steps_per_s"] = steps_timed / max(time.time() - t0, 1e-9)
                last["skipped_steps"] = skipped_total
                window, t0, steps_timed = [], time.time(), 0
                accelerator.log(last, step=step)
                if main:
                    with metrics_file.open("a") as f:
                        f.write(json.dumps({"step": step, **last}) + "\n")
                if "loss" in last:
                    bar.set_postfix(loss=f"{last['loss']:.4f}", acc=f"{last.get('implicit_acc', 0):.2f}")
            bar.update(1)
            if t.checkpoint_every and step % t.checkpoint_every == 0 and step < t.steps:
                path = save(step)
                if in_a_row == 0:
                    last_good = path
            if t.sample_every and step % t.sample_every == 0 and step < t.steps and main and not fsdp:
                sample_grid(backbone, cfg, out / "samples" / f"step_{step:08d}.png")
        bar.close()
        final = save(step) if step > 0 else None
    finally:
        bar.close()
        if main:
            for tracker in accelerator.trackers:
                tracker.finish()
    result: dict[str, Any] = {
        "step": step, "status": status, "metrics": last, "checkpoint": str(final) if final else None,
        "skipped_steps": skipped_total, "main_process": main, "data": _data_report(raw_dataset),
    }
    if status == "interrupted":
        result["signal"] = stop_signal
        if main:
            logger.warning("%s: stopped at step %d; %s", stop_signal, step,
                           f"checkpoint {final}" if final else "no step taken, nothing to save")
    else:
        weights = export_weights(out / "final")
        if main:
            result["weights"] = str(weights)
            if not fsdp:
                result["samples"] = str(sample_grid(backbone, cfg, out / "samples" / "final.png"))
            (out / "final" / "result.json").write_text(json.dumps(result, indent=2))
    accelerator.end_training()
    return result


# --------------------------------------------------------------------------------------------------
# launch and resume
# --------------------------------------------------------------------------------------------------
class LaunchError(RuntimeError):
    """The processes that were started are not the ones that were asked for."""


def cpu_processes_requested() -> int | None:
    """N when this process was started by ``accelerate launch --cpu --num_processes N`` (N > 1), which
    starts ONE process unless mpirun is configured (accelerate's simple launcher); else None."""
    if os.environ.get("WORLD_SIZE") or os.environ.get("ACCELERATE_USE_CPU", "").lower() not in ("1", "true", "yes"):
        return None
    try:
        argv = Path(f"/proc/{os.getppid()}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return None
    if not any(a.endswith(("accelerate", "accelerate-launch")) for a in argv[:3]):
        return None
    if any(a.startswith("--mpirun_hostfile") for a in argv):
        return None
    n = None
    for i, a in enumerate(argv):
        for flag in ("--num_processes", "--num-processes"):
            if a == flag and i + 1 < len(argv):
                n = argv[i + 1]
            elif a.startswith(flag + "="):
                n = a.split("=", 1)[1]
    return int(n) if n and n.isdigit() and int(n) > 1 else None


def _check_launch() -> None:
    """Refuse to train alone when N processes were asked for (the ``diffalign train`` command
    relaunches itself with torchrun instead; a script calling ``train`` gets this error)."""
    n = cpu_processes_requested()
    if n:
        raise LaunchError(
            f"`accelerate launch --cpu --num_processes {n}` started a single process (accelerate runs several CPU "
            "processes only through mpirun). Use  accelerate launch --config_file configs/accelerate/cpu.yaml "
            f"--num_processes {n} SCRIPT  (torchrun + gloo), or the `diffalign train` command, which relaunches itself"
        )


def _resolve_resume_mode(out: Path, resume: str | None) -> str | None:
    existing = ckpt.list_checkpoints(out)
    if resume == "auto":
        return "latest" if existing else None
    if resume is None and existing:
        raise FileExistsError(
            f"{out} already holds checkpoints (newest: {existing[-1].name}) of an earlier run: continue it with "
            "--resume latest (or --resume auto), or choose another --train.output_dir"
        )
    return resume


def _run_facts(cfg: RunConfig, num_processes: int, dataset_len: int) -> dict[str, Any]:
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


def _check_facts(where: Path, saved: dict[str, Any], now: dict[str, Any]) -> None:
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


def _resume(accelerator: Any, out: Path, resume: str, facts: dict[str, Any], ema: Any, stateful: Any) -> tuple[Path, int]:
    """Load the newest checkpoint that verifies and loads on every process; set damaged ones aside."""
    cands = ckpt.resolve_resume(out, resume)
    for c in cands:  # the run's setup, from the newest intact metadata
        try:
            meta = ckpt.verified_meta(c)
        except ckpt.CheckpointError:
            continue
        _check_facts(c, meta, facts)
        break
    main = accelerator.is_main_process
    rank = accelerator.process_index

    def verify(p: Path) -> None:
        if main:  # one process reads and hashes the files; agree() shares the verdict
            ckpt.verify_checkpoint(p)

    def load(p: Path) -> None:
        _check_rng_file(p / "state", rank, accelerator.num_processes)
        accelerator.load_state(str(p / "state"))
        _load_extra_state(p / "state", rank, ema, stateful)

    used, step = ckpt.load_with_fallback(cands, load, verify=verify, agree=lambda ok: not _agreed_max(accelerator, int(not ok)))
    if main:
        for bad in cands[: cands.index(used)]:
            moved = ckpt.quarantine(bad)
            logger.warning("damaged checkpoint %s moved to %s (kept for inspection, never loaded)", bad, moved)
    accelerator.wait_for_everyone()
    logger.info("resumed from %s at step %d", used, step)
    return used, step


def _has_lora(backbone: Any) -> bool:
    from ..backbones.base import _unwrap
    from ..backbones.lora import has_adapter

    return has_adapter(_unwrap(backbone.denoiser))


def _keep_trainable_only(models: list[Any], weights: list[dict[str, torch.Tensor]], output_dir: str) -> None:
    """accelerate's save hook: keep only the trainable tensors of each model (LoRA: a few MB instead
    of the whole frozen denoiser, 3.4 GB for SD1.5 and 24 GB for FLUX, in every checkpoint). The
    frozen base is rebuilt from ``model.path`` on resume."""
    for i, (model, sd) in enumerate(zip(models, weights, strict=False)):
        names = {n for n, p in model.named_parameters() if p.requires_grad}
        if names:
            weights[i] = {k: v for k, v in sd.items() if k in names}


def _load_trainable_only(models: list[Any], input_dir: str) -> None:
    """accelerate's load hook for :func:`_keep_trainable_only` checkpoints: load the trainable tensors
    (all of them, exactly) and leave the rest of the model as built. A checkpoint with the full state
    dict is left to accelerate."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    f = Path(input_dir) / "model.safetensors"
    if not models or not f.is_file():
        return
    model = models[0]
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    with safe_open(str(f), "pt") as fh:
        keys = set(fh.keys())
    if len(keys) > len(trainable) and keys >= set(trainable):
        return  # a full state dict
    if keys != set(trainable):
        missing, extra = sorted(set(trainable) - keys), sorted(keys - set(trainable))
        raise ckpt.CheckpointError(f"{f}: its tensors do not match the trainable parameters (missing "
                                   f"{missing[:3]}{'...' if len(missing) > 3 else ''}, unexpected {extra[:3]})")
    sd = load_file(str(f))
    with torch.no_grad():
        for n, p in trainable.items():
            if sd[n].shape != p.shape:
                raise ckpt.CheckpointError(f"{f}: {n} has shape {tuple(sd[n].shape)}, the model {tuple(p.shape)}")
            p.copy_(sd[n].to(device=p.device, dtype=p.dtype))
    models.remove(model)


def _check_rng_file(state: Path, rank: int, num_processes: int) -> None:
    """accelerate logs and ignores an unreadable RNG file, which would make a resume silently inexact."""
    from accelerate.utils.other import load

    f = state / f"random_states_{rank}.pkl"
    if not f.is_file():
        if rank == 0 or num_processes == 1:
            raise ckpt.CheckpointError(f"{f}: missing")
        logger.warning("%s: missing (the checkpoint was written by fewer processes); this process starts a "
                       "fresh random stream", f)
        return
    try:
        load(f)  # weights_only=True with accelerate's allow-list (numpy RNG state)
    except Exception as e:
        raise ckpt.CheckpointError(f"{f}: unreadable ({type(e).__name__}: {e})") from e


def _save_extra_state(state: Path, rank: int, ema: Any, stateful: Any) -> None:
    payload: dict[str, Any] = {}
    if stateful is not None:
        payload["objective"] = stateful.state_dict()
    if ema is not None:
        payload["ema"] = ema.state_dict()
    if payload:
        torch.save(payload, state / STATE_FILE.format(rank=rank))


def _load_extra_state(state: Path, rank: int, ema: Any, stateful: Any) -> None:
    """The objective's state from this process's file, the EMA from the main process's file."""
    if stateful is not None:
        f = state / STATE_FILE.format(rank=rank)
        if f.is_file():
            stateful.load_state_dict(torch.load(f, map_location="cpu", weights_only=True)["objective"])
        elif rank == 0:
            raise ckpt.CheckpointError(f"{f}: missing (the objective's state)")
        else:
            logger.warning("%s: missing (the checkpoint was written by fewer processes); this process's objective "
                           "state starts fresh", f)
    if ema is not None:
        f = state / STATE_FILE.format(rank=0)
        payload = torch.load(f, map_location="cpu", weights_only=True) if f.is_file() else {}
        if "ema" not in payload:
            raise ckpt.CheckpointError(f"{f}: no EMA state (was the run started without train.ema?)")
        ema.load_state_dict(payload["ema"])


def _truncate_metrics(path: Path, step: int) -> None:
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


# --------------------------------------------------------------------------------------------------
# steps
# --------------------------------------------------------------------------------------------------
def _agreed_max(accelerator: Any, value: int) -> int:
    """The largest ``value`` over all processes (the same answer everywhere); no collective when alone."""
    if accelerator.num_processes == 1:
        return int(value)
    v = torch.tensor([int(value)], device=accelerator.device, dtype=torch.int64)
    return int(accelerator.gather(v).max().item())


def _batch_seed(seed: int, index: int) -> int:
    h = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") >> 1


def _grad_norm(accelerator: Any, params: list[torch.nn.Parameter], max_norm: float | None) -> float | None:
    """The total gradient norm (before clipping, which it applies when ``max_norm`` is set); None
    where the engine keeps the gradients to itself (DeepSpeed)."""
    if max_norm:
        norm = accelerator.clip_grad_norm_(params, max_norm)
        return None if norm is None else float(norm)
    grads = [p.grad.detach() for p in params if p.grad is not None]
    if not grads:
        return None
    if accelerator.scaler is not None:
        return None
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])))


def _window_means(accelerator: Any, window: list[dict[str, float]]) -> dict[str, float]:
    """Mean of each metric over the logging window and, with several processes, over all of them."""
    sums: dict[str, list[float]] = {}
    for m in window:
        for k, v in m.items():
            s = sums.setdefault(k, [0.0, 0])
            s[0] += float(v)
            s[1] += 1
    if accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        merged: dict[str, list[float]] = {}
        for part in gather_object([sums]):
            for k, (total, n) in part.items():
                s = merged.setdefault(k, [0.0, 0])
                s[0] += total
                s[1] += n
        sums = merged
    return {k: total / n for k, (total, n) in sums.items() if n}


def _data_report(dataset: Any) -> dict[str, Any]:
    counts = dict(getattr(dataset, "skip_counts", {}) or {})
    return {"items": len(dataset), "skipped_rows": sum(counts.values()), "skipped_by_reason": counts,
            "skipped_at_load": int(getattr(dataset, "load_skips", 0))}


class _StopSignals:
    """SIGINT/SIGTERM set ``signum``; the loop saves a checkpoint at the next step boundary and returns.
    A second SIGINT (Ctrl-C twice) raises KeyboardInterrupt at once; repeated SIGTERMs (a launcher
    forwarding the terminal's SIGINT as SIGTERM) are absorbed. The previous handlers come back on exit."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _StopSignals:
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._old[s] = signal.getsignal(s)
                signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old = {}

    def _handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.signum is not None:
            if signum == signal.SIGINT:
                self.__exit__()
                raise KeyboardInterrupt(f"second {name}: aborting without a checkpoint")
            return
        self.signum = signum
        with contextlib.suppress(OSError):  # os.write is safe inside a signal handler; print is not
            os.write(sys.stderr.fileno(), f"\n{name} received: finishing this step, saving a checkpoint and "
                     "exiting (press Ctrl-C again to abort at once)\n".encode())


def _worker_ignores_stop_signals(_: int) -> None:
    """DataLoader workers leave SIGINT/SIGTERM to the main process, which shuts them down after saving."""
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, signal.SIG_IGN)


def _batches(loader: Any, dataset: SeededItems, first_micro_step: int = 0) -> Iterator[dict]:
    """Endless batches; epoch e is shuffled by (seed, e), so a resumed run sees the same order."""
    from accelerate import skip_first_batches

    n = len(loader)
    epoch, skip = divmod(first_micro_step, n)
    while True:
        loader.set_epoch(epoch)
        dataset.epoch = epoch
        yield from (skip_first_batches(loader, skip) if skip else loader)
        epoch, skip = epoch + 1, 0


@contextlib.contextmanager
def _unwrapped(backbone: Any) -> Iterator[Any]:
    """Use the bare denoiser (not the DDP wrapper) inside the block, e.g. to sample on one process."""
    from ..backbones.base import _unwrap

    wrapped = backbone.denoiser
    backbone.denoiser = _unwrap(wrapped)
    try:
        yield backbone
    finally:
        backbone.denoiser = wrapped


def _save_weights(backbone: Any, out_dir: Path, ema: Any = None) -> Path:
    """The trained weights in diffusers' formats: a LoRA folder, or the full denoiser (EMA if kept)."""
    from ..backbones.base import _unwrap
    from ..backbones.lora import has_adapter, save_lora

    model = _unwrap(backbone.denoiser)
    if has_adapter(model):
        return save_lora(backbone, out_dir / "lora")
    target = out_dir / backbone.denoiser_name
    if ema is not None:
        import copy

        m = copy.deepcopy(model)
        ema.copy_to([p for p in m.parameters() if p.requires_grad])
        m.save_pretrained(str(target))
    else:
        model.save_pretrained(str(target))
    return target


def _save_weights_from_state(backbone: Any, out_dir: Path, state: dict[str, torch.Tensor]) -> Path:
    """:func:`_save_weights` from a gathered full state dict (FSDP), in the same formats."""
    from safetensors.torch import save_file

    from ..backbones.base import _unwrap
    from ..backbones.lora import has_adapter

    model = _unwrap(backbone.denoiser)
    if has_adapter(model):
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        out = out_dir / "lora"
        out.mkdir(parents=True, exist_ok=True)
        meta = model.peft_config["default"].to_dict()
        meta = {k: (sorted(v) if isinstance(v, set) else v) for k, v in meta.items()}
        sd = convert_state_dict_to_diffusers(get_peft_model_state_dict(model, state_dict=state))
        sd = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in sd.items()}
        name = backbone.denoiser_name
        type(backbone.pipe).save_lora_weights(
            str(out), **{f"{name}_lora_layers": sd, f"{name}_lora_adapter_metadata": meta}, safe_serialization=True
        )
        return out
    target = out_dir / backbone.denoiser_name
    target.mkdir(parents=True, exist_ok=True)
    model.save_config(str(target))
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(target / "diffusion_pytorch_model.safetensors"))
    return target


def sample_grid(backbone: Any, cfg: RunConfig, path: Path, seed: int = 0) -> Path:
    """A grid of the config's sample prompts (two seeds each) at a fixed seed, written as PNG."""
    from ..sampling import generate
    from ..utils.images import save_grid

    t = cfg.train
    prompts = [p for p in t.sample_prompts for _ in range(2)]
    with _unwrapped(backbone):
        imgs = generate(backbone, prompts, steps=t.sample_steps, guidance_scale=t.sample_guidance, seed=seed)
    return save_grid(imgs, path, nrow=len(prompts) // 2 if len(prompts) > 2 else 2, upscale=4 if imgs.shape[-1] <= 64 else 1)
