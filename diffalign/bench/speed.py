"""Speed benchmark: steps/s, images/s, peak memory, model FLOPs and the share of the hardware's peak.

Each case runs in a fresh process (``spawn``), so its peak memory is its own, and the cases of a bench run
alternate (repeat r of every case before repeat r+1 of any), so background load hits them alike.

- **Training** cases time the same ``diffalign.training.train`` a user runs: the steps/s of each logged
  window after ``warmup`` steps, read from the run's ``metrics.jsonl``; the median window is reported.
- **Sampling** cases time ``sampling.sample_images`` with plain CFG or RL guidance (``rlg``).
- **FLOPs** of one training step (the objective's forward passes and the backward) are counted with
  ``torch.utils.flop_counter.FlopCounterMode`` on the same model and batch (matmuls, convolutions and
  attention; element-wise work is not counted, as in the usual MFU convention).
- **Peak**: on a GPU, ``GPU_PEAKS`` (the bf16 dense peak of the card, from its datasheet); on the CPU, the
  FLOP/s of a large fp32 matmul measured here (``matmul_peak``) with the same thread count, so the
  utilisation is against what this machine's BLAS can actually do.
- **Memory**: CUDA ``max_memory_allocated``; on the CPU the process's peak RSS (``ru_maxrss``) and the
  peak above the RSS after imports (most of a tiny model's peak is torch itself).
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing as mp
import os
import platform
import resource
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

GPU_PEAKS = {  # dense bf16 TFLOP/s, vendor datasheets (SXM parts)
    "H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12, "RTX 4090": 165e12,
}


@dataclasses.dataclass
class Case:
    """One measured configuration. ``kind``: "train" or "sample". ``switches``: config overrides
    (``{"model.channels_last": True}``) for training; for sampling ``guidance`` is "cfg" or "rlg"."""

    model: str = "tiny:sd15"
    kind: str = "train"
    objective: str = "dpo"
    batch_size: int = 8
    resolution: int | None = None
    steps: int = 30
    warmup: int = 5
    log_every: int = 5
    lora_rank: int = 4
    switches: dict[str, Any] = dataclasses.field(default_factory=dict)
    guidance: str = "cfg"
    sample_steps: int = 10
    threads: int = 1
    label: str = ""

    @property
    def name(self) -> str:
        if self.label:
            return self.label
        sw = ",".join(f"{k.split('.')[-1]}={v}" for k, v in self.switches.items())
        what = self.objective if self.kind == "train" else f"sample/{self.guidance}"
        return f"{self.model} {what} b{self.batch_size}" + (f" {self.resolution}px" if self.resolution else "") + (
            f" [{sw}]" if sw else "")


def matmul_peak(device: str = "cpu", dtype: torch.dtype = torch.float32, n: int | None = None,
                repeats: int = 7, cpu_time: bool = False) -> dict[str, float]:
    """FLOP/s of an ``n x n @ n x n`` matmul (2 n^3 FLOPs) on ``device``: median and range of ``repeats``
    timed runs after a warm-up, at the current torch thread count. ``cpu_time``: per second of this
    process's CPU time, not of the wall clock (on a shared CPU)."""
    n = n or (8192 if device.startswith("cuda") else 2048)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    a @ b
    sync()
    rates = []
    clock = time.process_time if cpu_time else time.perf_counter
    for _ in range(repeats):
        t = clock()
        a @ b
        sync()
        rates.append(2 * n**3 / (clock() - t))
    return {"flops_per_s": statistics.median(rates), "min": min(rates), "max": max(rates), "n": n,
            "dtype": str(dtype).removeprefix("torch."), "threads": torch.get_num_threads()}


def hardware_peak(device: str, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """The peak the utilisation is measured against: a GPU's datasheet bf16 peak, or this CPU's matmul."""
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name()
        for key, peak in GPU_PEAKS.items():
            if key in name:
                return {"flops_per_s": peak, "source": f"{name}: datasheet dense bf16 peak"}
        return {"flops_per_s": float("nan"), "source": f"{name}: no datasheet peak known"}
    m = matmul_peak(device, dtype)
    return {**m, "source": f"measured {m['n']}x{m['n']} {m['dtype']} matmul, {m['threads']} thread(s)"}


# --- one case, in its own process --------------------------------------------------------------------


def _rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def _config(case: Case, out: Path, data: Path) -> Any:
    from ..config import RunConfig

    raw: dict[str, Any] = {
        "model": {"path": case.model, "resolution": case.resolution, "lora_rank": case.lora_rank},
        "data": {"train": str(data), "prompt_dropout": 0.1},
        "objective": {"name": case.objective},
        "train": {"output_dir": str(out), "steps": case.steps + case.warmup, "batch_size": case.batch_size,
                  "lr": 1e-5, "log_every": case.log_every, "checkpoint_every": 0, "sample_every": 0,
                  "sample_prompts": ["a red circle"], "sample_steps": 1, "progress": False,
                  "checkpoint_checksums": False, "max_grad_norm": 1.0},
    }
    for key, value in case.switches.items():
        section, _, name = key.partition(".")
        if not name or section not in raw:
            raise ValueError(f"speed switch {key!r}: expected SECTION.KEY with SECTION one of {sorted(raw)}")
        raw[section][name] = value
    return RunConfig.model_validate(raw)


def flop_counter() -> Any:
    """``FlopCounterMode`` that also counts the CPU flash-attention kernel SDPA runs on the CPU
    (``aten._scaled_dot_product_flash_attention_for_cpu`` and its backward), which torch's own table leaves
    out: without it every attention FLOP of a CPU step went uncounted. Same formulas as the GPU kernels."""
    from torch.utils import flop_counter as fc

    aten = torch.ops.aten

    def fwd(q: Any, k: Any, v: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
        return fc.sdpa_flop_count(q, k, v)

    def bwd(g: Any, q: Any, k: Any, v: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
        return fc.sdpa_backward_flop_count(g, q, k, v)

    mapping = {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        mapping[aten._scaled_dot_product_flash_attention_for_cpu] = fwd
        mapping[aten._scaled_dot_product_flash_attention_for_cpu_backward] = bwd
    return fc.FlopCounterMode(display=False, custom_mapping=mapping)


def attention_flops(counter: Any) -> float:
    """The attention kernels' share of a ``flop_counter()``'s count."""
    return float(sum(n for op, n in counter.get_flop_counts().get("Global", {}).items() if "attention" in str(op)))


def count_step_flops(cfg: Any) -> float:
    """FLOPs of one training step of ``cfg`` (objective forward passes + backward), on one batch."""
    return count_flops(cfg)["step"]


def count_flops(cfg: Any) -> dict[str, float]:
    """FLOPs of one training step of ``cfg`` on one batch: ``step`` (the objective's forward passes and the
    backward), ``attention`` (the attention kernels' part of it) and ``inputs`` (encoding the batch: the VAE
    encode of pixels and the text encoders, which a latent cache removes)."""
    from ..objectives import build_objective
    from ..training.batches import model_inputs
    from ..training.setup import build_backbone, build_dataset

    bb = build_backbone(cfg, "cuda" if torch.cuda.is_available() else "cpu")
    obj = build_objective(cfg.objective.name, **cfg.objective.model_dump(exclude={"name"}))
    ds, collate, empty = build_dataset(cfg, bb, obj.data_kind)
    batch = collate([ds[i] for i in range(cfg.train.batch_size)])
    with flop_counter() as inputs_counter:
        inputs = model_inputs(batch, bb, 0.0, empty)
    with flop_counter() as counter:
        with torch.no_grad():
            obj.collect(inputs, bb)
        loss, _ = obj.loss(inputs, bb)
        loss.backward()
    return {"step": float(counter.get_total_flops()), "attention": attention_flops(counter),
            "inputs": float(inputs_counter.get_total_flops())}


def _train_case(case: Case, work: Path) -> dict[str, Any]:
    import diffusers  # noqa: F401  (imported before the baseline RSS, as train() would import it)

    from ..data.synthetic import write_rendered_pairs
    from ..training import train

    rss0 = _rss_mb()
    data = write_rendered_pairs(work / "pairs", n=max(64, 4 * case.batch_size), seed=0)
    if case.switches.get("data.cache_dir") == "auto":  # the latent + text-embedding cache, built untimed
        case = dataclasses.replace(case, switches={**case.switches, "data.cache_dir": str(work / "cache")})
        _build_cache(_config(case, work / "run", data), work / "cache")
    cfg = _config(case, work / "run", data)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    train(cfg)
    wall = time.perf_counter() - t
    rows = [json.loads(x) for x in (work / "run" / "metrics.jsonl").read_text().splitlines()]
    windows = [r["steps_per_s"] for r in rows if r["step"] > case.warmup]
    if not windows:
        raise RuntimeError(f"{case.name}: no timed window after {case.warmup} warm-up steps (steps {case.steps}, "
                           f"log_every {case.log_every})")
    res: dict[str, Any] = {"steps_per_s": statistics.median(windows), "windows": windows, "wall_s": wall,
                           "items_per_s": statistics.median(windows) * case.batch_size, "rss_after_import_mb": rss0}
    res["flops_per_step"] = count_step_flops(cfg)
    return res


def _build_cache(cfg: Any, out: Path) -> None:
    from ..data.cache import build_cache
    from ..data.pairs import PreferencePairs
    from ..training.setup import build_backbone

    bb = build_backbone(cfg.model_copy(update={"data": cfg.data.model_copy(update={"cache_dir": None})}))
    ds = PreferencePairs(cfg.data.train, resolution=bb.resolution, random_flip=False)
    build_cache(ds, bb, out, batch_size=8, progress=False, dtype="float32")


def _cache_child(case: Case, run: Path, data: Path, out: Path) -> None:
    _build_cache(_config(case, run, data), out)


def build_cache_isolated(case: Case, run: Path, data: Path, out: Path) -> None:
    """``_build_cache`` in a child process, so that its peak memory (the VAE, the text encoders) is not the
    caller's."""
    child = mp.get_context("spawn").Process(target=_cache_child, args=(case, run, data, out))
    child.start()
    child.join()
    if child.exitcode != 0:
        raise RuntimeError(f"{case.name}: building the latent cache failed (exit code {child.exitcode})")


SWITCHES: dict[str, dict[str, Any]] = {
    "cache": {"data.cache_dir": "auto"},
    "channels_last": {"model.channels_last": True},
    "compile": {"model.compile": True},
    "fused_adamw": {"train.adam_impl": "fused"},
    "foreach_adamw": {"train.adam_impl": "foreach"},
    "bf16": {"train.mixed_precision": "bf16"},
    "grad_ckpt": {"model.gradient_checkpointing": True},
    "sel_ckpt": {"model.gradient_checkpointing": "selective"},
}
"""The speed switches the bench can turn on one at a time (``--switch NAME``) or together
(``--switch cache+channels_last``)."""


def switch_set(spec: str) -> dict[str, Any]:
    """``"cache+fused_adamw"`` -> the merged config overrides; ``KEY=VALUE`` parts are taken as they are."""
    import yaml

    out: dict[str, Any] = {}
    for part in spec.split("+"):
        if "=" in part:
            key, _, value = part.partition("=")
            out[key] = yaml.safe_load(value)
        elif part in SWITCHES:
            out.update(SWITCHES[part])
        else:
            raise ValueError(f"speed switch {part!r}: one of {', '.join(SWITCHES)} or SECTION.KEY=VALUE")
    return out


def _sample_case(case: Case) -> dict[str, Any]:
    from ..backbones.lora import add_lora
    from ..sampling.guidance import GuidanceHooks
    from ..sampling.solvers import sample_images
    from ..training.setup import build_backbone

    cfg = _config(case, Path(tempfile.mkdtemp()), Path("unused"))
    cfg.model.lora = False
    bb = build_backbone(cfg, "cuda" if torch.cuda.is_available() else "cpu")
    rss0 = _rss_mb()
    hooks = None
    if case.guidance == "rlg":
        add_lora(bb, rank=case.lora_rank, init="gaussian")  # a tuned model for RLG to mix with its base
        hooks = GuidanceHooks({"rlg"}, rlg_scale=1.5)
    elif case.guidance != "cfg":
        raise ValueError(f"speed case guidance {case.guidance!r}: 'cfg' or 'rlg'")
    n = case.batch_size
    prompts = ["a red circle on the left"] * n

    def run() -> float:
        t = time.perf_counter()
        with torch.no_grad():
            sample_images(bb, prompts, list(range(n)), steps=case.sample_steps, guidance_scale=5.0, batch_size=n,
                          model_output=hooks)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter() - t

    for _ in range(max(1, case.warmup // 5)):
        run()
    times = [run() for _ in range(max(1, case.steps // 5))]
    sec = statistics.median(times)
    return {"images_per_s": n / sec, "seconds_per_batch": sec, "batches": times, "rss_after_import_mb": rss0}


def _run_case(case: Case) -> dict[str, Any]:
    torch.set_num_threads(case.threads)
    with tempfile.TemporaryDirectory(prefix="diffalign_speed_") as tmp:
        res = _train_case(case, Path(tmp)) if case.kind == "train" else _sample_case(case)
    res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    res["peak_above_import_mb"] = res["peak_rss_mb"] - res["rss_after_import_mb"]
    if torch.cuda.is_available():
        res["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return res


def _child(case_dict: dict[str, Any], queue: Any) -> None:
    try:
        queue.put({"ok": _run_case(Case(**case_dict))})
    except BaseException as e:  # report, do not hang the parent
        queue.put({"error": f"{type(e).__name__}: {e}"})


def run_isolated(case: Case, timeout: float | None = None) -> dict[str, Any]:
    """Run one case in a fresh process (spawn) and return its measurements."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    p = ctx.Process(target=_child, args=(dataclasses.asdict(case), queue))
    p.start()
    try:
        msg = queue.get(timeout=timeout)
    finally:
        p.join(timeout=30)
        if p.is_alive():
            p.kill()
    if "error" in msg:
        raise RuntimeError(f"speed case {case.name}: {msg['error']}")
    return msg["ok"]


# --- a bench run: cases x repeats, alternating ---------------------------------------------------------


def bench(cases: list[Case], repeats: int = 3, peak: dict[str, Any] | None = None,
          on_result: Callable[[Case, int, dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Every case ``repeats`` times, alternating; the median of each measure, its range, and for training
    cases the utilisation of ``peak`` (default: measured here, ``hardware_peak``)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if peak is None:
        threads = torch.get_num_threads()
        torch.set_num_threads(cases[0].threads if cases else 1)
        peak = hardware_peak(device)
        torch.set_num_threads(threads)
    runs: list[list[dict[str, Any]]] = [[] for _ in cases]
    for r in range(repeats):
        for i, case in enumerate(cases):
            res = run_isolated(case)
            runs[i].append(res)
            if on_result:
                on_result(case, r, res)
    rows = []
    for case, rs in zip(cases, runs, strict=True):
        row: dict[str, Any] = {"case": case.name, "config": dataclasses.asdict(case), "repeats": rs}
        for key in ("steps_per_s", "items_per_s", "images_per_s", "peak_rss_mb", "peak_above_import_mb",
                    "peak_cuda_mb"):
            vals = [x[key] for x in rs if key in x]
            if vals:
                row[key] = {"median": statistics.median(vals), "min": min(vals), "max": max(vals)}
        if "steps_per_s" in row:
            flops = rs[0]["flops_per_step"]
            row["flops_per_step"] = flops
            row["achieved_flops_per_s"] = flops * row["steps_per_s"]["median"]
            row["utilisation"] = row["achieved_flops_per_s"] / peak["flops_per_s"]
        rows.append(row)
    return {"machine": machine(), "peak": peak, "repeats": repeats, "rows": rows}


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {"platform": platform.platform(), "cpu": platform.processor() or platform.machine(),
                            "cores": os.cpu_count(), "torch": torch.__version__, "loadavg": list(os.getloadavg())}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def table(result: dict[str, Any]) -> str:
    """A markdown table of ``bench``'s result (medians, [min-max])."""
    p = result["peak"]
    lines = [f"peak: {p['flops_per_s'] / 1e9:.1f} GFLOP/s ({p['source']}); {result['repeats']} alternating repeats, "
             "median [min-max]", "",
             "| case | steps/s | items/s | GFLOP/step | utilisation | peak RSS MB (above import) |",
             "|---|---|---|---|---|---|"]

    def rng(d: dict[str, float] | None, f: str = ".2f") -> str:
        return "-" if d is None else f"{d['median']:{f}} [{d['min']:{f}}-{d['max']:{f}}]"

    for row in result["rows"]:
        items = row.get("items_per_s") or row.get("images_per_s")
        util = f"{row['utilisation']:.1%}" if "utilisation" in row else "-"
        gf = f"{row['flops_per_step'] / 1e9:.2f}" if "flops_per_step" in row else "-"
        mem = row.get("peak_cuda_mb") or row.get("peak_rss_mb")
        above = row.get("peak_above_import_mb")
        lines.append(f"| {row['case']} | {rng(row.get('steps_per_s'))} | {rng(items)} | {gf} | {util} | "
                     f"{rng(mem, '.0f')}" + (f" ({above['median']:.0f})" if above and "peak_cuda_mb" not in row else "")
                     + " |")
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path, x: str = "batch_size") -> Path:
    """Step time and peak memory against ``x`` (a Case field, e.g. batch_size or resolution), one line
    per (model, objective, switches) group."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[str, list[tuple[float, float, float]]] = {}
    for row in result["rows"]:
        if "steps_per_s" not in row:
            continue
        c = row["config"]
        key = f"{c['model']} {c['objective']}" + (f" {c['switches']}" if c["switches"] else "")
        mem = (row.get("peak_cuda_mb") or row["peak_rss_mb"])["median"]
        groups.setdefault(key, []).append((c[x] or 0, 1000 / row["steps_per_s"]["median"], mem))
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for key, pts in groups.items():
        pts.sort()
        a1.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=key)
        a2.plot([p[0] for p in pts], [p[2] for p in pts], marker="o", label=key)
    a1.set(xlabel=x, ylabel="ms per step")
    a2.set(xlabel=x, ylabel="peak memory MB")
    for a in (a1, a2):
        a.grid(alpha=0.3)
    a1.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# --- where the time goes: a profile of the training step ------------------------------------------------

OP_GROUPS = {  # aten op name fragments -> group (first match wins), for the profile's summary
    "attention": ("scaled_dot_product", "flash_attention", "_efficient_attention", "baddbmm", "bmm", "softmax"),
    "convolution": ("convolution", "conv2d", "mkldnn_conv", "slow_conv", "conv_depthwise"),
    "matmul (linear)": ("addmm", "aten::mm", "aten::matmul", "aten::linear"),
    "normalisation": ("group_norm", "layer_norm", "batch_norm"),
    "optimizer": ("_foreach", "adam", "lerp", "addcdiv", "addcmul"),
    "copies / layout": ("copy_", "contiguous", "clone", "to_copy", "cat", "permute", "transpose", "reshape", "view",
                        "empty", "zeros", "fill_", "as_strided", "expand", "unsqueeze", "stack", "slice", "select"),
    "element-wise": ("add", "mul", "sub", "div", "silu", "gelu", "sigmoid", "neg", "pow", "sqrt", "rsqrt", "exp",
                     "where", "threshold", "mean", "sum", "mse", "clamp", "norm", "sign", "abs", "tanh", "erf"),
}


def op_group(name: str) -> str:
    low = name.lower()
    for group, keys in OP_GROUPS.items():
        if any(k in low for k in keys):
            return group
    return "other"


def profile_step(cfg: Any, steps: int = 2, warmup: int = 1, top: int = 25, profile: bool = True) -> dict[str, Any]:
    """``torch.profiler`` over ``steps`` training steps of ``cfg`` (the objective's forwards, the backward and
    the optimizer step, as ``train`` takes them, after ``warmup`` steps): the top ops by self CPU time, the
    self time by op group (``OP_GROUPS``), the seconds per step (wall and this process's CPU time: on a shared
    machine the CPU time is what the step itself cost), the FLOPs per step (the objective's forwards and the
    backward, as ``count_step_flops``; the encoding of the inputs apart) and the process's peak RSS.
    ``profile=False``: the times only, without the profiler's overhead.

    The FLOPs are counted on this same backbone during the first warm-up step (one copy of the weights in
    memory, no extra step); a compiled denoiser, or no warm-up, counts them afterwards on a fresh eager build,
    once this one is freed."""
    import contextlib
    import gc

    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as profiler

    profile_ = profile
    from ..objectives import build_objective
    from ..training.batches import model_inputs
    from ..training.setup import build_backbone, build_dataset, build_optimizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    bb = build_backbone(cfg, device)
    obj = build_objective(cfg.objective.name, **cfg.objective.model_dump(exclude={"name"}))
    ds, collate, empty = build_dataset(cfg, bb, obj.data_kind)
    opt = build_optimizer(cfg, bb.trainable_parameters())
    batch = collate([ds[i] for i in range(cfg.train.batch_size)])
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.mixed_precision)

    input_cpu: list[float] = []  # CPU seconds of model_inputs (VAE encode, text encoders) in each step

    def step(count: dict[str, float] | None = None) -> None:
        counting = flop_counter if count is not None else contextlib.nullcontext
        c0 = time.process_time()
        with counting() as inputs_counter:
            inputs = model_inputs(batch, bb, cfg.data.prompt_dropout, empty)
        input_cpu.append(time.process_time() - c0)
        with counting() as step_counter:
            with torch.autocast(device, dtype=amp, enabled=amp is not None):
                with torch.no_grad():
                    obj.collect(inputs, bb)
                loss, _ = obj.loss(inputs, bb)
            loss.backward()
        if count is not None:
            count["step"] = float(step_counter.get_total_flops())
            count["inputs"] = float(inputs_counter.get_total_flops())
            count["attention"] = attention_flops(step_counter)
        torch.nn.utils.clip_grad_norm_(bb.trainable_parameters(), cfg.train.max_grad_norm or 1e9)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()

    count: dict[str, float] = {}
    w, wc = time.perf_counter(), time.process_time()  # the warm-up holds a compile's cost
    for i in range(warmup):
        step(count if i == 0 and not cfg.model.compile else None)
    warm = {"warmup_seconds": time.perf_counter() - w, "warmup_cpu_seconds": time.process_time() - wc}
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    t, c = time.perf_counter(), time.process_time()
    with profiler(activities=acts) if profile_ else contextlib.nullcontext() as prof:
        for _ in range(steps):
            step()
    sec, cpu = (time.perf_counter() - t) / steps, (time.process_time() - c) / steps
    cpu_inputs = sum(input_cpu[-steps:]) / steps
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    if not count:
        del bb, obj, opt, batch, ds
        gc.collect()
        count = {"step": count_step_flops(cfg.model_copy(
            update={"model": cfg.model.model_copy(update={"compile": False})}))}
    flops = count["step"]
    timing = {"seconds_per_step": sec, "cpu_seconds_per_step": cpu, "profiled_steps": steps, "flops_per_step": flops,
              "flops_per_cpu_s": flops / cpu, "threads": torch.get_num_threads(), "peak_rss_mb": peak_rss, **warm}
    if "attention" in count:
        timing["attention_flops_per_step"] = count["attention"]
    if "inputs" in count:  # the VAE encode and text encoders of the step's inputs, which the CPU time includes
        timing["input_encode_flops_per_step"] = count["inputs"]
        timing["flops_with_inputs_per_cpu_s"] = (flops + count["inputs"]) / cpu
    # the objective's part alone: its FLOPs over the CPU time outside model_inputs
    timing["input_cpu_seconds_per_step"] = cpu_inputs
    timing["flops_per_cpu_s_without_inputs"] = flops / (cpu - cpu_inputs)
    if not profile_:
        return timing
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    rows = sorted(({"op": e.key, "self_cpu_ms_per_step": e.self_cpu_time_total / 1e3 / steps,
                    "share": e.self_cpu_time_total / total, "calls_per_step": e.count / steps,
                    "group": op_group(e.key)} for e in events), key=lambda r: -r["share"])
    groups: dict[str, float] = {}
    for r in rows:
        groups[r["group"]] = groups.get(r["group"], 0.0) + r["share"]
    return {**timing, "top_ops": rows[:top], "groups": dict(sorted(groups.items(), key=lambda kv: -kv[1])),
            "ops_per_step": sum(e.count for e in events) / steps}


def profile_table(res: dict[str, Any], top: int = 15) -> str:
    lines = [f"{res['seconds_per_step']:.2f} s/step under the profiler ({res['cpu_seconds_per_step']:.2f} CPU-s), "
             f"{res['ops_per_step']:.0f} ops/step, {res['flops_per_step'] / 1e9:.1f} GFLOP/step", "", "| op group | share of self CPU time |", "|---|---|"]
    lines += [f"| {g} | {s:.1%} |" for g, s in res["groups"].items()]
    lines += ["", "| op | group | self CPU ms/step | share | calls/step |", "|---|---|---|---|---|"]
    lines += [f"| `{r['op']}` | {r['group']} | {r['self_cpu_ms_per_step']:.1f} | {r['share']:.1%} | "
              f"{r['calls_per_step']:.0f} |" for r in res["top_ops"][:top]]
    return "\n".join(lines) + "\n"
