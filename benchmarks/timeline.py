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
the calls' sum over the workers, as here).  A diagnostic, not a race: it
asserts nothing about speed.

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


def warm(eng: _bench.Engine) -> None:
    """As the benchmark's warm-up leaves its engine before the skewed burst
    (`_bench.warm_up`, then `_bench._worker_pids`): the stamped spin has run
    once (a farm has timed it, and sizes the first burst's bundles from
    that, as it does `spin`'s), and no stamp is left over."""
    _bench.warm_up(eng)
    eng.result(eng.submit(_tasks.spin_logged, 0.0))
    take_stamps(eng, 1)


def burst(eng: _bench.Engine, durations: list[float]) -> dict[str, Any]:
    """One burst's ratio and each worker's `PARTS`, in points of the ratio."""
    bound = _bench.makespan_bound(durations, eng.workers)
    t0 = time.perf_counter()
    _bench._drain(eng, [eng.submit(_tasks.spin_logged, d) for d in durations])
    t1 = time.perf_counter()
    per_worker = take_stamps(eng, len(durations))
    if sum(len(v) for v in per_worker.values()) != len(durations):
        raise SystemExit(f"stamps of {sum(len(v) for v in per_worker.values())} calls came back, not {len(durations)}")
    workers = []
    for pid in sorted(per_worker):
        calls = sorted(per_worker[pid])
        if not calls:
            continue  # a worker that ran none of the burst's calls
        parts = worker_parts(calls, t0, t1)
        workers.append({"pid": pid, "calls": len(calls), **{k: 100 * v / bound for k, v in parts.items()}})
    return {"ratio": (t1 - t0) / bound, "workers": workers}


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
        warm(eng)
        bursts = [burst(eng, durations) for _ in range(args.bursts)]
    print(f"{args.engine}, {eng.workers} workers, {args.n} skewed calls per burst; points of the ratio per worker")
    print("| burst | ratio | worker | " + " | ".join(PARTS) + " |")
    print("|---" * (3 + len(PARTS)) + "|")
    for i, b in enumerate(bursts):
        for j, w in enumerate(b["workers"]):
            head = f"| {i} | {b['ratio']:.4f} |" if j == 0 else "| | |"
            print(f"{head} {j} | " + " | ".join(f"{w[k]:.2f}" for k in PARTS) + " |")
    ratios = [b["ratio"] for b in bursts]
    print(f"median ratio {statistics.median(ratios):.4f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"engine": args.engine, "bursts": bursts, "gap_min": GAP_MIN, "edge": EDGE}, f, indent=1)


if __name__ == "__main__":
    main()
