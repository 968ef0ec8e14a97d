"""Tasks of skewed durations: shows dynamic load balancing.

    mpiexec -n 4 python -m taskfarm run jobs/skewed.py [--tasks 300] [--seed 7]

Durations are lognormal with a few long ones.  A static split would leave
ranks idle while one finishes its long tasks; the farm hands out work as
ranks free up, so the makespan stays near its lower bound
max(total work / workers, longest task).  The summary's per-rank counts show
the balance: ranks that drew long tasks ran fewer of them.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

import taskfarm


def work(seconds: float) -> float:
    """Stand-in for a computation of ``seconds`` (sleeps, so it fits any core count)."""
    time.sleep(seconds)
    return seconds


def durations(n: int, seed: int, scale: float) -> list[float]:
    rng = np.random.default_rng(seed)
    d = rng.lognormal(mean=0.0, sigma=1.0, size=n) * scale
    long_ones = rng.choice(n, size=max(1, n // 100), replace=False)
    d[long_ones] *= 20  # a few stragglers
    return [float(x) for x in d]


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=300)
    parser.add_argument("--scale", type=float, default=0.005, help="median task seconds")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--json", metavar="PATH", help="write makespan and bound here")
    args = parser.parse_args(argv)
    d = durations(args.tasks, args.seed, args.scale)
    with taskfarm.FarmExecutor() as executor:
        workers = executor.workers
        start = time.perf_counter()
        total = sum(executor.map(work, d))
        makespan = time.perf_counter() - start
    bound = max(sum(d) / workers, max(d))
    print(
        f"{args.tasks} tasks, {total:.2f} s of work on {workers} workers: makespan {makespan:.2f} s, "
        f"lower bound {bound:.2f} s ({bound / makespan:.0%} of ideal)"
    )
    report = {"makespan": makespan, "bound": bound, "work": total, "workers": workers}
    if args.json:
        with open(args.json, "w") as out:
            json.dump(report, out)
    return report


if __name__ == "__main__":
    main()
