"""The task functions every engine runs (an importable module, so every engine
ships them by reference: taskfarm, mpi4py.futures and multiprocessing alike)."""

from __future__ import annotations

import os
import time
from typing import Any

# imported here, so that every worker has numpy loaded once it has run its
# first task (the warm-up's): otherwise the first array a worker unpickles pays
# for importing numpy (~100-140 ms here), inside the timed echo batch
import numpy  # noqa: F401


def noop(x: Any = None) -> Any:
    return x


def spin(seconds: float) -> float:
    """Burn ``seconds`` of this thread's CPU (not wall time: CPU lost to other
    threads or ranks shows up as lost efficiency, as it should)."""
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass
    return seconds


#: this process's calls of `spin_logged` since `take_stamps`: (start, end, seconds)
STAMPS: list[tuple[float, float, float]] = []


def spin_logged(seconds: float) -> float:
    """`spin`, noting its start and end on the node's monotonic clock in this
    process (``benchmarks/timeline.py`` takes them afterwards with
    `take_stamps`).  It returns what `spin` returns, a float, which a bundled
    call sends as it is; a tuple of stamps would be pickled call by call, a
    cost the benchmark's calls do not have."""
    start = time.perf_counter()
    spin(seconds)
    STAMPS.append((start, time.perf_counter(), seconds))
    return seconds


def take_stamps(pause: float) -> tuple[int, list[tuple[float, float, float]]]:
    """After a short sleep (so that a batch of these lands one on each
    worker), this process's pid and its `STAMPS`, which it forgets."""
    time.sleep(pause)
    stamps = STAMPS[:]
    del STAMPS[: len(stamps)]
    return os.getpid(), stamps


def echo(x: Any) -> Any:
    return x


def sleep_cpu(seconds: float) -> tuple[int, float]:
    """Sleep; return this process's pid and the CPU it used meanwhile (all its
    threads: whatever the engine's machinery burns while a task waits)."""
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    time.sleep(seconds)
    return os.getpid(), (time.process_time() - cpu0) / (time.perf_counter() - t0)


def getpid(_: Any = None) -> int:
    return os.getpid()


#: how often `hold` looks for its gate (seconds): ~0.1% of a core, not a spin
HOLD_POLL = 0.005


def hold(started: str, gate: str) -> None:
    """A long task: say it has started, then wait until ``gate`` exists."""
    open(started, "w").close()
    while not os.path.exists(gate):
        time.sleep(HOLD_POLL)
