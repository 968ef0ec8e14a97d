"""The ways into a farm, and ``python -m taskfarm run``'s contract: exit codes, usage, statistics.

(a) ``mpiexec -n 3 python -m taskfarm run script.py ARGS``: only rank 0 runs the script;
(b) ``mpiexec -n 3 python script.py`` with ``with taskfarm.farm() as ex``: workers get None;
(c) ``python script.py`` with ``FarmExecutor(max_workers=2)``: workers are spawned.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import MPI, farm_run, read_json, run

TIMEOUT = 60.0
#: a job that must end promptly gets this long; its backlog would take far longer
QUICK_END = 25.0

SCRIPT = """\
import json
import os
import sys

import taskfarm

log, out = sys.argv[1], sys.argv[2]
with open(log, "a") as f:  # one line per process that runs this script
    f.write(f"{os.getpid()}\\n")


def sq(x):
    return x * x


def whose(_):
    return os.getpid()


with taskfarm.FarmExecutor() as ex:
    results = list(ex.map(sq, range(20)))
    worker_pids = sorted({ex.submit(whose, i).result(60) for i in range(8)})
    workers = ex.workers
with open(out, "w") as f:
    json.dump({"argv": sys.argv, "name": __name__, "results": results, "workers": workers,
               "worker_pids": worker_pids, "pid": os.getpid()}, f)
"""


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


# --------------------------------------------------------------------------
# the three ways in
# --------------------------------------------------------------------------


@pytest.mark.mpi
def test_run_script_on_rank_0_only_with_its_argv(mpi: MPI, script: Any, tmp_path: Path) -> None:
    path = script(SCRIPT)
    log, out = tmp_path / "ran", tmp_path / "out.json"
    farm_run(mpi, 3, ["run", "-q", str(path), str(log), str(out), "--verbose", "-q"], timeout=TIMEOUT)
    got = read_json(out)
    assert len(lines(log)) == 1  # the workers never ran the script
    assert got["argv"] == [str(path), str(log), str(out), "--verbose", "-q"]  # options after SCRIPT are its own
    assert got["name"] == "__main__"
    assert got["results"] == [i * i for i in range(20)]
    assert got["workers"] == 2
    assert got["pid"] not in got["worker_pids"]


@pytest.mark.mpi
def test_plain_mpiexec_with_farm_block(mpi: MPI, script: Any, tmp_path: Path) -> None:
    path = script(
        """\
import json
import os
import sys

import taskfarm

log, out = sys.argv[1], sys.argv[2]
rank = next(int(os.environ[v]) for v in ("PMI_RANK", "OMPI_COMM_WORLD_RANK") if v in os.environ)


def sq(x):
    return x * x


with taskfarm.farm() as ex:
    got = ex
    if ex is not None:
        with open(out, "w") as f:
            json.dump({"results": list(ex.map(sq, range(30))), "workers": ex.workers}, f)
# every rank goes on after the block: rank 0 with its executor, the others with None
with open(log, "a") as f:
    f.write(json.dumps({"rank": rank, "executor": got is not None}) + "\\n")
"""
    )
    log, out = tmp_path / "ranks", tmp_path / "out.json"
    run([*mpi.launch(3), mpi.python, str(path), str(log), str(out)], timeout=TIMEOUT, env=mpi.env(), check=0)
    seen = sorted((json.loads(line)["rank"], json.loads(line)["executor"]) for line in lines(log))
    assert seen == [(0, True), (1, False), (2, False)]
    got = read_json(out)
    assert got["results"] == [i * i for i in range(30)]
    assert got["workers"] == 2


@pytest.mark.mpi
def test_plain_python_spawns_its_workers(mpi: MPI, script: Any, tmp_path: Path) -> None:
    path = script(
        """\
import concurrent.futures as cf
import json
import os
import sys
import time

import taskfarm


def whose(_):
    time.sleep(0.01)  # long enough that both workers take some
    return os.getpid()


try:
    with taskfarm.FarmExecutor(max_workers=2) as ex:
        pids = sorted({f.result(60) for f in [ex.submit(whose, i) for i in range(20)]})
        data = {"ok": True, "workers": ex.workers, "pids": pids, "master": os.getpid(),
                "results": list(ex.map(abs, range(-5, 5)))}
except taskfarm.BrokenFarmError as exc:
    data = {"ok": False, "error": type(exc).__name__, "broken_executor": isinstance(exc, cf.BrokenExecutor)}
with open(sys.argv[1], "w") as f:
    json.dump(data, f)
"""
    )
    out = tmp_path / "out.json"
    t0 = time.monotonic()
    run([mpi.python, str(path), str(out)], timeout=TIMEOUT, env=mpi.env(), check=0)
    got = read_json(out)
    if mpi.name == "openmpi" and os.geteuid() == 0:
        # Open MPI refuses to spawn as root: a clear error at once, no hang
        assert got == {"ok": False, "error": "BrokenFarmError", "broken_executor": True}
        assert time.monotonic() - t0 < TIMEOUT / 2
        return
    assert got["ok"] is True, got
    assert got["workers"] == 2
    assert len(got["pids"]) == 2 and got["master"] not in got["pids"]
    assert got["results"] == [abs(i) for i in range(-5, 5)]


@pytest.mark.mpi
def test_run_module_form(mpi: MPI, tmp_path: Path) -> None:
    (tmp_path / "farmmod.py").write_text(SCRIPT)
    log, out = tmp_path / "ran", tmp_path / "out.json"
    res = run(
        [*mpi.launch(3), mpi.python, "-m", "taskfarm", "run", "-q", "-m", "farmmod", str(log), str(out)],
        timeout=TIMEOUT,
        env=mpi.env(),
        cwd=tmp_path,  # like python -m, the module is found from the working directory
    )
    assert res.returncode == 0, res.explain()
    got = read_json(out)
    assert len(lines(log)) == 1
    assert got["name"] == "__main__"
    assert got["argv"][1:] == [str(log), str(out)]
    assert Path(got["argv"][0]).name == "farmmod.py"
    assert got["results"] == [i * i for i in range(20)]


# --------------------------------------------------------------------------
# statistics
# --------------------------------------------------------------------------


@pytest.mark.mpi
def test_stats_json_contents(mpi: MPI, script: Any, tmp_path: Path) -> None:
    path = script(
        """\
import concurrent.futures as cf

import taskfarm


def maybe_fail(i):
    if i % 10 == 3:
        raise ValueError(i)
    return i


with taskfarm.FarmExecutor() as ex:
    cf.wait([ex.submit(maybe_fail, i) for i in range(60)], timeout=60)
"""
    )
    stats_path = tmp_path / "stats.json"
    res = farm_run(mpi, 3, ["run", "-q", "--stats-json", str(stats_path), str(path)], timeout=TIMEOUT, check=None)
    stats = read_json(stats_path)
    assert stats["exit_code"] == res.returncode
    assert (stats["submitted"], stats["done"], stats["failed"], stats["cancelled"]) == (60, 54, 6, 0)
    assert stats["workers"] == 2
    assert sorted(stats["ranks"]) == ["1", "2"]
    assert sum(r["tasks"] for r in stats["ranks"].values()) == stats["done"]
    assert sum(r["failed"] for r in stats["ranks"].values()) == stats["failed"]
    assert stats["wall_time"] > 0
    assert 0 <= stats["master_cpu_fraction"] <= 1
    for rank in stats["ranks"].values():
        assert rank["alive"] is True
        assert isinstance(rank["overhead_cpu_fraction"], float)  # from the worker's Bye
        assert rank["host"]


# --------------------------------------------------------------------------
# exit codes and usage
# --------------------------------------------------------------------------

BAD_USAGE = {
    "unknown option": ["run", "--bogus", "{script}"],
    "missing script": ["run"],
    "nonexistent script": ["run", "{missing}"],
    "unknown command": ["frobnicate"],
}


def _usage_args(case: str, script: Any, tmp_path: Path) -> list[str]:
    path = script("print('never run')\n")
    subst = {"script": str(path), "missing": str(tmp_path / "no-such-script.py")}
    return [a.format(**subst) for a in BAD_USAGE[case]]


@pytest.mark.parametrize("case", sorted(BAD_USAGE))
def test_bad_usage_exits_2_with_one_line(case: str, mpich: MPI, script: Any, tmp_path: Path) -> None:
    args = _usage_args(case, script, tmp_path)
    res = run([mpich.python, "-m", "taskfarm", *args], timeout=TIMEOUT, env=mpich.env())
    assert res.returncode == 2, res.explain()
    assert len(res.stderr.strip().splitlines()) == 1, res.explain()
    assert res.stdout == ""


@pytest.mark.mpi
def test_a_bad_environment_setting_is_bad_usage_on_every_rank(mpi: MPI, script: Any) -> None:
    """A setting the ranks read only when arrays arrive, mid-run, is checked
    before anything runs: exit 2, one line from rank 0, naming the variable."""
    path = script("print('never run')\n")
    env = {"TASKFARM_HUGE_PAGES": "yes"}
    res = farm_run(mpi, 3, ["run", str(path)], timeout=TIMEOUT, check=2, env=env)
    ours = [line for line in res.stderr.splitlines() if line.startswith("taskfarm")]
    assert len(ours) == 1 and "TASKFARM_HUGE_PAGES" in ours[0], res.explain()
    assert "never run" not in res.stdout, res.explain()


@pytest.mark.mpi
@pytest.mark.parametrize("case", ["unknown option", "nonexistent script"])
def test_bad_usage_under_mpiexec_ends_every_rank(case: str, mpi: MPI, script: Any, tmp_path: Path) -> None:
    res = farm_run(mpi, 3, _usage_args(case, script, tmp_path), timeout=TIMEOUT, check=2)
    ours = [line for line in res.stderr.splitlines() if line.startswith("taskfarm")]
    assert len(ours) == 1, res.explain()  # rank 0 alone reports it


@pytest.mark.mpi
def test_script_that_raises_exits_1_and_ends_the_job(mpi: MPI, script: Any, tmp_path: Path) -> None:
    path = script(
        """\
import time

import taskfarm


def slow(i):
    time.sleep(0.02)
    return i


ex = taskfarm.FarmExecutor()
assert ex.submit(abs, -2).result(60) == 2
backlog = [ex.submit(slow, i) for i in range(3000)]  # a minute of work left behind
raise RuntimeError("the script failed")
"""
    )
    stats_path = tmp_path / "stats.json"
    t0 = time.monotonic()
    farm_run(mpi, 3, ["run", "-q", "--stats-json", str(stats_path), str(path)], timeout=QUICK_END, check=1)
    stats = read_json(stats_path)
    assert stats["exit_code"] == 1
    assert stats["done"] < 3000  # the backlog was dropped, not worked off
    print(f"{mpi.name}: job ended {time.monotonic() - t0:.1f} s after start")


@pytest.mark.mpi
def test_sys_exit_code_is_the_jobs_exit_code(mpi: MPI, script: Any, tmp_path: Path) -> None:
    path = script(
        """\
import sys

import taskfarm

with taskfarm.FarmExecutor() as ex:
    ex.submit(abs, 1).result(60)
sys.exit(3)
"""
    )
    stats_path = tmp_path / "stats.json"
    farm_run(mpi, 3, ["run", "-q", "--stats-json", str(stats_path), str(path)], timeout=TIMEOUT, check=3)
    assert read_json(stats_path)["exit_code"] == 3


@pytest.mark.parametrize("args", [["--help"], ["run", "--help"]], ids=["top", "run"])
def test_help_exits_0(args: list[str], mpich: MPI) -> None:
    res = run([mpich.python, "-m", "taskfarm", *args], timeout=TIMEOUT, env=mpich.env(), check=0)
    assert res.stdout.startswith("usage: taskfarm")
    assert res.stderr == ""


@pytest.mark.mpi
def test_help_under_mpiexec_prints_once(mpi: MPI) -> None:
    res = farm_run(mpi, 2, ["run", "--help"], timeout=TIMEOUT, check=0)
    assert res.stdout.count("usage: taskfarm run") == 1
