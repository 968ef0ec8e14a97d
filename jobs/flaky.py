"""Flaky tasks that succeed on retry: deterministic flakiness through marker files.

    mpiexec -n 4 python -m taskfarm run jobs/flaky.py [--tasks 12] [--every 3] [--json PATH]

Every ``--every``-th task fails on its first attempt with a ConnectionError,
as a download from a busy server might, and succeeds when retried: a marker
file on disk records the attempts, so the outcome does not depend on timing
or on which rank runs the task.  The executor retries ConnectionError (and
only that) up to twice, with a short exponential backoff.  The statistics show
one retry per flaky task and no failure.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile

import taskfarm


def fetch(workdir: str, index: int, flaky: bool) -> dict[str, int]:
    """Pretend to fetch item ``index``; a flaky item fails on its first attempt."""
    marker = os.path.join(workdir, f"attempts-{index:04d}")
    with open(marker, "a") as out:  # one line per attempt, on whatever rank runs it
        out.write(f"{os.getpid()}\n")
    with open(marker) as f:
        attempts = sum(1 for _ in f)
    if flaky and attempts == 1:
        raise ConnectionError(f"item {index}: server busy (attempt {attempts})")
    return {"index": index, "value": index * index, "attempts": attempts}


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=12)
    parser.add_argument("--every", type=int, default=3, help="every N-th task is flaky")
    parser.add_argument("--workdir", help="where the attempt markers go (default: a temporary directory)")
    parser.add_argument("--json", metavar="PATH", help="write the results and retry counts here")
    args = parser.parse_args(argv)
    workdir = args.workdir or tempfile.mkdtemp(prefix="taskfarm-flaky-")
    os.makedirs(workdir, exist_ok=True)
    try:
        with taskfarm.FarmExecutor(max_retries=2, retry_on=ConnectionError, retry_backoff=0.05) as executor:
            futures = [executor.submit(fetch, workdir, i, i % args.every == 0) for i in range(args.tasks)]
            results = [f.result() for f in futures]
            stats = executor.statistics()
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    flaky = [r["index"] for r in results if r["attempts"] > 1]
    print(
        f"{len(results)} tasks done, {len(flaky)} needed a retry ({flaky}); "
        f"farm counted {stats.retried} retries, {stats.failed} failures"
    )
    report: dict[str, object] = {
        "results": results,
        "retried_tasks": flaky,
        "retried": stats.retried,
        "failed": stats.failed,
    }
    if args.json:
        with open(args.json, "w") as out:
            json.dump(report, out)
    return report


if __name__ == "__main__":
    main()
