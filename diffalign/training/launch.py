"""How a run is launched and stopped: the CPU multi-process check and the stop signals.

``accelerate launch --cpu --num_processes N`` starts ONE process (accelerate's simple launcher); the
``diffalign train`` command relaunches itself with torchrun instead, and ``train`` refuses to run
alone when N were asked for. SIGINT/SIGTERM ask the loop to save a checkpoint and return.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any


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


def check_launch() -> None:
    """Refuse to train alone when N processes were asked for (the ``diffalign train`` command
    relaunches itself with torchrun instead; a script calling ``train`` gets this error)."""
    n = cpu_processes_requested()
    if n:
        raise LaunchError(
            f"`accelerate launch --cpu --num_processes {n}` started a single process (accelerate runs several CPU "
            "processes only through mpirun). Use  accelerate launch --config_file configs/accelerate/cpu.yaml "
            f"--num_processes {n} SCRIPT  (torchrun + gloo), or the `diffalign train` command, which relaunches itself"
        )


class StopSignals:
    """SIGINT/SIGTERM set ``signum``; the loop saves a checkpoint at the next step boundary and returns.
    A second SIGINT (Ctrl-C twice) raises KeyboardInterrupt at once; repeated SIGTERMs (a launcher
    forwarding the terminal's SIGINT as SIGTERM) are absorbed. The previous handlers come back on exit."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
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


def worker_ignores_stop_signals(_: int) -> None:
    """DataLoader workers leave SIGINT/SIGTERM to the main process, which shuts them down after saving."""
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, signal.SIG_IGN)
