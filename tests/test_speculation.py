"""``speculative=True``: a straggling idempotent task gets a copy on an idle
rank and the first result wins (issue 7's stragglers).

Under real MPI (the MPICH wheel; the rule is the scheduler's, MPI-agnostic):
the first run of one task hangs on a rank until the test lets it go, so only
a copy can finish it.  The script records which run answered; the stats JSON
must count one copy and the straggler's late answer as a duplicate.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from conftest import MPI, farm_run, read_json


@pytest.mark.mpi
def test_a_straggler_is_overtaken_by_its_copy(mpich: MPI, script: Any, tmp_path: Path) -> None:
    first_run = tmp_path / "first-run"
    release = tmp_path / "release"
    out = tmp_path / "out.json"
    stats_path = tmp_path / "stats.json"
    path = script(
        f"""\
import json
import os
import time

import taskfarm


def quick(i):
    time.sleep(0.01)
    return i


def straggler():
    try:  # the first run to get here straggles until the script says so
        os.close(os.open({str(first_run)!r}, os.O_CREAT | os.O_EXCL))
    except FileExistsError:
        return "copy"
    while not os.path.exists({str(release)!r}):
        time.sleep(0.01)
    return "straggler"


with taskfarm.FarmExecutor(speculative=True) as ex:
    assert list(ex.map(quick, range(40), chunksize=1)) == list(range(40))  # the farm learns durations
    answer = ex.submit(straggler).result(timeout=60)
    open({str(release)!r}, "w").close()  # the straggler may finish now; its answer is discarded
with open({str(out)!r}, "w") as f:
    json.dump({{"answer": answer}}, f)
"""
    )
    farm_run(mpich, 3, ["run", "-q", "--stats-json", str(stats_path), str(path)], timeout=120)
    assert read_json(out) == {"answer": "copy"}
    stats = read_json(stats_path)
    assert stats["speculated"] == 1
    assert stats["duplicates"] == 1  # the straggler's own answer came, and was dropped
    assert stats["done"] == 41 and stats["failed"] == 0
