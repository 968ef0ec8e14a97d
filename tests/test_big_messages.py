"""Messages over MPI's 2 GiB count limit: a numpy argument and result of just
over 2 GiB travel out of band, split into chunks (`_transport.MAX_CHUNK`),
and come back intact, on both MPI wheels.  (mpi4py 4 over an MPI-4 library
would take the large count itself; the chunks are for MPI-3 site libraries,
and this test holds the chunked path to the same result.)

The script writes what it saw to a JSON file; the test asserts on that.
About 6.5 GB of memory at the peak (the array on the master, the worker's
copy, the master's copy of the result).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from conftest import MPI, farm_run, read_json

#: just over 2 GiB: one buffer needs three chunks of at most 1 GiB
NBYTES = (1 << 31) + (1 << 20) + 3
#: bytes of memory the test needs (three copies of the array, and some)
MEMORY_NEEDED = 7 << 30


def _available_memory() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


@pytest.mark.mpi
@pytest.mark.slow
@pytest.mark.skipif(_available_memory() < MEMORY_NEEDED, reason="needs ~7 GB of free memory")
def test_an_array_over_2_gib_goes_out_and_back(mpi: MPI, script: Any, tmp_path: Path) -> None:
    out = tmp_path / "seen.json"
    path = script(
        f"""\
import json

import numpy as np

import taskfarm


def mark_and_return(a):
    # the worker's copy: check both ends, change one byte, send it all back
    seen = (int(a[0]), int(a[-1]), int(a.nbytes))
    a[1] = 9
    return seen, a


with taskfarm.FarmExecutor() as ex:
    a = np.zeros({NBYTES}, dtype=np.uint8)
    a[0], a[-1] = 5, 7
    seen, b = ex.submit(mark_and_return, a).result(timeout=240)
    with open({str(out)!r}, "w") as f:
        json.dump({{
            "worker_saw": seen,
            "back_nbytes": int(b.nbytes),
            "back_ends": [int(b[0]), int(b[1]), int(b[-1])],
            "back_sum": int(b.sum(dtype=np.uint64)),
            "sent_unchanged": int(a[1]),
        }}, f)
"""
    )
    farm_run(mpi, 2, ["run", "-q", str(path)], timeout=280)
    seen = read_json(out)
    assert seen["worker_saw"] == [5, 7, NBYTES]
    assert seen["back_nbytes"] == NBYTES
    assert seen["back_ends"] == [5, 9, 7]
    assert seen["back_sum"] == 5 + 9 + 7
    assert seen["sent_unchanged"] == 0  # the worker changed its own copy, not ours
