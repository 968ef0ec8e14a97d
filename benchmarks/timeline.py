"""Where a skewed burst's time over the bound goes, worker by worker.

    mpiexec -n 3 python benchmarks/timeline.py [--bursts 3] [--json out.json]
    mpiexec -n 3 python -m mpi4py.futures benchmarks/timeline.py --engine mpi4py
    python benchmarks/timeline.py --engine pool --workers 2

The skewed workload of ``run.py`` (the same seeded durations, one submit per
call, each returning a float as the benchmark's do), with each call noting
its start and end on the node's monotonic clock in its worker process,
collected after the burst: a worker's time-line, from the burst's first
submit to its last result, splits into its calls and the gaps between them.  The
workload's own figures (the cores' idle time from ``/proc/stat``, in 10 ms
ticks) say how much; this says where: before a worker's first call, in gaps
over `GAP_MIN` in the burst's first and last `EDGE` seconds and between
them, in the short gaps between calls, after its last call, and inside calls
beyond their own CPU time (another thread held the core).  Each figure is in
points of the ratio (a worker's seconds / the bound x 100), so that the
workers' sums, averaged, are the ratio's excess over 1 (while the bound is
the calls' sum over the workers, as here).  Beside it, every thread's CPU
and context switches (this node's processes, from ``/proc``) while the
user's thread submits and after: rank 0's main thread and its others (the
engine's), each worker's main thread beyond its calls' own CPU and its
others.  A diagnostic, not a race: it asserts nothing about speed.

The first burst of a process is the benchmark's (``run.py`` times one per
process); later ones start with the farm's timings warm.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import threading
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _bench
import _tasks
import run

#: a gap between two calls on a worker longer than this (seconds) is the
#: worker waiting (for tasks, for its core); shorter ones are its own round
GAP_MIN = 0.0002
#: a burst's edges (seconds): its start (the first dispatches) and its end (the tail)
EDGE = 0.03
#: the threads' rows (`thread_split`): rank 0's main thread (the user's, which
#: submits) and its others (the engine's), each worker's main thread (beyond
#: its calls) and its others
THREAD_ROWS = ("master_main", "master_others", "worker_main", "worker_others")
#: how long each stamp-taking task sleeps (seconds), so that a batch of them,
#: one per worker, lands one on each (as `_bench._worker_pids`' tasks do)
STAMP_PAUSE = 0.02
#: the parts of a worker's time-line, in the order the table shows them
PARTS = ("first_call", "gaps_start", "gaps_middle", "gaps_end", "after_last", "short_gaps", "inside_calls")


def worker_parts(calls: list[tuple[float, float, float]], t0: float, t1: float) -> dict[str, float]:
    """Seconds of one worker's time-line in each of `PARTS`; ``calls``: its
    (start, end, own duration) in time order, ``t0``/``t1``: the burst's ends."""
    parts = dict.fromkeys(PARTS, 0.0)
    parts["first_call"] = calls[0][0] - t0
    parts["after_last"] = t1 - calls[-1][1]
    for (_, end, _), (start, _, _) in itertools.pairwise(calls):
        gap = start - end
        if gap <= GAP_MIN:
            parts["short_gaps"] += max(0.0, gap)
        elif end - t0 < EDGE:
            parts["gaps_start"] += gap
        elif t1 - start < EDGE:
            parts["gaps_end"] += gap
        else:
            parts["gaps_middle"] += gap
    parts["inside_calls"] = sum(max(0.0, end - start - own) for start, end, own in calls)
    return parts


def thread_counters(pids: list[int]) -> dict[tuple[int, int], tuple[float, int, int]]:
    """Each thread of ``pids`` (this node's processes): its CPU (ms, from
    ``schedstat``) and its voluntary and involuntary context switches.

    ``schedstat`` counts a running thread's CPU only at its context switches
    and the scheduler's ticks: the calling thread, which has run since its
    last switch, reads its own clock instead (a 100-call burst's submits,
    under a tick, read 0 ms otherwise, and failed the tool's test once)."""
    out = {}
    own = (os.getpid(), threading.get_native_id())
    for pid in pids:
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue  # not on this node, or gone
        for tid in tids:
            try:
                with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                    cpu = int(f.read().split()[0]) / 1e6
                with open(f"/proc/{pid}/task/{tid}/status") as f:
                    fields = dict(line.split(":", 1) for line in f if "ctxt_switches" in line)
            except (OSError, ValueError, IndexError):
                continue  # the thread ended meanwhile
            switches = int(fields["voluntary_ctxt_switches"]), int(fields["nonvoluntary_ctxt_switches"])
            if (pid, int(tid)) == own:
                cpu = time.thread_time_ns() / 1e6
            out[(pid, int(tid))] = (cpu, *switches)
    return out


def thread_split(
    before: dict[tuple[int, int], tuple[float, int, int]],
    after: dict[tuple[int, int], tuple[float, int, int]],
    master: int,
    calls_cpu: dict[int, float],
) -> dict[str, list[float]]:
    """`THREAD_ROWS` between two `thread_counters`: [ms of CPU, voluntary,
    involuntary switches], workers' figures per worker (their mean), a
    worker's main thread without the CPU its calls spin by design."""
    rows = {name: [0.0, 0.0, 0.0] for name in THREAD_ROWS}
    for (pid, tid), (cpu, vol, inv) in after.items():
        if (pid, tid) not in before:
            continue
        cpu0, vol0, inv0 = before[(pid, tid)]
        name = ("master" if pid == master else "worker") + ("_main" if tid == pid else "_others")
        share = 1.0 if pid == master else 1.0 / max(1, len(calls_cpu))
        cpu = cpu - cpu0 - (1000 * calls_cpu.get(pid, 0.0) if name == "worker_main" else 0.0)
        for i, v in enumerate((cpu, vol - vol0, inv - inv0)):
            rows[name][i] += share * v
    return rows


def _overlap(start: float, end: float, lo: float, hi: float) -> float:
    """The share of [start, end] that lies in [lo, hi]."""
    if end <= start:
        return 1.0 if lo <= start < hi else 0.0
    return max(0.0, min(end, hi) - max(start, lo)) / (end - start)


def take_stamps(eng: _bench.Engine, calls: int) -> dict[int, list[tuple[float, float, float]]]:
    """Every worker's `_tasks.STAMPS`, by pid, until ``calls`` stamps are in:
    rounds of short sleeping tasks, one per worker at once (as
    `_bench._worker_pids` finds the workers), so that each lands on its own."""
    stamps: dict[int, list[tuple[float, float, float]]] = {}
    for _ in range(_bench.WORKER_PID_ROUNDS):
        if sum(len(v) for v in stamps.values()) >= calls:
            break
        futures = [eng.submit(_tasks.take_stamps, STAMP_PAUSE) for _ in range(eng.workers)]
        for pid, got in (eng.result(f) for f in futures):
            stamps.setdefault(pid, []).extend(got)
    return stamps


def warm(eng: _bench.Engine) -> list[int]:
    """As the benchmark's warm-up leaves its engine before the skewed burst
    (`_bench.warm_up`, then `_bench._worker_pids`): the stamped spin has run
    once (a farm has timed it, and sizes the first burst's bundles from
    that, as it does `spin`'s), and no stamp is left over.  Returns the
    workers' pids, found as the benchmark finds them."""
    _bench.warm_up(eng)
    eng.result(eng.submit(_tasks.spin_logged, 0.0))
    take_stamps(eng, 1)
    return _bench._worker_pids(eng)


def burst(eng: _bench.Engine, durations: list[float], workers: list[int]) -> dict[str, Any]:
    """One burst's ratio and each worker's `PARTS`, in points of the ratio;
    and the threads' CPU while the user's thread submits and after
    (``workers``: their pids, as far as known)."""
    bound = _bench.makespan_bound(durations, eng.workers)
    pids = [os.getpid(), *workers]
    start = thread_counters(pids)
    t0 = time.perf_counter()
    futures = [eng.submit(_tasks.spin_logged, d) for d in durations]
    t_sub = time.perf_counter()
    submitted = thread_counters(pids)
    _bench._drain(eng, futures)
    t1 = time.perf_counter()
    end = thread_counters(pids)
    # a worker that ran none of the burst's calls has no time-line
    per_worker = {pid: sorted(calls) for pid, calls in take_stamps(eng, len(durations)).items() if calls}
    stamped = sum(len(calls) for calls in per_worker.values())
    if stamped != len(durations):
        raise SystemExit(f"stamps of {stamped} calls came back, not {len(durations)}")
    out: list[dict[str, Any]] = []
    spun_while, spun_after = {}, {}
    for pid in sorted(per_worker):
        calls = per_worker[pid]
        parts = worker_parts(calls, t0, t1)
        out.append({"pid": pid, "calls": len(calls), **{k: 100 * v / bound for k, v in parts.items()}})
        # the calls' own CPU in each phase, split by the share of each call's
        # time-line that fell in it
        during = sum(own * _overlap(start_, end_, t0, t_sub) for start_, end_, own in calls)
        spun_while[pid], spun_after[pid] = during, sum(own for _, _, own in calls) - during
    threads = {
        "while_submitting": thread_split(start, submitted, os.getpid(), spun_while),
        "after": thread_split(submitted, end, os.getpid(), spun_after),
    }
    return {"ratio": (t1 - t0) / bound, "workers": out, "threads": threads}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engine", default="taskfarm", choices=["taskfarm", "mpi4py", "pool"])
    parser.add_argument("--workers", type=int, default=2, help="Pool size (MPI engines: ranks - 1)")
    parser.add_argument("--bursts", type=int, default=3)
    _, skewed, _ = run.WORKLOADS["skewed"]  # the benchmark's own workload
    parser.add_argument("--n", type=int, default=int(skewed["n"]), help="calls per burst")
    parser.add_argument("--json", help="write every burst's figures here")
    args = parser.parse_args()
    mean, long, long_seconds = float(skewed["mean"]), int(skewed["long"]), float(skewed["long_seconds"])
    durations = _bench.skewed_durations(args.n, mean, long, long_seconds, _bench.SKEWED_SEED)
    with _bench.engine(args.engine, args.workers) as eng:
        if eng is None:
            return  # a worker rank: it served inside the context
        workers = warm(eng)
        bursts = [burst(eng, durations, workers) for _ in range(args.bursts)]
    print(f"{args.engine}, {eng.workers} workers, {args.n} skewed calls per burst; points of the ratio per worker")
    print("| burst | ratio | worker | " + " | ".join(PARTS) + " |")
    print("|---" * (3 + len(PARTS)) + "|")
    for i, b in enumerate(bursts):
        for j, w in enumerate(b["workers"]):
            head = f"| {i} | {b['ratio']:.4f} |" if j == 0 else "| | |"
            print(f"{head} {j} | " + " | ".join(f"{w[k]:.2f}" for k in PARTS) + " |")
    print("\nCPU per burst, ms [voluntary / involuntary switches]; a worker's figures are the workers' mean,")
    print("its main thread's without its calls' own CPU; while the user's thread submits | after")
    print("| burst | " + " | ".join(THREAD_ROWS) + " |")
    print("|---" * (1 + len(THREAD_ROWS)) + "|")
    for i, b in enumerate(bursts):
        cells = []
        for name in THREAD_ROWS:
            a, z = b["threads"]["while_submitting"][name], b["threads"]["after"][name]
            cells.append(f"{a[0]:.1f} [{a[1]:.0f}/{a[2]:.0f}] \\| {z[0]:.1f} [{z[1]:.0f}/{z[2]:.0f}]")
        print(f"| {i} | " + " | ".join(cells) + " |")
    ratios = [b["ratio"] for b in bursts]
    print(f"median ratio {statistics.median(ratios):.4f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"engine": args.engine, "bursts": bursts, "gap_min": GAP_MIN, "edge": EDGE}, f, indent=1)


if __name__ == "__main__":
    main()
