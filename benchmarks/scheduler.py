"""The scheduler's own CPU per task as the farm grows (no MPI, no processes).

    .venv/bin/python benchmarks/scheduler.py [--ranks 4,256,2048] [--tasks 2000]

A farm's master consults its scheduler after every event; a pass that walks
every rank costs nothing on a laptop's 4 workers and milliseconds on a
cluster's thousands.  This drives `taskfarm._scheduler.Scheduler` directly
through the life of one task at a time on an otherwise idle farm (submit,
poll, next wake-up, finish, poll: what the service thread asks of it for a
lone task) and through a burst (as many tasks as slots, each rank with a
queue), and prints microseconds per task against the number of ranks, with
the ratio to the smallest farm measured in the same run.  mpi4py.futures has
no scheduler to set beside it: its master hands each task to the next idle
worker, so the baseline here is the same code on the smallest farm.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from taskfarm._scheduler import Scheduler
from taskfarm._task import TaskPolicy

#: seconds each task pretends to have taken (sets the scheduler's mean, hence its prefetch)
DURATION = 0.001
#: the farm's own default (``taskfarm._master.DEFAULT_HEARTBEAT_TIMEOUT``, not
#: imported: that module brings MPI): rule 2 reads the ranks' clocks
HEARTBEAT_TIMEOUT = 300.0


def _farm(ranks: int) -> Scheduler:
    scheduler = Scheduler(heartbeat_timeout=HEARTBEAT_TIMEOUT)
    for rank in range(1, ranks + 1):
        scheduler.add_worker(rank, 1, 0.0)
    return scheduler


def lone(ranks: int, tasks: int) -> float:
    """Microseconds of scheduler CPU per task, one task at a time."""
    scheduler = _farm(ranks)
    policy = TaskPolicy()
    started = time.process_time()
    for task in range(tasks):
        scheduler.submit(task, 0.0, policy=policy)
        (rank,) = scheduler.poll(0.0).dispatch
        scheduler.next_wakeup()
        scheduler.finished(task, rank, 0.0, ok=True, duration=DURATION)
        scheduler.poll(0.0)
    return 1e6 * (time.process_time() - started) / tasks


def burst(ranks: int, tasks: int) -> float:
    """Microseconds of scheduler CPU per task, ``tasks`` submitted at once and
    finished in dispatch order, each finish followed by a poll."""
    scheduler = _farm(ranks)
    policy = TaskPolicy()
    started = time.process_time()
    for task in range(tasks):
        scheduler.submit(task, 0.0, policy=policy)
    running: list[tuple[int, int]] = []
    for rank, task_ids in scheduler.poll(0.0).dispatch.items():
        running.extend((task_id, rank) for task_id in task_ids)
    done = 0
    while running:
        task, rank = running.pop(0)
        scheduler.finished(task, rank, 0.0, ok=True, duration=DURATION)
        done += 1
        for rank, task_ids in scheduler.poll(0.0).dispatch.items():
            running.extend((task_id, rank) for task_id in task_ids)
    assert done == tasks, f"{done} of {tasks} tasks ran"
    return 1e6 * (time.process_time() - started) / tasks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", default="4,256,2048", help="comma-separated farm sizes (worker ranks)")
    parser.add_argument("--tasks", type=int, default=2000, help="tasks per measurement")
    args = parser.parse_args(argv)
    sizes = sorted(int(n) for n in args.ranks.split(","))
    rows = [(n, lone(n, args.tasks), burst(n, args.tasks)) for n in sizes]
    base_lone, base_burst = rows[0][1], rows[0][2]
    print(f"scheduler CPU per task, us ({args.tasks} tasks; ratio to {sizes[0]} ranks in this run)")
    print("| ranks | one task at a time | ratio | a burst | ratio |")
    print("|---|---|---|---|---|")
    for n, one, many in rows:
        print(f"| {n} | {one:.1f} | {one / base_lone:.1f}x | {many:.1f} | {many / base_burst:.1f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
