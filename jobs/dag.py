"""A small DAG: map over chunks of data, reduce with a chord, then one last step.

    mpiexec -n 4 python -m taskfarm run jobs/dag.py [--chunks 16] [--size 200000] [--json PATH]

::

    chunk_stats(0) ─┐
    chunk_stats(1) ─┼─> merge ──> summarize
         ...        │   (the chord's body gets the list of the map's results)
    chunk_stats(k) ─┘

Each map task draws its own reproducible chunk of normal samples (numpy
SeedSequence) and returns (count, mean, M2, histogram); ``merge`` combines the
partial moments exactly (Chan et al.'s parallel update) and adds up the
histograms; ``summarize`` turns them into mean, standard deviation and
quantiles.  The whole canvas is submitted at once: the farm runs each task when
its inputs are done, and nothing waits on rank 0 in between.  ``--check``
recomputes the statistics serially on rank 0 and reports the difference.
"""

from __future__ import annotations

import argparse
import json

import numpy as np

import taskfarm
from taskfarm import chain, chord, signature

#: histogram bins over [MEAN - 6 SIGMA, MEAN + 6 SIGMA]
BINS = 240
MEAN, SIGMA = 3.0, 2.0
EDGES = np.linspace(MEAN - 6 * SIGMA, MEAN + 6 * SIGMA, BINS + 1)


def samples(seed: int, index: int, size: int) -> np.ndarray:
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(index,)))
    return rng.normal(MEAN, SIGMA, size)


def chunk_stats(seed: int, index: int, size: int) -> tuple[int, float, float, np.ndarray]:
    """The map step: count, mean, sum of squared deviations, histogram of one chunk."""
    x = samples(seed, index, size)
    mean = float(x.mean())
    return len(x), mean, float(((x - mean) ** 2).sum()), np.histogram(x, EDGES)[0]


def merge(parts: list[tuple[int, float, float, np.ndarray]]) -> tuple[int, float, float, np.ndarray]:
    """The reduce step (the chord's body): combine partial moments and histograms."""
    n, mean, m2 = 0, 0.0, 0.0
    hist = np.zeros(BINS, dtype=np.int64)
    for nb, mb, m2b, hb in parts:
        delta = mb - mean
        total = n + nb
        mean += delta * nb / total
        m2 += m2b + delta * delta * n * nb / total
        n = total
        hist += hb
    return n, mean, m2, hist


def summarize(merged: tuple[int, float, float, np.ndarray]) -> dict[str, float]:
    """The last step: statistics from the merged moments, quantiles from the histogram."""
    n, mean, m2, hist = merged
    cdf = np.concatenate([[0.0], np.cumsum(hist) / hist.sum()])  # at each bin edge
    quantiles = {f"q{round(q * 100)}": float(np.interp(q, cdf, EDGES)) for q in (0.05, 0.5, 0.95)}
    return {"count": int(n), "mean": mean, "std": float(np.sqrt(m2 / (n - 1))), **quantiles}


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", type=int, default=16)
    parser.add_argument("--size", type=int, default=200_000, help="samples per chunk")
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--check", action="store_true", help="recompute serially and compare")
    parser.add_argument("--json", metavar="PATH", help="write the statistics here")
    args = parser.parse_args(argv)
    workflow = chain(
        chord([signature(chunk_stats, args.seed, i, args.size) for i in range(args.chunks)], signature(merge)),
        signature(summarize),
    )
    with taskfarm.FarmExecutor() as executor:
        result = workflow.submit(executor).result()
    print(
        f"{result['count']:,} samples in {args.chunks} chunks: mean {result['mean']:.4f} "
        f"std {result['std']:.4f} median {result['q50']:.3f}"
    )
    if args.check:
        x = np.concatenate([samples(args.seed, i, args.size) for i in range(args.chunks)])
        result["serial_mean"] = float(x.mean())
        result["serial_std"] = float(x.std(ddof=1))
        print(f"serial: mean {x.mean():.4f} std {x.std(ddof=1):.4f}")
    if args.json:
        with open(args.json, "w") as out:
            json.dump(result, out)
    return result


if __name__ == "__main__":
    main()
