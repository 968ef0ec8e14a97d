"""One measurement: one engine, one workload, one process tree.

Started by ``benchmarks/run.py``, never by hand (but it works by hand too)::

    mpiexec -n 5 python benchmarks/_bench.py --engine taskfarm --workload noop --params '{...}'
    mpiexec -n 5 python -m mpi4py.futures benchmarks/_bench.py --engine mpi4py ...
    python benchmarks/_bench.py --engine pool --workers 4 ...

Rank 0 (or the Pool's parent) warms the engine up (every worker has run a
task), times the workload with ``time.perf_counter`` and prints one line
``BENCH_RESULT {json}``.  Start-up and shut-down are not timed: they are the
launcher's business, not the farm's.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import os
import pickle
import random
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, NamedTuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _tasks

#: rounds of one short task per worker that `_worker_pids` tries to see every worker in
WORKER_PID_ROUNDS = 10
#: the echo's large array, and the unit its two baselines (fresh memory, plain MPI) move
BIG_ARRAY_BYTES = 16 << 20
#: the idle-latency pause before each round trip (seconds, uniform): long
#: enough for every rank to fall asleep, as in a farm between bursts
LATENCY_PAUSE = (0.02, 0.04)
#: the pauses are seeded: the farm and its pipe baseline wait alike
LATENCY_SEED = 7
#: the skewed workload's durations are seeded: every engine and the baseline spin the same
SKEWED_SEED = 2026
#: seconds the latency workload waits for its long task to start (every engine runs it at once)
HOLD_START_TIMEOUT = 60.0
#: how often rank 0 looks whether that task has started (seconds; not timed)
HOLD_LOOK = 0.001


# -- engines -----------------------------------------------------------------
class Engine:
    """The few calls a workload needs, the same on every engine."""

    name = "?"
    workers = 0

    def submit(self, fn: Callable[..., Any], *args: Any) -> Any:
        raise NotImplementedError

    def map(self, fn: Callable[..., Any], items: Iterable[Any], chunksize: int | None) -> Iterable[Any]:
        """``chunksize=None``: the engine's own default."""
        raise NotImplementedError

    def imap(self, fn: Callable[..., Any], items: Iterable[Any], chunksize: int) -> Iterable[Any]:
        """A map whose results come as an iterator, its input a generator: the
        engine's own way of mapping a long input (taskfarm: its default map)."""
        return self.map(fn, items, chunksize)

    @staticmethod
    def result(future: Any) -> Any:
        return future.result()

    def info(self) -> dict[str, Any]:
        return {}


class _Executor(Engine):
    def __init__(self, name: str, executor: Any, workers: int) -> None:
        self.name = name
        self.ex = executor
        self.workers = workers

    def submit(self, fn: Callable[..., Any], *args: Any) -> Any:
        return self.ex.submit(fn, *args)

    def map(self, fn: Callable[..., Any], items: Iterable[Any], chunksize: int | None) -> Iterable[Any]:
        if chunksize is None:
            return self.ex.map(fn, items)
        return self.ex.map(fn, items, chunksize=chunksize)

    def imap(self, fn: Callable[..., Any], items: Iterable[Any], chunksize: int) -> Iterable[Any]:
        # taskfarm chooses its chunks itself; mpi4py.futures' default (1) would
        # take minutes over a long input, so it gets its best hand-picked size
        return self.map(fn, items, None if self.name == "taskfarm" else chunksize)

    def info(self) -> dict[str, Any]:
        if self.name != "taskfarm":
            return {}
        stats = self.ex.statistics()
        return {
            "master_cpu_fraction": stats.master_cpu_fraction,
            "prefetch": stats.prefetch,
        }


class _PoolFuture:
    def __init__(self, res: Any) -> None:
        self._res = res

    def result(self) -> Any:
        return self._res.get()


class _Pool(Engine):
    name = "pool"

    def __init__(self, pool: Any, workers: int) -> None:
        self.pool = pool
        self.workers = workers

    def submit(self, fn: Callable[..., Any], *args: Any) -> Any:
        return _PoolFuture(self.pool.apply_async(fn, args))

    def map(self, fn: Callable[..., Any], items: Iterable[Any], chunksize: int | None) -> Iterable[Any]:
        # Pool.map's default (None) picks len/(4*workers) by itself
        return self.pool.map(fn, items, chunksize)

    def imap(self, fn: Callable[..., Any], items: Iterable[Any], chunksize: int) -> Iterable[Any]:
        return self.pool.imap(fn, items, chunksize)


def _mpi_library() -> str:
    from mpi4py import MPI

    return str(MPI.Get_library_version().strip().splitlines()[0])


@contextlib.contextmanager
def engine(name: str, workers: int) -> Iterator[Engine | None]:
    """The engine on rank 0 (None on worker ranks, which serve inside)."""
    if name == "taskfarm":
        import taskfarm

        with taskfarm.farm() as ex:
            if ex is None:
                yield None
                return
            yield _Executor("taskfarm", ex, ex.workers)
    elif name == "mpi4py":
        from mpi4py import MPI
        from mpi4py.futures import MPIPoolExecutor

        with MPIPoolExecutor() as ex:
            yield _Executor("mpi4py", ex, MPI.COMM_WORLD.Get_size() - 1)
    elif name == "pool":
        import multiprocessing

        with multiprocessing.get_context("fork").Pool(workers) as pool:
            yield _Pool(pool, workers)
    else:
        raise SystemExit(f"unknown engine {name!r}")


def warm_up(eng: Engine) -> None:
    """Every worker has started, joined and run something (functions cached)."""
    futures = [eng.submit(_tasks.sleep_cpu, 0.02) for _ in range(eng.workers)]
    for f in futures:
        eng.result(f)
    futures = [eng.submit(_tasks.noop, i) for i in range(20 * eng.workers)]
    for f in futures:
        eng.result(f)
    for f in [eng.submit(_tasks.spin, 0.0), eng.submit(_tasks.echo, b"")]:
        eng.result(f)


# -- workloads ---------------------------------------------------------------
def _timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _drain(eng: Engine, futures: list[Any]) -> None:
    for f in futures:
        eng.result(f)


def noop(eng: Engine, p: dict[str, Any]) -> dict[str, Any]:
    """Tasks per second: submit, map at the default chunk size, map per chunk size."""
    n = int(p["n"])
    out: dict[str, Any] = {}

    def by_submit() -> None:
        _drain(eng, [eng.submit(_tasks.noop, i) for i in range(n)])

    out["submit_tasks_per_s"] = n / _timed(by_submit)

    def by_map(chunksize: int | None) -> Callable[[], None]:
        def run() -> None:
            count = 0
            for _ in eng.map(_tasks.noop, range(n), chunksize):
                count += 1
            assert count == n, count

        return run

    out["map_default_tasks_per_s"] = n / _timed(by_map(None))
    for c in p["chunks"]:
        if eng.name == "mpi4py" and c == 1:
            out["map_c1_tasks_per_s"] = None  # its default is 1: measured above
            continue
        out[f"map_c{c}_tasks_per_s"] = n / _timed(by_map(int(c)))
    if eng.name == "mpi4py" and 1 in p["chunks"]:
        out["map_c1_tasks_per_s"] = out["map_default_tasks_per_s"]
    return out


def busy(eng: Engine, p: dict[str, Any]) -> dict[str, Any]:
    """Efficiency on equal CPU-bound tasks: ideal / measured makespan, with one
    submit per task and with map at the engine's default chunk size.  Also
    where the CPU outside the tasks goes with submit: the master process (all
    its threads) and the workers (their CPU minus the tasks'), per task."""
    n, d = int(p["n"]), float(p["seconds"])
    ideal = n * d / eng.workers
    cost = _timed_with_cpu(eng, lambda: _drain(eng, [eng.submit(_tasks.spin, d) for _ in range(n)]), n * d)
    mapped = _timed(lambda: list(eng.map(_tasks.spin, [d] * n, None)))
    elapsed = cost.elapsed
    out = {"efficiency": ideal / elapsed, "efficiency_map": ideal / mapped, "elapsed_s": elapsed, "ideal_s": ideal}
    if cost.master is not None and cost.workers is not None:
        out["master_cpu_us_per_task"] = 1e6 * cost.master / n
        out["worker_overhead_us_per_task"] = 1e6 * cost.workers / n
    return out


class _Cost(NamedTuple):
    """A timed run and the CPU around it: the master process's (all its
    threads), the workers' beyond their tasks' and the whole machine's idle
    time, in seconds (None where a figure could not be read)."""

    elapsed: float
    master: float | None
    workers: float | None
    idle: float | None


def _timed_with_cpu(eng: Engine, run: Callable[[], object], task_cpu: float) -> _Cost:
    """``run`` timed, with its `_Cost`; ``task_cpu``: the seconds of CPU its
    tasks burn by design (`_tasks.spin`), which the workers' figure leaves out."""
    me, workers = os.getpid(), _worker_pids(eng)
    before = {pid: _cpu_seconds(pid) for pid in [me, *workers]}
    idle0 = _machine_idle_seconds()
    elapsed = _timed(run)
    idle1 = _machine_idle_seconds()
    after = {pid: _cpu_seconds(pid) for pid in [me, *workers]}
    used = {pid: after[pid] - before[pid] for pid in before if before[pid] is not None and after[pid] is not None}  # type: ignore[operator]
    idle = None if idle0 is None or idle1 is None else idle1 - idle0
    if me in used and len(used) == len(workers) + 1 == eng.workers + 1:
        master = used.pop(me)
        return _Cost(elapsed, master, sum(used.values()) - task_cpu, idle)
    return _Cost(elapsed, None, None, idle)


def _worker_pids(eng: Engine) -> list[int]:
    """Every worker process's pid: a short sleeping task per worker at once
    lands one on each (a few rounds, in case one worker took two)."""
    pids: set[int] = set()
    for _ in range(WORKER_PID_ROUNDS):
        futures = [eng.submit(_tasks.sleep_cpu, 0.02) for _ in range(eng.workers)]
        pids.update(eng.result(f)[0] for f in futures)
        if len(pids) >= eng.workers:
            break
    return sorted(pids)


def skewed_durations(n: int, mean: float, long: int, long_seconds: float, seed: int) -> list[float]:
    """Seeded lognormal durations (sigma 1) of the given mean, plus ``long`` long
    tasks at seeded positions in the first 80% of the list."""
    import numpy as np

    rng = np.random.default_rng(seed)
    sigma = 1.0
    mu = float(np.log(mean) - sigma**2 / 2)
    durations = [float(x) for x in rng.lognormal(mu, sigma, size=n)]
    for pos in rng.choice(int(n * 0.8), size=long, replace=False):
        durations[int(pos)] = long_seconds
    return durations


def makespan_bound(durations: list[float], workers: int) -> float:
    """No schedule of ``durations`` on ``workers`` ends sooner: max(sum / workers, longest)."""
    return max(sum(durations) / workers, max(durations))


def skewed(eng: Engine, p: dict[str, Any]) -> dict[str, Any]:
    """Makespan of skewed durations against max(sum / workers, longest): one
    submit per task, then the same list through map at the engine's default
    chunk size (where chunks must not strand a long task behind short ones).
    For the submit run, where the time over the bound went: the master's CPU,
    the workers' CPU outside the tasks and the machine's idle CPU, each in
    points of the ratio (with a core per worker, they and the CPU of other
    processes add up to the ratio's excess over 1)."""
    durations = skewed_durations(int(p["n"]), float(p["mean"]), int(p["long"]), float(p["long_seconds"]), SKEWED_SEED)
    cost = _timed_with_cpu(eng, lambda: _drain(eng, [eng.submit(_tasks.spin, d) for d in durations]), sum(durations))
    mapped = _timed(lambda: list(eng.map(_tasks.spin, durations, None)))
    elapsed = cost.elapsed
    bound = makespan_bound(durations, eng.workers)
    out = {
        "makespan_over_bound": elapsed / bound,
        "makespan_over_bound_map": mapped / bound,
        "elapsed_s": elapsed,
        "bound_s": bound,
    }
    # where the submit run's time over the bound went, in points of the ratio:
    # with a core per worker and the machine saturated, makespan x cores is the
    # tasks' CPU plus the master's, the workers' own and the idle cores'
    capacity = eng.workers * bound
    if cost.master is not None and cost.workers is not None:
        out["skewed_master_cpu_points"] = 100 * cost.master / capacity
        out["skewed_worker_overhead_points"] = 100 * cost.workers / capacity
    if cost.idle is not None:
        out["skewed_idle_cpu_points"] = 100 * cost.idle / capacity
    return out


def _machine_idle_seconds() -> float | None:
    """Idle CPU time of the whole machine (all cores), from /proc/stat: idle
    and iowait, in clock ticks (10 ms here: coarse over a one-second run)."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
        return (int(fields[4]) + int(fields[5])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def echo(eng: Engine, p: dict[str, Any]) -> dict[str, Any]:
    """Bandwidth: arrays sent out and back, bytes both ways per second (GB/s)."""
    import numpy as np

    out: dict[str, Any] = {}
    for label, nbytes, count in (("1MB", 1 << 20, int(p["n_1mb"])), ("16MB", BIG_ARRAY_BYTES, int(p["n_16mb"]))):
        array = np.ones(nbytes // 8)
        eng.result(eng.submit(_tasks.echo, array))  # first of this size: warm
        results: list[Any] = []

        def run(array: Any = array, count: int = count, results: list[Any] = results) -> None:
            futures = [eng.submit(_tasks.echo, array) for _ in range(count)]
            results.extend(eng.result(f) for f in futures)

        elapsed = _timed(run)
        assert all(r.nbytes == nbytes for r in results)
        del results
        out[f"echo_{label}_GB_per_s"] = 2 * nbytes * count / elapsed / 1e9
    return out


def _cpu_seconds(pid: int) -> float | None:
    """A process's CPU time, all threads: ns precision from each thread's
    schedstat (the process's own schedstat is its main thread only), else
    clock ticks from /proc/<pid>/stat."""
    try:
        total = 0
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        return total / 1e9
    except (OSError, ValueError, IndexError):
        pass
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def idle(eng: Engine, p: dict[str, Any]) -> dict[str, Any]:
    """% of a core burnt by the machinery: (1) while every worker's task
    sleeps, master and workers; (2) on an idle farm (no task at all)."""
    seconds = float(p["seconds"])
    me = os.getpid()
    cpu0, t0 = _cpu_seconds(me), time.perf_counter()
    futures = [eng.submit(_tasks.sleep_cpu, seconds) for _ in range(eng.workers)]
    got = [eng.result(f) for f in futures]
    cpu1, t1 = _cpu_seconds(me), time.perf_counter()
    out: dict[str, Any] = {
        "master_cpu_pct_tasks_sleeping": 100 * (cpu1 - cpu0) / (t1 - t0) if cpu0 is not None and cpu1 else None,
        "worker_cpu_pct_tasks_sleeping": 100 * statistics.mean(frac for _, frac in got),
    }
    pids = sorted({pid for pid, _ in got})
    time.sleep(0.2)  # let backoffs reach their caps
    before = {pid: _cpu_seconds(pid) for pid in [me, *pids]}
    t0 = time.perf_counter()
    time.sleep(seconds)
    wall = time.perf_counter() - t0
    after = {pid: _cpu_seconds(pid) for pid in [me, *pids]}
    pct = {
        pid: 100 * (after[pid] - before[pid]) / wall  # type: ignore[operator]
        for pid in before
        if before[pid] is not None and after[pid] is not None
    }
    out["master_cpu_pct_idle_farm"] = pct.get(me)
    workers = [v for pid, v in pct.items() if pid != me]
    out["worker_cpu_pct_idle_farm"] = max(workers) if workers else None
    out["workers_seen"] = len(pids)
    return out


def _timed_after_pauses(samples: int, step: Callable[[], Any]) -> list[float]:
    """Seconds ``step`` takes, each time after a seeded `LATENCY_PAUSE`: the
    farm's idle round trip and its baselines wait alike."""
    rng = random.Random(LATENCY_SEED)
    times = []
    for _ in range(samples):
        time.sleep(rng.uniform(*LATENCY_PAUSE))
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return times


def _peak_rss_bytes() -> int:
    """This process's peak resident memory so far (Linux reports kilobytes)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def memory(eng: Engine, p: dict[str, Any]) -> dict[str, Any]:
    """The master's memory over a long map: its peak resident memory grows by
    how much while ``n`` no-op calls are mapped over a generator and their
    results dropped as they come (an engine that takes its whole input, or
    keeps every result, grows with ``n``)."""
    n = int(p["n"])
    before = _peak_rss_bytes()
    count = 0
    for _ in eng.imap(_tasks.noop, (i for i in range(n)), int(p["chunksize"])):
        count += 1
    assert count == n, (count, n)
    grown = max(0, _peak_rss_bytes() - before)
    return {"memory_peak_growth_MB": grown / 1e6, "memory_bytes_per_item": grown / n}


def latency(eng: Engine, p: dict[str, Any]) -> dict[str, Any]:
    """One task's round trip: on an idle farm (after a random pause), back to
    back, and after a pause while another worker runs a long task (the farm
    is not idle then: its other ranks are)."""
    samples = int(p["samples"])

    def round_trip() -> None:
        eng.result(eng.submit(_tasks.noop, 0))

    idle_samples = _timed_after_pauses(samples, round_trip)
    hot = []
    for _ in range(samples * 5):
        t0 = time.perf_counter()
        round_trip()
        hot.append(time.perf_counter() - t0)
    beside = _beside_a_long_task(eng, samples, round_trip)
    idle_samples.sort()
    return {
        "latency_idle_ms": 1e3 * statistics.median(idle_samples),
        "latency_idle_p90_ms": 1e3 * idle_samples[int(0.9 * (len(idle_samples) - 1))],
        "latency_hot_ms": 1e3 * statistics.median(hot),
        "latency_beside_busy_ms": 1e3 * statistics.median(beside),
    }


def _beside_a_long_task(eng: Engine, samples: int, round_trip: Callable[[], None]) -> list[float]:
    """``round_trip`` timed after pauses (as on the idle farm) while one worker
    runs a task that waits for a file: it has started before the first, and
    ends after the last."""
    with tempfile.TemporaryDirectory() as scratch:
        started, gate = os.path.join(scratch, "started"), os.path.join(scratch, "gate")
        long = eng.submit(_tasks.hold, started, gate)
        deadline = time.monotonic() + HOLD_START_TIMEOUT
        while not os.path.exists(started):
            if time.monotonic() > deadline:
                raise TimeoutError("the long task did not start")
            time.sleep(HOLD_LOOK)
        try:
            return _timed_after_pauses(samples, round_trip)
        finally:
            open(gate, "w").close()
            eng.result(long)


WORKLOADS: dict[str, Callable[[Engine, dict[str, Any]], dict[str, Any]]] = {
    "noop": noop,
    "busy": busy,
    "skewed": skewed,
    "echo": echo,
    "idle": idle,
    "memory": memory,
    "latency": latency,
}


def fill_fresh_memory(arrays: int) -> float:
    """GB/s at which a new process fills ``arrays`` 16 MB arrays it keeps: the
    first touch of memory, which a 16 MB echo batch pays for its results and
    no engine can beat (``run.py`` runs it before each echo measurement, and
    the memory it frees on exit is warm for the engine that follows)."""
    import numpy as np

    source = np.ones(BIG_ARRAY_BYTES // 8)
    kept = []
    t0 = time.perf_counter()
    for _ in range(arrays):
        fresh = np.empty_like(source)
        fresh[:] = source
        kept.append(fresh)
    return source.nbytes * arrays / (time.perf_counter() - t0) / 1e9


def mpi_ping_pong(count: int) -> float | None:
    """GB/s of ``count`` 16 MB round trips between ranks 0 and 1 by plain
    ``Send``/``Recv``, each landing in a new buffer, as a farm's messages do:
    what this MPI moves at this moment with no farm at all (``run.py`` runs
    it on 2 ranks before each echo measurement).  Rank 0 returns the rate,
    the other rank None."""
    import numpy as np
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    source = np.ones(BIG_ARRAY_BYTES // 8)

    def round_trip() -> None:
        into = np.empty_like(source)
        if comm.Get_rank() == 0:
            comm.Send(source, dest=1)
            comm.Recv(into, source=1)
        else:
            comm.Recv(into, source=0)
            comm.Send(into, dest=0)

    round_trip()  # the first of this size: warm, as the echo's
    comm.Barrier()
    t0 = time.perf_counter()
    for _ in range(count):
        round_trip()
    elapsed = time.perf_counter() - t0
    return 2 * source.nbytes * count / elapsed / 1e9 if comm.Get_rank() == 0 else None


def spun_alone(n: int, mean: float, long: int, long_seconds: float, workers: int) -> float:
    """Makespan / bound of the skewed workload's durations (`skewed`) spun by
    ``workers`` forked processes that share nothing: each takes its part of a
    split made before the start (longest first, each to the least loaded), so
    the parts end within a few microseconds of each other on paper.  No farm,
    no messages, no scheduling: what this machine itself adds to the bound
    (clock ticks, the hypervisor, other guests), the floor under every
    engine's ratio (``run.py`` runs it before each skewed measurement)."""
    durations = skewed_durations(n, mean, long, long_seconds, SKEWED_SEED)
    bound = makespan_bound(durations, workers)
    parts: list[list[float]] = [[] for _ in range(workers)]
    loads = [0.0] * workers
    for seconds in sorted(durations, reverse=True):
        least = loads.index(min(loads))
        parts[least].append(seconds)
        loads[least] += seconds
    go_read, go_write = os.pipe()
    done_read, done_write = os.pipe()
    pids = []
    for part in parts:
        pid = os.fork()
        if pid == 0:  # a child: say it is ready, wait for the start, spin its part, say so
            try:
                os.close(go_write)
                os.write(done_write, b"r")
                os.read(go_read, 1)
                for seconds in part:
                    _tasks.spin(seconds)
                os.write(done_write, b"!")
            finally:
                os._exit(0)  # never back into the caller's code (nor its stdout)
        pids.append(pid)
    os.close(go_read)
    os.close(done_write)
    for _ in parts:
        os.read(done_read, 1)  # every child forked and at its start line
    t0 = time.perf_counter()
    os.write(go_write, b"!" * workers)  # one byte each: they all start at once
    for _ in parts:
        os.read(done_read, 1)
    elapsed = time.perf_counter() - t0
    os.close(go_write)
    os.close(done_read)
    for pid in pids:
        os.waitpid(pid, 0)
    return elapsed / bound


def pipe_round_trip(samples: int) -> float:
    """Median ms of one byte there and back between this process and a forked
    child over two pipes, after the latency workload's random 20-40 ms pause:
    the simplest round trip between two processes that sleep in between,
    with no MPI and no farm (``run.py`` runs it before each latency
    measurement).  On a VM each side wakes on a vCPU that went idle and runs
    its first microseconds cold; the farm's own round trip has six such
    wake-ups, this one two."""
    to_child, from_parent = os.pipe()
    from_child, to_parent = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: echo every byte until the parent closes its end
        try:
            os.close(from_parent)  # else its own copy would keep the pipe open: no EOF
            os.close(from_child)
            while byte := os.read(to_child, 1):
                os.write(to_parent, byte)
        finally:
            os._exit(0)  # never back into the caller's code (nor its stdout)
    os.close(to_child)
    os.close(to_parent)

    def round_trip() -> None:
        os.write(from_parent, b"!")
        os.read(from_child, 1)

    try:
        round_trip()  # the first: the child is up and running
        times = _timed_after_pauses(samples, round_trip)
    finally:
        os.close(from_parent)
        os.close(from_child)
        os.waitpid(pid, 0)
    return 1e3 * statistics.median(times)


def _a_few_microseconds() -> None:
    """What a farm's thread does at each step, in small: a future, a pickled
    call, a lock (~3 us back to back here)."""
    concurrent.futures.Future()
    pickle.dumps(((0,), {}), 5)
    with threading.Lock():
        pass


def cold_python(samples: int) -> float:
    """Median microseconds of `_a_few_microseconds` run right after the
    latency workload's pause, in a process doing nothing else: what this
    machine charges a thread that wakes up for its first bit of Python (on a
    VM, caches and TLB refilled after the vCPU sat idle).  Every step of the
    farm's idle round trip starts this way."""
    _a_few_microseconds()
    return 1e6 * statistics.median(_timed_after_pauses(samples, _a_few_microseconds))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--engine", required=True, choices=["taskfarm", "mpi4py", "pool"])
    parser.add_argument("--workload", required=True, choices=sorted(WORKLOADS))
    parser.add_argument("--workers", type=int, default=4, help="Pool size (MPI engines: ranks - 1)")
    parser.add_argument("--params", default="{}", help="JSON parameters of the workload")
    args = parser.parse_args()
    params = json.loads(args.params)
    with engine(args.engine, args.workers) as eng:
        if eng is None:
            return  # a worker rank: it served inside the context
        warm_up(eng)
        result = WORKLOADS[args.workload](eng, params)
        result["_workers"] = eng.workers
        result["_cpus"] = len(os.sched_getaffinity(0))  # 1 where the launcher bound rank 0 to a core
        result["_info"] = eng.info()
        if args.engine != "pool":
            result["_mpi"] = _mpi_library()
        print("BENCH_RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
