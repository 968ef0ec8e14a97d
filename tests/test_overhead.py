"""An idle farm costs (almost) no CPU: workers waiting on long tasks, and the master waiting on them.

The issue's bar is "well under 2 %" of a core per rank.  The figures come
from ``--stats-json``: a worker's ``overhead_cpu_fraction`` is its CPU outside
tasks per second of its life (sent in its Bye, so known only after the farm
closed), ``master_cpu_fraction`` the CPU of rank 0's service thread per
second of wall time.  With doorbells (the default) both sides sleep between
messages: the bound is 2 % (measured: ~0.2 %), and every rank must report
that the rings arrived.  Without them (``TASKFARM_DOORBELL=0``, what a
cluster that blocks UDP between nodes gets) ranks poll on a backoff (a
worker with a slot free at 2 ms, one whose slots all run tasks at 10 ms):
the farm must still work, at a looser bound.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from conftest import MPI, farm_run, read_json

RANKS = 5
#: each worker sleeps this long in its one task: the farm idles meanwhile
TASK_SECONDS = 1.5
#: CPU bound per rank with doorbells, and when polling instead (fraction of a core)
BOUND = 0.02
POLLING_BOUND = 0.05
#: a polling worker whose every slot runs a task polls on a longer cap
#: (`_worker.BUSY_POLL_CAP`): 1.2-1.9% here, 3.9-5.1% at the idle cap
POLLING_BUSY_WORKER_BOUND = 0.03


@pytest.mark.mpi
@pytest.mark.parametrize("doorbell", [True, False], ids=["doorbell", "polling"])
def test_idle_farm_costs_little_cpu(mpi: MPI, script: Any, tmp_path: Path, doorbell: bool) -> None:
    path = script(
        f"""\
import time

import taskfarm


def nap(i):
    time.sleep({TASK_SECONDS})
    return i


with taskfarm.FarmExecutor() as ex:
    assert [f.result(60) for f in [ex.submit(nap, i) for i in range(ex.workers)]] == list(range(ex.workers))
"""
    )
    stats_path = tmp_path / "stats.json"
    env = None if doorbell else {"TASKFARM_DOORBELL": "0"}
    farm_run(mpi, RANKS, ["run", "-q", "--stats-json", str(stats_path), str(path)], timeout=90, env=env)
    stats = read_json(stats_path)
    overhead = {rank: r["overhead_cpu_fraction"] for rank, r in stats["ranks"].items()}
    print(
        f"{mpi.name}: master_cpu_fraction {stats['master_cpu_fraction']:.4f}, worker overhead "
        + ", ".join(f"rank {rank} {value:.4f}" for rank, value in sorted(overhead.items()))
    )
    assert stats["done"] == RANKS - 1
    assert sorted(r["tasks"] for r in stats["ranks"].values()) == [1] * (RANKS - 1)  # one nap per worker
    assert len(overhead) == RANKS - 1
    assert {rank: r["doorbell"] for rank, r in stats["ranks"].items()} == dict.fromkeys(overhead, doorbell)
    bound = BOUND if doorbell else POLLING_BOUND
    worker_bound = BOUND if doorbell else POLLING_BUSY_WORKER_BOUND
    for rank, value in overhead.items():
        assert value is not None and value < worker_bound, f"rank {rank} used {value:.1%} of a core while idle"
    assert stats["master_cpu_fraction"] < bound
