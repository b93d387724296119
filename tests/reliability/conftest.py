"""Helpers for the reliability tests: a tiny pair data set and config, the CLI in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import write_experts, write_pairs  # noqa: F401  (used here and by the tests)

REPO = Path(__file__).resolve().parents[2]


OBJECTIVE_SECTIONS = {
    "dpo": "objective: {name: dpo, beta: 5000}",
    "dro": "objective: {name: dro, margin: 0.001, rollout_steps: 2, buffer_size: 3, refresh_every: 3}",
}


def write_config(root: Path, objective: str = "dpo", steps: int = 4, **train: object) -> Path:
    data = write_experts(root) if objective == "dro" else write_pairs(root)
    opts = {"output_dir": str(root / "run"), "steps": steps, "batch_size": 2, "lr": 1.0e-3, "lr_scheduler": "constant",
            "checkpoint_every": 2, "sample_every": 0, "sample_steps": 2, "log_every": 1, "progress": False}
    opts.update(train)
    cfg = root / f"{objective}.yaml"
    cfg.write_text(
        f'model: {{path: "tiny:sd15", lora_rank: 4, resolution: 32}}\n'
        f"data: {{train: {data}, prompt_dropout: 0.5}}\n"
        f"{OBJECTIVE_SECTIONS[objective]}\n"
        f"train: {json.dumps(opts)}\n"
    )
    return cfg


def cli_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    env.pop("DIFFALIGN_FAULTS", None)
    env.update(extra)
    return env


def run_cli(args: list[str], timeout: float = 180, faults: list[dict] | None = None,
            module: str = "diffalign.cli") -> subprocess.CompletedProcess:
    """``python -m diffalign.cli ARGS`` (or the fault-injecting wrapper) in a subprocess."""
    env = cli_env(DIFFALIGN_FAULTS=json.dumps(faults)) if faults else cli_env()
    if faults:
        module = "tests.faults"
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def accelerate_bin() -> str:
    return str(Path(sys.executable).with_name("accelerate"))


def wait_for(cond, timeout: float, proc: subprocess.Popen | None = None, what: str = "") -> None:
    end = time.time() + timeout
    while time.time() < end:
        if cond():
            return
        if proc is not None and proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ""
            raise AssertionError(f"process ended (rc {proc.returncode}) before {what}:\n{out[-3000:]}")
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def lora(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "final" / "lora" / "pytorch_lora_weights.safetensors"))


def metrics(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert any(v.abs().max() > 0 for k, v in a.items() if "lora.up" in k)  # it trained


@pytest.fixture
def h():
    import types

    return types.SimpleNamespace(
        write_pairs=write_pairs, write_experts=write_experts, write_config=write_config, run_cli=run_cli,
        cli_env=cli_env, accelerate_bin=accelerate_bin, wait_for=wait_for, lora=lora, metrics=metrics,
        assert_same_weights=assert_same_weights, REPO=REPO,
    )
