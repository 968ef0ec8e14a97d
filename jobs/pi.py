"""Monte Carlo estimate of pi: each task throws darts with its own random stream.

    mpiexec -n 4 python -m taskfarm run jobs/pi.py [--tasks 200] [--darts 1000000]

Independent, reproducible streams come from one seed through numpy's
SeedSequence, so the estimate is the same however many ranks run it.
"""

from __future__ import annotations

import argparse
import json
import math

import numpy as np

import taskfarm


def throw(entropy: int, spawn_key: tuple[int, ...], darts: int) -> int:
    """Darts out of ``darts`` that land inside the unit quarter circle."""
    rng = np.random.default_rng(np.random.SeedSequence(entropy, spawn_key=spawn_key))
    x = rng.random(darts)
    y = rng.random(darts)
    return int(np.count_nonzero(x * x + y * y <= 1.0))


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=200)
    parser.add_argument("--darts", type=int, default=500_000, help="darts per task")
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--json", metavar="PATH", help="write the estimate here")
    args = parser.parse_args(argv)
    streams = np.random.SeedSequence(args.seed).spawn(args.tasks)
    with taskfarm.FarmExecutor() as executor:
        hits = sum(
            executor.map(
                throw,
                [args.seed] * args.tasks,
                [s.spawn_key for s in streams],
                [args.darts] * args.tasks,
            )
        )
    darts = args.tasks * args.darts
    estimate = 4.0 * hits / darts
    error = abs(estimate - math.pi)
    print(f"pi ~ {estimate:.6f} (error {error:.1e}) from {darts:,} darts in {args.tasks} tasks")
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"estimate": estimate, "hits": hits, "darts": darts}, out)
    return estimate


if __name__ == "__main__":
    main()
