"""Parameter sweep: the Lyapunov exponent of the logistic map over its parameter r.

    mpiexec -n 4 python -m taskfarm run jobs/sweep.py [--out runs/sweep.csv] [--points 61]

One task per value of r iterates many trajectories of x -> r x (1 - x) at
once with numpy and averages log|r (1 - 2x)|.  Rank 0 gathers the results as
they come and writes ONE file, a CSV with a row per r in sweep order, written
to a temporary name and renamed so that a reader never sees half of it.  Known
values to check against: ln 0.5 at r = 2.5 (stable fixed point),
0.5 ln 0.16 at r = 3.2 (period 2), ln 2 at r = 4 (chaos).
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np

import taskfarm


def lyapunov(r: float, seed: int, trajectories: int, steps: int, transient: int) -> tuple[float, float]:
    """Mean and standard error of the Lyapunov exponent at ``r`` over ``trajectories`` starts."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(0.01, 0.99, trajectories)
    for _ in range(transient):
        x = r * x * (1.0 - x)
    total = np.zeros(trajectories)
    for _ in range(steps):
        total += np.log(np.maximum(np.abs(r * (1.0 - 2.0 * x)), 1e-300))
        x = r * x * (1.0 - x)
    per_trajectory = total / steps
    return float(per_trajectory.mean()), float(per_trajectory.std(ddof=1) / np.sqrt(trajectories))


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/sweep.csv", help="the result file (CSV)")
    parser.add_argument("--points", type=int, default=61, help="values of r from --rmin to --rmax")
    parser.add_argument("--rmin", type=float, default=2.5)
    parser.add_argument("--rmax", type=float, default=4.0)
    parser.add_argument("--trajectories", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--json", metavar="PATH", help="write a summary here")
    args = parser.parse_args(argv)
    rs = np.linspace(args.rmin, args.rmax, args.points)
    seeds = np.random.SeedSequence(args.seed).generate_state(args.points)
    with taskfarm.FarmExecutor() as executor:
        futures = [
            executor.submit(lyapunov, float(r), int(s), args.trajectories, args.steps, 500)
            for r, s in zip(rs, seeds)
        ]
        rows = [(float(r), *f.result()) for r, f in zip(rs, futures)]
    table = np.array(rows)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    tmp = f"{args.out}.tmp{os.getpid()}"
    with open(tmp, "w") as out:
        np.savetxt(out, table, delimiter=",", header="r,lyapunov,stderr", comments="", fmt="%.10g")
    os.replace(tmp, args.out)
    chaotic = table[table[:, 1] > 0, 0]
    onset = float(chaotic.min()) if len(chaotic) else None
    print(f"{len(rows)} values of r -> {args.out}; first r with a positive exponent: {onset}")
    summary: dict[str, object] = {"out": os.path.abspath(args.out), "points": len(rows), "chaos_onset": onset}
    if args.json:
        with open(args.json, "w") as out:
            json.dump(summary, out)
    return summary


if __name__ == "__main__":
    main()
