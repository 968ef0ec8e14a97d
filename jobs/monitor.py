"""A periodic monitor: report a batch's progress every 0.5 s while it runs.

    mpiexec -n 4 python -m taskfarm run jobs/monitor.py [--tasks 40] [--seconds 0.1] [--json PATH]

The batch's tasks each write a part file into an output directory.  Beside
them, ``executor.every`` runs a small monitor task on a worker every
``--interval`` seconds: it counts the part files written so far (what a real
monitor would read from a shared file system) and its result streams back to
rank 0, which prints a progress line.  The monitor has a higher priority than
the batch, so it does not wait behind it; never two of its runs at once, and
ticks missed while the farm is busy are skipped, not piled up.  When the
batch is done the monitor is cancelled.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import shutil
import socket
import tempfile
import time

import taskfarm
from taskfarm import Task


def work(outdir: str, index: int, seconds: float) -> int:
    """One task of the batch: compute (here: sleep), then write a part file."""
    time.sleep(seconds)
    path = os.path.join(outdir, f"part-{index:05d}.txt")
    with open(path + ".tmp", "w") as out:
        out.write(f"{index}\n")
    os.replace(path + ".tmp", path)  # the monitor never counts a half-written part
    return index


def progress(outdir: str) -> dict[str, object]:
    """The monitor task: how many parts exist, seen from the worker it runs on."""
    done = sum(1 for name in os.listdir(outdir) if name.startswith("part-") and name.endswith(".txt"))
    return {"done": done, "t": time.time(), "host": socket.gethostname(), "pid": os.getpid()}


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=40)
    parser.add_argument("--seconds", type=float, default=0.1, help="duration of each batch task")
    parser.add_argument("--interval", type=float, default=0.5, help="seconds between monitor runs")
    parser.add_argument("--outdir", help="where the parts go (default: a temporary directory, removed)")
    parser.add_argument("--json", metavar="PATH", help="write the reports here")
    args = parser.parse_args(argv)
    outdir = args.outdir or tempfile.mkdtemp(prefix="taskfarm-monitor-")
    os.makedirs(outdir, exist_ok=True)
    reports: list[dict[str, object]] = []
    start = time.time()

    def show(report: dict[str, object]) -> None:
        reports.append(report)
        print(f"[{report['t'] - start:5.2f} s] {report['done']:>4}/{args.tasks} parts written", flush=True)

    try:
        with taskfarm.FarmExecutor() as executor:
            batch = [executor.submit(work, outdir, i, args.seconds) for i in range(args.tasks)]
            # first report after one interval, once the farm has timed a few batch tasks (its
            # prefetch depth follows task durations: a tiny monitor run first would deepen it)
            monitor = executor.every(
                args.interval,
                Task(progress, (outdir,), priority=10),
                start=time.time() + args.interval,
                on_result=show,
            )
            concurrent.futures.wait(batch)
            monitor.cancel()
            monitor.wait()
        final = progress(outdir)["done"]
    finally:
        if args.outdir is None:
            shutil.rmtree(outdir, ignore_errors=True)
    print(f"batch done: {final}/{args.tasks} parts; monitor ran {monitor.runs} times, skipped {monitor.skipped} ticks")
    result: dict[str, object] = {
        "tasks": args.tasks,
        "final": final,
        "reports": [r["done"] for r in reports],
        "report_times": [r["t"] for r in reports],
        "runs": monitor.runs,
        "skipped": monitor.skipped,
        "batch_failed": sum(1 for f in batch if f.exception() is not None),
    }
    if args.json:
        with open(args.json, "w") as out:
            json.dump(result, out)
    return result


if __name__ == "__main__":
    main()
