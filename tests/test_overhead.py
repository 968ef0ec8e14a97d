"""An idle farm costs (almost) no CPU: workers waiting on long tasks, and the master waiting on them.

The issue's bar is "well under 2 %" of a core per rank; the bound here is
looser (5 %) because the test machine is shared and noisy.  The figures come
from ``--stats-json``: a worker's ``overhead_cpu_fraction`` is its CPU outside
tasks per second of its life (sent in its Bye, so known only after the farm
closed), ``master_cpu_fraction`` the CPU of rank 0's service thread per
second of wall time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from conftest import MPI, farm_run, read_json

RANKS = 5
#: each worker sleeps this long in its one task: the farm idles meanwhile
TASK_SECONDS = 1.5
BOUND = 0.05


@pytest.mark.mpi
def test_idle_farm_costs_little_cpu(mpi: MPI, script: Any, tmp_path: Path) -> None:
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
    farm_run(mpi, RANKS, ["run", "-q", "--stats-json", str(stats_path), str(path)], timeout=90)
    stats = read_json(stats_path)
    overhead = {rank: r["overhead_cpu_fraction"] for rank, r in stats["ranks"].items()}
    print(
        f"{mpi.name}: master_cpu_fraction {stats['master_cpu_fraction']:.4f}, worker overhead "
        + ", ".join(f"rank {rank} {value:.4f}" for rank, value in sorted(overhead.items()))
    )
    assert stats["done"] == RANKS - 1
    assert sorted(r["tasks"] for r in stats["ranks"].values()) == [1] * (RANKS - 1)  # one nap per worker
    assert len(overhead) == RANKS - 1
    for rank, value in overhead.items():
        assert value is not None and value < BOUND, f"rank {rank} used {value:.1%} of a core while idle"
    assert stats["master_cpu_fraction"] < BOUND
