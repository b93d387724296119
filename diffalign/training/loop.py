"""The one training loop, for every objective; it reads top to bottom.

It owns accelerate (devices, mixed precision, gradient accumulation, multi-process), clipping, the
LR schedule with warm-up, optional EMA, checkpoints and ``--resume``, TensorBoard scalars and a
metrics.jsonl, the progress bar, and sample grids. An objective computes ``loss(batch, backbone)``
and may define the hooks of :class:`diffalign.objectives.Objective` (setup, collect, on_update,
state_dict/load_state_dict, data_kind, needs_reward).

Reliability (docs/RELIABILITY.md):
- exact resume: a checkpoint holds the optimizer, scheduler, RNG of every process, EMA and the
  objective's state; the data order is a function of (seed, epoch), so a resumed run takes the
  same steps as an uninterrupted one, bit for bit on CPU;
- SIGTERM / SIGINT: the step in flight finishes, a checkpoint is saved, ``train`` returns with
  ``status="interrupted"`` (a second Ctrl-C aborts at once);
- a non-finite loss or gradient skips the update (on every process alike) and is counted;
  ``train.max_nonfinite_steps`` in a row stop the run with :class:`NonFiniteError`;
- no host sync per step where it can be avoided (one process, a LoRA, no EMA/DeepSpeed/fp16 scaling,
  ``deferred_checks``): the skip is undone on the device (``guarded_step``) and counted at the next log
  step, checkpoint or end, where the metrics are read too;
- checkpoints are verified (SHA-256 manifest) on resume; a damaged one is set aside and the
  previous one used, with a warning naming both;
- multi-process: every collective decision (skip, stop, which checkpoint) is agreed by all
  processes; only the main process writes metrics, logs, weights and images, and it alone creates,
  completes and renames checkpoint folders (each process adds its own RNG/objective-state file).

The pieces live beside it: ``launch`` (CPU multi-process check, stop signals), ``resume`` (which
checkpoint, does it fit), ``state`` (what a checkpoint holds beside accelerate's state), ``metrics``
(agreed decisions, gradient norm, the logging window), ``export`` (weights, sample grids),
``batches`` (model inputs, seeded data order), ``setup`` (backbone, data, optimizer from the config).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..backbones.lora import has_adapter
from ..backbones.modules import unwrap
from ..config import RunConfig
from ..objectives import build_objective
from ..utils.memory import keep_freed_memory, lean_heap
from . import checkpoints as ckpt
from . import runfolder
from .batches import SeededItems, batch_seed, endless_batches, model_inputs
from .export import sample_grid, save_weights
from .gold import build_gold_monitor, gold_check
from .launch import LaunchError, StopSignals, check_launch, cpu_processes_requested, worker_ignores_stop_signals
from .metrics import MetricWindow, agreed_max, append_jsonl, grad_norm
from .resume import load_checkpoint, resolve_resume_mode, run_facts, truncate_metrics
from .setup import build_backbone, build_dataset, build_optimizer, build_reward
from .state import keep_trainable_only, load_trainable_only, save_extra_state

logger = logging.getLogger(__name__)

__all__ = ["LaunchError", "NonFiniteError", "cpu_processes_requested", "sample_grid", "train"]


class NonFiniteError(RuntimeError):
    """``train.max_nonfinite_steps`` consecutive steps had a non-finite loss or gradient."""


def train(cfg: RunConfig, resume: str | None = None, *, overwrite: bool = False,
          allow_config_change: bool = False) -> dict[str, Any]:
    """Run ``cfg`` to ``cfg.train.steps`` optimizer steps; returns the last metrics and output paths.

    ``resume``: ``None`` (a fresh run; an error if ``output_dir`` already holds checkpoints),
    ``"latest"`` (the newest loadable checkpoint; an error if there is none), ``"auto"`` (latest if
    any, else fresh) or a checkpoint folder. ``result["status"]`` is ``"completed"`` or
    ``"interrupted"`` (then ``result["signal"]`` names the signal and ``result["checkpoint"]`` the
    checkpoint it saved) or ``"early_stopped"`` (a gold reward fell, ``reward.early_stop_on_gold_drop``;
    ``result["early_stop"]`` says which). The run folder (runfolder.py): one run at a time; ``overwrite``
    replaces an earlier run's results; a finished run is returned as it is; ``allow_config_change`` lets a
    resume change keys beyond the bookkeeping ones.
    """
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration

    t = cfg.train
    out = Path(t.output_dir)
    if resume and (done := runfolder.finished_run(cfg, out)):
        return done
    check_launch()
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
    with runfolder.lock(out, enabled=accelerator.is_main_process), StopSignals() as stop:
        runfolder.prepare(out, resume, overwrite, accelerator.is_main_process)
        keep = cfg.train.cpu_keep_freed_memory and accelerator.device.type == "cpu"
        if keep and not keep_freed_memory(True):
            logger.warning("train.cpu_keep_freed_memory: no glibc here (mallopt), the setting does nothing")
        try:
            return _run(cfg, resolve_resume_mode(out, resume), accelerator, stop, allow_config_change)
        finally:
            if keep:
                keep_freed_memory(False)


def _run(cfg: RunConfig, resume: str | None, accelerator: Any, stop: StopSignals,
         allow_config_change: bool = False) -> dict[str, Any]:
    from accelerate.utils import set_seed
    from diffusers.optimization import get_scheduler

    t = cfg.train
    out = Path(t.output_dir)
    main = accelerator.is_main_process
    rank, nproc = accelerator.process_index, accelerator.num_processes
    set_seed(t.seed)
    if main:
        out.mkdir(parents=True, exist_ok=True)
        ckpt.clean_partial(out)
        runfolder.write_config(cfg, out, resuming=bool(resume), allow_config_change=allow_config_change)

    # --- model, objective, data, optimizer ----------------------------------------------------------
    backbone = build_backbone(cfg, accelerator.device)
    objective = build_objective(cfg.objective.name, **cfg.objective.model_dump(exclude={"name"}))
    reward = build_reward(cfg, accelerator.device) if objective.needs_reward else None
    objective.setup(backbone, reward=reward)
    dataset, collate, empty_cond = build_dataset(cfg, backbone, objective.data_kind)
    seeded = SeededItems(dataset, t.seed)
    if len(seeded) < t.batch_size * nproc:
        raise ValueError(f"data.train {cfg.data.train}: {len(seeded)} items, fewer than one batch of {t.batch_size}")
    loader = torch.utils.data.DataLoader(
        seeded, batch_size=t.batch_size, shuffle=True, collate_fn=collate, drop_last=True,
        num_workers=cfg.data.num_workers, generator=torch.Generator().manual_seed(t.seed),
        worker_init_fn=worker_ignores_stop_signals if cfg.data.num_workers else None,
    )
    params = backbone.trainable_parameters()
    optimizer = build_optimizer(cfg, params, nproc)
    lr_scheduler = get_scheduler(
        t.lr_scheduler if t.lr_scheduler != "constant" or t.warmup_steps == 0 else "constant_with_warmup",
        optimizer, num_warmup_steps=t.warmup_steps * nproc, num_training_steps=t.steps * nproc,
    )
    backbone.denoiser, optimizer, loader, lr_scheduler = accelerator.prepare(
        backbone.denoiser, optimizer, loader, lr_scheduler
    )
    fsdp = str(accelerator.distributed_type).endswith("FSDP")
    deepspeed = str(accelerator.distributed_type).endswith("DEEPSPEED")
    if fsdp and t.ema:
        raise ValueError("train.ema is not supported with FSDP (the EMA would follow one shard); use DDP or ZeRO-2")
    if fsdp and t.sample_every and main:
        logger.warning("FSDP: no sample grids are drawn during training (every process holds a shard); "
                       "sample from the final weights with `diffalign sample`")
    clip_params = list(backbone.denoiser.parameters()) if fsdp else params  # FSDP clips its own flat shards
    if has_adapter(unwrap(backbone.denoiser)):  # checkpoints hold the adapter, not the frozen base
        accelerator.register_save_state_pre_hook(keep_trainable_only)
        accelerator.register_load_state_pre_hook(load_trainable_only)
    ema = None
    if t.ema:
        from diffusers.training_utils import EMAModel

        ema = EMAModel(params, decay=t.ema_decay)
    # EMA and objective state: one file per process, read with torch.load(weights_only=True) (state.py)
    stateful = objective if objective.stateful else None
    facts = run_facts(cfg, nproc, len(seeded))

    # --- resume --------------------------------------------------------------------------------------
    step, resumed_from = 0, None
    if resume:
        resumed_from, step = load_checkpoint(accelerator, out, resume, facts, ema, stateful)
        accelerator.print(f"resumed from {resumed_from} at step {step}")
    if main:
        accelerator.init_trackers("diffalign", init_kwargs={"tensorboard": {"purge_step": step + 1}} if step else {})
        truncate_metrics(out / "metrics.jsonl", step)
    gold = build_gold_monitor(cfg, backbone, reward, step) if main else None  # held-out gold rewards (gold.py)
    saved = {"step": step, "path": resumed_from}  # the newest checkpoint of this run
    skipped_total = int(ckpt.read_meta(resumed_from).get("skipped_steps", 0)) if resumed_from else 0

    def export_weights(out_dir: Path) -> Path | None:
        """Called on every process (FSDP gathers the full weights, a collective); the main one writes."""
        state = accelerator.get_state_dict(backbone.denoiser) if fsdp else None
        return save_weights(backbone, out_dir, ema, state=state) if main else None

    def save(step: int) -> Path | None:
        """Every process writes its own state (RNG, objective) into one temporary folder; the main
        process adds the weights and the manifest and renames it into place."""
        if saved["step"] == step:
            return saved["path"]
        tmp, final = ckpt.checkpoint_dir(out, step).with_name(f".tmp_step_{step:08d}"), None
        if main:
            tmp, final = ckpt.begin_checkpoint(out, step)
        accelerator.wait_for_everyone()
        with ckpt.writing(tmp):  # a full disk or a read-only folder: one line naming the path
            accelerator.save_state(str(tmp / "state"))
            save_extra_state(tmp / "state", rank, ema if main else None, stateful)
            export_weights(tmp)
        accelerator.wait_for_everyone()  # every process's files are in before the manifest is taken
        if main:
            final = ckpt.finish_checkpoint(out, tmp, final, step, keep=t.keep_checkpoints,
                                           extra={**facts, "skipped_steps": skipped_total},
                                           checksums=t.checkpoint_checksums)
        accelerator.wait_for_everyone()
        saved.update(step=step, path=final or ckpt.checkpoint_dir(out, step))
        return final

    # --- train ---------------------------------------------------------------------------------------
    batches = endless_batches(loader, seeded, first_micro_step=step * t.grad_accum)
    bar = tqdm(total=t.steps, initial=step, desc="train", disable=not (t.progress and accelerator.is_local_main_process))
    window, last = MetricWindow(), {}
    t0, steps_timed = time.time(), 0
    in_a_row, last_good = 0, resumed_from
    status, stop_signal, gold_stop = "completed", None, None
    # no host sync per step (deferred_checks): the skip is decided on the device, and the skipped-step
    # bookkeeping below runs for the pending steps at the next log step, checkpoint or end
    on_device = deferred_checks(accelerator, objective, backbone, ema, nproc, deepspeed)
    pending: list[tuple[int, Any]] = []

    def account(at: int, was_skipped: bool) -> None:
        """Count step ``at``'s skip; ``train.max_nonfinite_steps`` skips in a row stop the run."""
        nonlocal skipped_total, in_a_row
        if not was_skipped:
            in_a_row = 0
            return
        skipped_total += 1
        in_a_row += 1
        if main:
            logger.warning("step %d: non-finite loss or gradient; update skipped (%d in a row, %d in all)",
                           at, in_a_row, skipped_total)
        if in_a_row >= t.max_nonfinite_steps:
            where = f"last good checkpoint: {last_good}" if last_good else "no checkpoint was saved yet"
            raise NonFiniteError(
                f"{in_a_row} steps in a row (up to step {at}) had a non-finite loss or gradient "
                f"(train.max_nonfinite_steps={t.max_nonfinite_steps}); stopping. {where}. "
                "Lower train.lr or check the data, then resume with --resume latest"
            )

    def flush() -> None:
        """Read the pending steps' skip flags (one host sync) and account for them in order."""
        if pending:
            flags = torch.stack([f.reshape(()) for _, f in pending]).tolist()
            steps = [s for s, _ in pending]
            pending.clear()
            for s, f in zip(steps, flags, strict=True):
                account(s, bool(f))

    try:
        while step < t.steps:
            gold_stop = gold_check(gold, cfg.reward.gold_every, step, backbone, accelerator)
            if gold_stop:
                status = "early_stopped"
                accelerator.print(gold_stop)
                break
            signum = agreed_max(accelerator, stop.signum or 0)
            if signum:
                status, stop_signal = "interrupted", signal.Signals(signum).name
                break
            skipped = bad_here = False
            bad_t = skipped_t = None
            for k in range(t.grad_accum):
                batch = next(batches)
                if t.rng == "per_batch":  # noise is a function of (seed, global micro-batch index)
                    torch.manual_seed(batch_seed(t.seed, (step * t.grad_accum + k) * nproc + rank))
                with accelerator.accumulate(backbone.denoiser):
                    inputs = model_inputs(batch, backbone, cfg.data.prompt_dropout, empty_cond)
                    with accelerator.autocast():
                        with torch.no_grad():
                            objective.collect(inputs, backbone)
                        loss, metrics = objective.loss(inputs, backbone)
                    if on_device:  # the finite check stays a tensor; the update is guarded on the device
                        finite_t = torch.isfinite(loss.detach()).all()
                        bad_t = ~finite_t if bad_t is None else bad_t | ~finite_t
                        accelerator.backward(loss)
                        if accelerator.sync_gradients:
                            skipped_t = _update_on_device(optimizer, lr_scheduler, clip_params, t.max_grad_norm,
                                                          bad_t, metrics, accelerator)
                            bad_t = None
                        window.add(metrics, finite_t)
                        continue
                    finite = bool(torch.isfinite(loss.detach()).all())
                    bad_here |= not finite
                    if deepspeed and agreed_max(accelerator, int(not finite)):
                        skipped, bad_here = True, False  # DeepSpeed updates inside backward: leave it out
                        continue
                    accelerator.backward(loss)  # always: with DDP every process must join the all-reduce
                    if accelerator.sync_gradients:
                        updated = _update(accelerator, optimizer, lr_scheduler, clip_params, t.max_grad_norm,
                                          bad_here, metrics)
                        skipped |= not updated
                        if updated:
                            objective.on_update(backbone)
                        bad_here = False
                if finite:
                    window.add(metrics)
            step += 1
            steps_timed += 1
            if on_device:
                pending.append((step, skipped_t if skipped_t is not None else torch.zeros((), dtype=torch.bool)))
            else:
                account(step, skipped)
                if not skipped and ema is not None:
                    ema.step(params)
            checkpointing = bool(t.checkpoint_every and step % t.checkpoint_every == 0 and step < t.steps)
            if step % t.log_every == 0 or step == t.steps or checkpointing:
                flush()
            if step % t.log_every == 0 or step == t.steps:
                last = window.means(accelerator)
                last["lr"] = lr_scheduler.get_last_lr()[0]
                last["steps_per_s"] = steps_timed / max(time.time() - t0, 1e-9)
                last["skipped_steps"] = skipped_total
                t0, steps_timed = time.time(), 0
                accelerator.log(last, step=step)
                if main:
                    append_jsonl(out / "metrics.jsonl", {"step": step, **last})
                if "loss" in last:  # the pair objectives' implicit accuracy, the online ones' rollout reward
                    shown = {"acc": last["implicit_acc"]} if "implicit_acc" in last else (
                        {"reward": last["reward_mean"]} if "reward_mean" in last else {})
                    bar.set_postfix(loss=f"{last['loss']:.4f}", **{k: f"{v:.3f}" for k, v in shown.items()})
            bar.update(1)
            if checkpointing:
                path = save(step)
                if in_a_row == 0:
                    last_good = path
            if t.sample_every and step % t.sample_every == 0 and step < t.steps and main and not fsdp:
                with lean_heap():  # the steps' freed heap back first, so the grid does not add to the peak
                    sample_grid(backbone, cfg, out / "samples" / f"step_{step:08d}.png")
        bar.close()
        flush()
        if status == "completed":  # the last gold point
            gold_check(gold, cfg.reward.gold_every, step, backbone, accelerator)
        final = save(step) if step > 0 else None
    finally:
        bar.close()
        if main:
            for tracker in accelerator.trackers:
                tracker.finish()

    # --- result --------------------------------------------------------------------------------------
    result: dict[str, Any] = {
        "step": step, "status": status, "metrics": last, "checkpoint": str(final) if final else None,
        "skipped_steps": skipped_total, "main_process": main, "data": _data_report(dataset),
    }
    if gold_stop:
        result["early_stop"] = gold_stop
    if status == "interrupted":
        result["signal"] = stop_signal
        if main:
            logger.warning("%s: stopped at step %d; %s", stop_signal, step,
                           f"checkpoint {final}" if final else "no step taken, nothing to save")
    else:
        with ckpt.writing(out / "final", "the final results to"):
            weights = export_weights(out / "final")
            if main:
                result["weights"] = str(weights)
                if not fsdp:
                    with lean_heap():  # the steps' freed heap back first, so the grid does not add to the peak
                        result["samples"] = str(sample_grid(backbone, cfg, out / "samples" / "final.png"))
                (out / "final" / "result.json").write_text(json.dumps(result, indent=2))
    accelerator.end_training()
    return result


def _update(accelerator: Any, optimizer: Any, lr_scheduler: Any, params: list[torch.nn.Parameter],
            max_norm: float | None, bad_loss: bool, metrics: dict[str, Any]) -> bool:
    """Clip and take the optimizer step, unless the loss or the gradient is non-finite on any process
    (then the gradient is dropped, on every process alike). Returns whether the update was taken."""
    norm = grad_norm(accelerator, params, max_norm)
    if norm is not None and math.isfinite(norm):
        metrics["grad_norm"] = norm
    # fp16: an overflowing gradient is the GradScaler's business (it skips and rescales)
    grad_bad = norm is not None and not math.isfinite(norm) and accelerator.scaler is None
    if agreed_max(accelerator, int(bad_loss or grad_bad)):
        optimizer.zero_grad(set_to_none=True)
        if accelerator.scaler is not None:  # forget this step's unscale_ record
            with contextlib.suppress(RuntimeError, AssertionError):
                accelerator.scaler.update(accelerator.scaler.get_scale())
        return False
    optimizer.step()
    lr_scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return True


def deferred_checks(accelerator: Any, objective: Any, backbone: Any, ema: Any, nproc: int, deepspeed: bool) -> bool:
    """Whether the step can run without a host sync: one process (several must agree on a skip, a
    collective), no DeepSpeed (it updates inside backward) nor fp16 loss scaling (the GradScaler decides),
    no EMA (it must not average a skipped step), a LoRA (its weights and optimizer state are small enough to
    keep a copy for the on-device skip) and an objective without an ``on_update`` hook (it runs on the host)."""
    from ..objectives import Objective

    hook = getattr(getattr(objective, "on_update", None), "__func__", None)
    return (nproc == 1 and not deepspeed and accelerator.scaler is None and ema is None
            and has_adapter(unwrap(backbone.denoiser)) and hook is Objective.on_update)


def _update_on_device(optimizer: Any, lr_scheduler: Any, params: list[torch.nn.Parameter], max_norm: float | None,
                      bad_loss: torch.Tensor, metrics: dict[str, Any], accelerator: Any) -> torch.Tensor:
    """Clip and step; where the loss or the gradient is non-finite the parameters and the optimizer state are
    put back as they were (``torch.where`` on the device, no host sync). Returns the skip flag (a tensor).
    Unlike the synced path the LR schedule advances on a skipped step too."""
    norm = grad_norm(accelerator, params, max_norm, as_tensor=True)
    bad = bad_loss
    if norm is not None:
        metrics["grad_norm"] = norm
        bad = bad | ~torch.isfinite(norm)
    guarded_step(optimizer, bad)
    lr_scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return bad


def guarded_step(optimizer: Any, bad: torch.Tensor) -> None:
    """``optimizer.step()``, undone where ``bad`` (a 0-dim bool tensor) is true: every parameter and every
    tensor of the optimizer state (a state created by this step is reset to zeros, as a fresh one is)."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    state = optimizer.state
    before = [p.detach().clone() for p in params]
    old_state = {i: {k: v.clone() for k, v in state[p].items() if torch.is_tensor(v)}
                 for i, p in enumerate(params) if p in state}
    optimizer.step()
    host_bad = None
    with torch.no_grad():
        for i, (p, old) in enumerate(zip(params, before, strict=True)):
            p.copy_(torch.where(bad, old, p))
            for k, v in state.get(p, {}).items():
                if not torch.is_tensor(v):
                    continue
                prev = old_state.get(i, {}).get(k)
                prev = torch.zeros_like(v) if prev is None else prev
                if v.device == bad.device:
                    v.copy_(torch.where(bad, prev, v))
                else:  # e.g. Adam's step counter on the CPU beside CUDA parameters: read the flag once
                    host_bad = bool(bad) if host_bad is None else host_bad
                    if host_bad:
                        v.copy_(prev)


def _data_report(dataset: Any) -> dict[str, Any]:
    counts = dict(getattr(dataset, "skip_counts", {}) or {})
    return {"items": len(dataset), "skipped_rows": sum(counts.values()), "skipped_by_reason": counts,
            "skipped_at_load": int(getattr(dataset, "load_skips", 0)),
            "warnings": dict(getattr(dataset, "warn_counts", {}) or {})}
