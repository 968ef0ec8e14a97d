"""``speculative=True``: a straggling idempotent task gets a copy on an idle
rank and the first result wins (issue 7's stragglers).

Under real MPI: the first run of one task hangs on a rank, so only a copy
can finish it.  The script records which run answered; the stats JSON must
count one copy, and the losing copy once as a duplicate.  The copy that lost
is cut off where it runs (a signal, an asynchronous exception, a killed
child), under both wheels: signals and MPI share the rank's process.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from conftest import MPI, farm_run, read_json

#: the job of both tests: the farm learns 10 ms tasks, then the first run of
#: ``straggler`` straggles (``{straggle}``: until the test lets it go, or for
#: good), so only its copy can finish it; ``{after}`` runs before the end
STRAGGLING = """\
import json
import os
import time

import taskfarm


def quick(i):
    time.sleep(0.01)
    return i


def straggler():
    try:  # the first run to get here straggles
        os.close(os.open({first_run!r}, os.O_CREAT | os.O_EXCL))
    except FileExistsError:
        return "copy"
{straggle}
    return "straggler"


with taskfarm.FarmExecutor(speculative=True, isolation={isolation!r}) as ex:
    assert list(ex.map(quick, range(40), chunksize=1)) == list(range(40))  # the farm learns durations
    out = {{"answer": ex.submit(straggler).result(timeout=60)}}
{after}
with open({out!r}, "w") as f:
    json.dump(out, f)
"""


def _straggling(script: Any, tmp_path: Path, straggle: str, after: str, isolation: str | None = None) -> Path:
    return script(  # type: ignore[no-any-return]
        STRAGGLING.format(
            first_run=str(tmp_path / "first-run"),
            out=str(tmp_path / "out.json"),
            straggle=straggle,
            after=after,
            isolation=isolation,
        )
    )


@pytest.mark.mpi
def test_a_straggler_is_overtaken_by_its_copy(mpich: MPI, script: Any, tmp_path: Path) -> None:
    release = tmp_path / "release"
    stats_path = tmp_path / "stats.json"
    path = _straggling(
        script,
        tmp_path,
        f"    while not os.path.exists({str(release)!r}):\n        time.sleep(0.01)",
        f"    open({str(release)!r}, 'w').close()  # the straggler may finish now; its answer is discarded",
    )
    farm_run(mpich, 3, ["run", "-q", "--stats-json", str(stats_path), str(path)], timeout=120)
    assert read_json(tmp_path / "out.json") == {"answer": "copy"}
    stats = read_json(stats_path)
    assert stats["speculated"] == 1
    assert stats["duplicates"] == 1  # the straggler lost, and was counted once
    assert stats["done"] == 41 and stats["failed"] == 0


#: the straggler's first copy would run this long (seconds) if nothing cut it
#: off: longer than the farm's wait for a worker's Bye at its end (30 s), after
#: which the job would have ended with MPI_Abort, exit 3
STRAGGLES_FOR = 90


@pytest.mark.mpi
@pytest.mark.parametrize(
    ("pool", "isolation"),
    [("solo", None), ("solo", "process"), ("threads", None)],
    ids=["solo-inline", "solo-process", "threads-inline"],
)
def test_the_losing_copy_is_cut_off_and_the_job_ends_at_once(
    mpi: MPI, pool: str, isolation: str | None, script: Any, tmp_path: Path
) -> None:
    """The straggler never finishes by itself; once its copy wins, it is cut
    off (a signal on the main thread, an asynchronous exception in a slot
    thread, its child process killed), its rank takes work again, and the
    job ends with exit 0 instead of waiting for it and aborting."""
    finished, stats_path = tmp_path / "finished", tmp_path / "stats.json"
    straggle = f"""\
    deadline = time.monotonic() + {STRAGGLES_FOR}
    while time.monotonic() < deadline:
        try:
            time.sleep(0.01)
        except Exception:  # a task's own error handling does not keep it alive
            pass
    open({str(finished)!r}, "w").close()"""
    after = f"""\
    # the rank that ran the straggler takes work again (not speculative: a
    # task that waits there for a new child process could be copied too)
    with taskfarm.FarmExecutor(isolation={isolation!r}) as plain:
        ranks = plain.map(lambda i: (time.sleep(0.05), os.environ["TASKFARM_RANK"])[1], range(8), chunksize=1)
        out["ranks"] = sorted(set(ranks))"""
    path = _straggling(script, tmp_path, straggle, after, isolation)
    cli = ["run", "-q", "--pool", pool, "--stats-json", str(stats_path), str(path)]
    farm_run(mpi, 3, cli, timeout=STRAGGLES_FOR - 30)
    assert read_json(tmp_path / "out.json") == {"answer": "copy", "ranks": ["1", "2"]}
    stats = read_json(stats_path)
    assert stats["speculated"] == 1 and stats["duplicates"] == 1
    assert stats["done"] == 49 and stats["failed"] == 0
    assert not finished.exists()
