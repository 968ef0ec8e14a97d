"""The fault model, end to end under real MPI (docs/faults.md).

Each test runs a farm under mpiexec with a hard timeout, injects a fault
(a task that raises, overruns, crashes its process; a worker rank killed,
stopped, or all of them killed) and checks the structured outcome: every
other task's result, the statistics (nothing counted twice), the exit code.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
from conftest import MPI, Result, assert_aborted, farm_run, read_json

pytestmark = pytest.mark.mpi

# --------------------------------------------------------------------------
# A task of every kind of failure, in one run per pool and MPI
# --------------------------------------------------------------------------

FAULTS = r'''
import concurrent.futures, ctypes, json, os, signal, sys, threading, time
import taskfarm
from taskfarm import Task

D = sys.argv[1]

def attempt(name):
    """Number this attempt of task ``name`` (0, 1, ...) and note where it ran."""
    n = 0
    while True:
        try:
            fd = os.open(os.path.join(D, f"{name}.{n}"), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            n += 1
            continue
        os.write(fd, os.environ["TASKFARM_RANK"].encode())
        os.close(fd)
        return n

def flaky(name, fails):
    n = attempt(name)
    if n < fails:
        raise ConnectionError(f"attempt {n} failed")
    return n

def always(name):
    attempt(name)
    raise ValueError("always fails")

def spin(seconds):
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass
    return "finished"

def crash_once(name, how):
    if attempt(name) == 0:
        if how == "exit":
            os._exit(7)
        if how == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if how == "segv":
            ctypes.string_at(0)
    return how

class NeedsTwo(Exception):
    def __init__(self, a, b):
        super().__init__(f"{a}+{b}")

def bad_exception():
    raise NeedsTwo(1, 2)

def bad_result():
    return threading.Lock()

def square(i):
    return i * i

def where(seconds):
    time.sleep(seconds)
    return os.environ["TASKFARM_RANK"]

def outcome(future, started):
    try:
        return {"ok": True, "value": future.result(), "seconds": time.monotonic() - started}
    except BaseException as exc:
        cause = exc.__cause__
        return {
            "ok": False,
            "type": type(exc).__name__,
            "message": str(exc),
            "cause": type(cause).__name__ if cause is not None else None,
            "cause_message": str(cause)[-300:] if cause is not None else None,
            "seconds": time.monotonic() - started,
        }

out = {}
with taskfarm.FarmExecutor() as ex:
    t0 = time.monotonic()
    # retries first, each alone, so that the other worker is free for each retry
    # (with two at once, the other worker may hold two tasks, and a retry goes
    # where there is room rather than queue behind them)
    retries = {}
    for name, task in (
        ("flaky", Task(flaky, ("flaky", 2), max_retries=3)),
        ("exhausted", Task(always, ("exhausted",), max_retries=2)),
        ("not_retried", Task(always, ("not_retried",), max_retries=3, retry_on=KeyError)),
    ):
        retries[name] = ex.submit_task(task)
        concurrent.futures.wait([retries[name]])
    t1 = time.monotonic()
    faults = {
        "limit_inline": ex.submit_task(Task(spin, (60,), time_limit=0.5, isolation="inline")),
        "limit_process": ex.submit_task(Task(time.sleep, (60,), time_limit=0.5, isolation="process")),
        "exit": ex.submit_task(Task(crash_once, ("exit", "exit"), isolation="process")),
        "kill": ex.submit_task(Task(crash_once, ("kill", "kill"), isolation="process")),
        "segv": ex.submit_task(Task(crash_once, ("segv", "segv"), isolation="process")),
        "quarantine": ex.submit_task(Task(os._exit, (3,), isolation="process", max_crashes=2)),
        "bad_result": ex.submit(bad_result),
        "bad_exception": ex.submit(bad_exception),
    }
    squares = [ex.submit(square, i) for i in range(100)]
    for name, f in retries.items():
        out[name] = outcome(f, t0)
    for name, f in faults.items():
        out[name] = outcome(f, t1)
    out["squares_ok"] = [f.result() for f in squares] == [i * i for i in range(100)]
    # after all that, both ranks still serve
    out["final_ranks"] = sorted({f.result() for f in [ex.submit(where, 0.2) for _ in range(4)]})
print("RESULT " + json.dumps(out))
'''


def _result_line(res: Result) -> dict[str, Any]:
    for line in res.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])  # type: ignore[no-any-return]
    pytest.fail(f"no RESULT line\n{res.explain()}")


def _attempt_ranks(directory: Path, name: str) -> list[int]:
    ranks = []
    n = 0
    while (directory / f"{name}.{n}").exists():
        ranks.append(int((directory / f"{name}.{n}").read_text()))
        n += 1
    return ranks


@pytest.mark.parametrize("pool", ["solo", "processes"])
def test_every_task_fault_fails_only_its_task(mpi: MPI, pool: str, tmp_path: Path, script: Any) -> None:
    if pool == "processes" and mpi.name == "openmpi":
        pytest.skip("the processes pool is MPI-agnostic; once under MPICH keeps the suite short")
    marks = tmp_path / "marks"
    marks.mkdir()
    stats_path = tmp_path / "stats.json"
    res = farm_run(
        mpi,
        3,
        ["run", "--pool", pool, "--stats-json", str(stats_path), "-q", str(script(FAULTS)), str(marks)],
        timeout=120,
        check=0,
    )
    out = _result_line(res)

    # retried until it succeeded; each retry went to the other (free) worker
    assert out["flaky"] == {"ok": True, "value": 2, "seconds": out["flaky"]["seconds"]}
    ranks = _attempt_ranks(marks, "flaky")
    assert len(ranks) == 3
    assert all(a != b for a, b in itertools.pairwise(ranks)), ranks
    # retries used up: MaxRetriesExceededError, the last error as its cause
    assert out["exhausted"]["type"] == "MaxRetriesExceededError"
    assert out["exhausted"]["cause"] == "ValueError"
    assert len(_attempt_ranks(marks, "exhausted")) == 3
    # an exception the policy does not retry fails at once, as itself
    assert out["not_retried"]["type"] == "ValueError"
    assert len(_attempt_ranks(marks, "not_retried")) == 1
    # time limits: inline (SIGALRM or async exception) and in a child process (killed)
    for name in ("limit_inline", "limit_process"):
        assert out[name]["type"] == "TimeLimitExceeded", out[name]
        assert out[name]["seconds"] < 30, out[name]
    assert "was killed" in out["limit_process"]["message"]
    # a crash of the task's process fails that attempt only: resubmitted, then it works
    for name in ("exit", "kill", "segv"):
        assert out[name]["ok"] and out[name]["value"] == name, out[name]
        assert len(_attempt_ranks(marks, name)) == 2
    # a task that kills every process it runs in is quarantined after max_crashes
    assert out["quarantine"]["type"] == "WorkerLostError"
    assert "quarantined" in out["quarantine"]["message"]
    assert out["quarantine"]["cause"] == "WorkerLostError"
    assert "exited with code 3" in out["quarantine"]["cause_message"]
    # what cannot be sent back fails its own task with SerializationError
    assert out["bad_result"]["type"] == "SerializationError"
    assert out["bad_exception"]["type"] == "SerializationError"
    assert "NeedsTwo" in out["bad_exception"]["message"]
    assert out["squares_ok"]
    assert out["final_ranks"] == ["1", "2"]

    stats = read_json(stats_path)
    assert stats["done"] == 100 + 1 + 3 + 4  # squares, flaky, three crashed once, final
    assert stats["failed"] == 7
    assert stats["retried"] == 2 + 2  # flaky and exhausted, twice each
    assert stats["resubmitted"] == 3 + 1  # one per crash, the quarantined one once
    assert stats["duplicates"] == 0 and stats["zombies"] == 0
    assert stats["lost_ranks"] == []  # no rank died: the crashes were in child processes
    assert stats["pool"] == pool
    assert all(r["alive"] for r in stats["ranks"].values()), stats["ranks"]


# --------------------------------------------------------------------------
# Worker ranks killed, stopped
# --------------------------------------------------------------------------

LONG_RUN = r"""
import concurrent.futures, json, os, sys, time
import taskfarm

D, N, SECONDS = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])

def work(i):
    open(os.path.join(D, f"{i}.{os.environ['TASKFARM_RANK']}.{os.getpid()}"), "w").close()
    time.sleep(SECONDS)
    return i * i

with taskfarm.FarmExecutor() as ex:
    fs = [ex.submit(work, i) for i in range(N)]
    concurrent.futures.wait(fs)
counts = {}
wrong = 0
for i, f in enumerate(fs):
    error = f.exception()
    kind = "ok" if error is None else type(error).__name__
    counts[kind] = counts.get(kind, 0) + 1
    wrong += error is None and f.result() != i * i
print("RESULT " + json.dumps({"counts": counts, "wrong": wrong}))
broken = [f.exception() for f in fs if isinstance(f.exception(), taskfarm.BrokenFarmError)]
if broken:
    raise broken[0]
"""


#: LONG_RUN, with the farm held open around a stopped rank: the script says
#: (in the file argv[4]) when the master has declared a rank lost, and keeps
#: the farm open after its tasks are done until a late result came in, so the
#: test needs no sleep to line the signals up with the farm
LOST_AND_BACK = LONG_RUN.replace(
    """    concurrent.futures.wait(fs)
""",
    """    def until(what, seconds=60.0):
        deadline = time.monotonic() + seconds
        while not what() and time.monotonic() < deadline:
            time.sleep(0.01)
        return what()

    until(lambda: ex.statistics().lost_ranks)
    with open(sys.argv[4] + ".tmp", "w") as fo:
        json.dump(list(ex.statistics().lost_ranks), fo)
    os.rename(sys.argv[4] + ".tmp", sys.argv[4])
    concurrent.futures.wait(fs)
    until(lambda: ex.statistics().zombies >= 1)
""",
)
assert LOST_AND_BACK != LONG_RUN


class Launched:
    """An mpiexec run in the background, with a hard timeout that kills its process group."""

    def __init__(self, args: Sequence[str], env: dict[str, str]) -> None:
        self.args = list(args)
        self.proc = subprocess.Popen(
            self.args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True
        )

    def finish(self, timeout: float) -> Result:
        try:
            out, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            out, err = self.proc.communicate()
            pytest.fail(f"timed out after {timeout} s\n{Result(self.args, -9, out, err).explain()}")
        return Result(self.args, self.proc.returncode, out, err)

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.communicate()


#: Open MPI's finalize can hang after ranks died; the farm then leaves after this
#: many seconds (TASKFARM_FINALIZE_TIMEOUT, 10 by default); short here to keep tests short
FINALIZE_TIMEOUT = "3"


def _launch(mpi: MPI, n: int, cli: Sequence[str], *, ft: bool = False) -> Launched:
    env = mpi.env({"TASKFARM_FINALIZE_TIMEOUT": FINALIZE_TIMEOUT})
    return Launched([*mpi.launch(n, ft=ft), mpi.python, "-m", "taskfarm", "run", *cli], env)


def _started(directory: Path) -> dict[int, int]:
    """Worker rank -> pid, from the files tasks leave when they start."""
    ranks = {}
    for path in directory.iterdir():
        _, rank, pid = path.name.split(".")
        ranks[int(rank)] = int(pid)
    return ranks


def _wait_for(
    what: Callable[[], bool], launched: Launched, timeout: float, waiting_for: str = "the fault to be injected"
) -> None:
    deadline = time.monotonic() + timeout
    while not what():
        if launched.proc.poll() is not None or time.monotonic() > deadline:
            res = launched.finish(10)
            pytest.fail(f"the run ended or stalled while waiting for {waiting_for}\n{res.explain()}")
        time.sleep(0.01)


def _events(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# -- a send to a dead peer, as ULFM reports it (fake MPI, no processes) ----------
class _FakeMPI:
    ERR_PROC_FAILED, ERR_PROC_FAILED_PENDING, ERR_REVOKED, ERR_IN_STATUS, ERR_OTHER = 75, 76, 77, 18, 1
    UNDEFINED = -32766

    class Exception(Exception):
        def __init__(self, error_class: int) -> None:
            super().__init__(error_class)
            self.error_class = error_class

        def Get_error_class(self) -> int:
            return self.error_class

    class Group:
        def __init__(self, members: list[int]) -> None:
            self.members = members

        def Get_size(self) -> int:
            return len(self.members)

        def Free(self) -> None:
            pass

        @staticmethod
        def Translate_ranks(group: Any, ranks: list[int], mine: Any) -> list[int]:
            return [group.members[i] for i in ranks]


class _FakeComm:
    def __init__(self, failed: list[int]) -> None:
        self.failed = failed

    def Ack_failed(self) -> None:
        pass

    def Get_failed(self) -> _FakeMPI.Group:
        return _FakeMPI.Group(self.failed)

    def Get_group(self) -> None:
        return None


def _transport_with_failed(failed: list[int]) -> Any:
    from taskfarm._transport import Transport

    t = Transport.__new__(Transport)  # no communicator: only the failure bookkeeping
    t._mpi = _FakeMPI
    t.comm = t.data = _FakeComm(failed)
    t.intercomm = False
    t._offset = 0
    t._dead, t._lost = set(), set()
    return t


def test_an_error_in_a_status_is_a_lost_peer_when_ulfm_knows_one() -> None:
    """Testsome over sends reports a dead peer as MPI_ERR_IN_STATUS, not
    MPI_ERR_PROC_FAILED: it was raised, and the service thread died with it
    (seen once in the bundled ULFM test below)."""
    t = _transport_with_failed([2])
    t._failed(_FakeMPI.Exception(_FakeMPI.ERR_IN_STATUS), None)
    assert t.take_lost() == [2]
    t._failed(_FakeMPI.Exception(_FakeMPI.ERR_PROC_FAILED), 3)
    assert t.take_lost() == [3]  # each loss reported once


@pytest.mark.parametrize("error_class", [_FakeMPI.ERR_IN_STATUS, _FakeMPI.ERR_OTHER])
def test_other_mpi_errors_are_raised(error_class: int) -> None:
    t = _transport_with_failed([] if error_class == _FakeMPI.ERR_IN_STATUS else [2])
    with pytest.raises(_FakeMPI.Exception):
        t._failed(_FakeMPI.Exception(error_class), None)
    assert t.take_lost() == []


@pytest.mark.ulfm
@pytest.mark.parametrize(("tasks", "seconds"), [(1000, 0.01), (4000, 0.001)], ids=["10ms", "1ms-bundled"])
def test_ulfm_killed_worker_rank_loses_no_task(
    openmpi: MPI, tmp_path: Path, script: Any, tasks: int, seconds: float
) -> None:
    """4 workers, 1,000 tasks of 10 ms; one worker rank SIGKILLed at a random point midway.
    With 1 ms tasks the rank holds bundles of calls: they go out again one call per task."""
    marks = tmp_path / "marks"
    marks.mkdir()
    stats_path, events_path = tmp_path / "stats.json", tmp_path / "events.jsonl"
    cli = ["--stats-json", str(stats_path), "--events", str(events_path), "-q"]
    launched = _launch(openmpi, 5, [*cli, str(script(LONG_RUN)), str(marks), str(tasks), str(seconds)], ft=True)
    try:
        kill_after = random.randint(tasks // 4, tasks // 2)  # tasks started
        _wait_for(lambda: len(os.listdir(marks)) >= kill_after, launched, 90)
        victim, pid = random.choice(sorted(_started(marks).items()))
        killed_at = time.time()
        os.kill(pid, signal.SIGKILL)
        res = launched.finish(120)
    finally:
        launched.kill()
    assert res.returncode == 0, res.explain()
    out = _result_line(res)
    assert out == {"counts": {"ok": tasks}, "wrong": 0}
    stats = read_json(stats_path)
    assert stats["done"] == tasks and stats["failed"] == 0
    assert stats["duplicates"] == 0
    if seconds < 0.005:
        assert stats["bundled"] > tasks // 2
    assert stats["lost_ranks"] == [victim]
    assert stats["ulfm"] is True
    assert stats["resubmitted"] >= 1  # it held tasks when it died
    assert not stats["ranks"][str(victim)]["alive"]

    events = _events(events_path)
    lost = [e for e in events if e["event"] == "rank_lost"]
    assert [e["rank"] for e in lost] == [victim]
    resubmitted = set(lost[0]["resubmitted"])
    assert len(resubmitted) == stats["resubmitted"]
    again = [e for e in events if e["event"] == "dispatched" and e["task"] in resubmitted and e["t"] >= lost[0]["t"]]
    assert {e["task"] for e in again} == resubmitted
    assert all(e["rank"] != victim for e in again)
    figures = {
        "killed_after_tasks_started": kill_after,
        "tasks_lost": tasks - out["counts"]["ok"],
        "duplicates": stats["duplicates"],
        "resubmitted": len(resubmitted),
        "detected_after_s": round(lost[0]["t"] - killed_at, 4),
        "resubmitted_after_s": round(min(e["t"] for e in again) - killed_at, 4),
        "wall_time_s": round(stats["wall_time"], 2),
    }
    print("FIGURES " + json.dumps(figures))


@pytest.mark.ulfm
def test_ulfm_every_worker_killed_breaks_the_farm(openmpi: MPI, tmp_path: Path, script: Any) -> None:
    marks = tmp_path / "marks"
    marks.mkdir()
    stats_path = tmp_path / "stats.json"
    launched = _launch(
        openmpi, 4, ["--stats-json", str(stats_path), str(script(LONG_RUN)), str(marks), "400", "0.02"], ft=True
    )
    try:
        _wait_for(lambda: len(_started(marks)) == 3 and len(os.listdir(marks)) >= 30, launched, 90)
        started = time.monotonic()
        for pid in _started(marks).values():
            os.kill(pid, signal.SIGKILL)
        res = launched.finish(60)
        ended_after = time.monotonic() - started
    finally:
        launched.kill()
    assert res.returncode == 3, res.explain()  # ExitCode.BROKEN
    assert "every worker rank of the farm was lost" in res.stderr
    out = _result_line(res)
    counts = out["counts"]
    assert out["wrong"] == 0
    assert set(counts) <= {"ok", "BrokenFarmError"} and counts["BrokenFarmError"] > 0
    assert sum(counts.values()) == 400
    stats = read_json(stats_path)
    assert sorted(stats["lost_ranks"]) == [1, 2, 3]
    assert stats["done"] == counts.get("ok", 0)
    assert stats["duplicates"] == 0
    assert ended_after < 30, "no hang after the last worker died"


@pytest.mark.parametrize(("tasks", "seconds"), [(150, 0.05), (3000, 0.001)], ids=["50ms", "1ms-bundled"])
def test_stopped_worker_rank_is_lost_then_its_late_results_count_once(
    mpi: MPI, tmp_path: Path, script: Any, tasks: int, seconds: float
) -> None:
    """SIGSTOP a worker rank: declared lost after heartbeat_timeout, tasks resubmitted;
    SIGCONT: its late results are zombies, discarded, and it still stops cleanly.
    With 1 ms tasks it holds bundles: their calls go out again one by one, and
    the bundle's late result is discarded whole."""
    marks = tmp_path / "marks"
    marks.mkdir()
    stats_path = tmp_path / "stats.json"
    lost = tmp_path / "lost.json"
    cli = ["--heartbeat-timeout", "1", "--stats-json", str(stats_path), "-q"]
    launched = _launch(mpi, 4, [*cli, str(script(LOST_AND_BACK)), str(marks), str(tasks), str(seconds), str(lost)])
    try:
        _wait_for(lambda: len(_started(marks)) == 3 and len(os.listdir(marks)) >= 20, launched, 90)
        victim, pid = sorted(_started(marks).items())[0]
        os.kill(pid, signal.SIGSTOP)
        try:
            _wait_for(lost.exists, launched, 60, "the stopped rank to be declared lost")
        finally:
            os.kill(pid, signal.SIGCONT)
        res = launched.finish(120)
    finally:
        launched.kill()
    assert res.returncode == 0, res.explain()
    assert read_json(lost) == [victim]
    assert _result_line(res) == {"counts": {"ok": tasks}, "wrong": 0}
    stats = read_json(stats_path)
    assert stats["lost_ranks"] == [victim]
    assert stats["done"] == tasks
    if seconds < 0.005:
        assert stats["bundled"] > tasks // 2
    assert stats["resubmitted"] >= 1
    assert stats["zombies"] >= 1  # its late results arrived, and were not counted as done
    assert stats["ranks"][str(victim)]["alive"] is False


def test_worker_rank_that_stays_stopped_cannot_hang_the_end(mpi: MPI, tmp_path: Path, script: Any) -> None:
    marks = tmp_path / "marks"
    marks.mkdir()
    stats_path = tmp_path / "stats.json"
    cli = ["--heartbeat-timeout", "1", "--stats-json", str(stats_path), "-q"]
    launched = _launch(mpi, 4, [*cli, str(script(LONG_RUN)), str(marks), "100", "0.02"])
    pid = 0
    try:
        _wait_for(lambda: len(_started(marks)) == 3 and len(os.listdir(marks)) >= 20, launched, 90)
        victim, pid = sorted(_started(marks).items())[0]
        os.kill(pid, signal.SIGSTOP)
        started = time.monotonic()
        res = launched.finish(60)
        ended_after = time.monotonic() - started
    finally:
        launched.kill()
        if pid:
            with_cont = [signal.SIGCONT, signal.SIGKILL]
            for sig in with_cont:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    break
    # every task finished on the others; the job is then ended by MPI_Abort(3)
    assert_aborted(res, mpi, 3)
    assert _result_line(res) == {"counts": {"ok": 100}, "wrong": 0}
    stats = read_json(stats_path)
    assert stats["did_not_stop"] == [victim]
    assert stats["lost_ranks"] == [victim] and stats["done"] == 100 and stats["duplicates"] == 0
    assert ended_after < 20  # heartbeat timeout + the short wait for a lost rank's Bye


# --------------------------------------------------------------------------
# The farm's own code failing on a worker rank
# --------------------------------------------------------------------------

SABOTAGE = r"""
import concurrent.futures, json, os, sys
import taskfarm

D, N, WHERE = sys.argv[1], int(sys.argv[2]), sys.argv[3]

def sabotage(where):
    # stands in for a bug in the farm itself, outside any task: the slot's
    # loop fails right after this task, or the next message taken in fails
    # whichever thread takes it (the comm thread, or a listening slot)
    from taskfarm import _worker

    def broken(self, *args):
        raise RuntimeError(f"a bug in the farm's worker: {where}")

    setattr(_worker.Worker, where, broken)
    return int(os.environ["TASKFARM_RANK"])

def work(i):
    open(os.path.join(D, f"{i}.{os.environ['TASKFARM_RANK']}"), "w").close()
    return i * i

with taskfarm.FarmExecutor() as ex:
    victim = ex.submit(sabotage, WHERE).result()
    fs = [ex.submit(work, i) for i in range(N)]
    concurrent.futures.wait(fs)
wrong = sum(f.exception() is not None or f.result() != i * i for i, f in enumerate(fs))
print("RESULT " + json.dumps({"victim": victim, "wrong": wrong}))
"""


@pytest.mark.parametrize(("pool", "where"), [("solo", "_maintain"), ("threads", "_maintain"), ("solo", "_handle")])
def test_a_worker_rank_whose_own_loop_fails_leaves_and_its_tasks_run_elsewhere(
    mpi: MPI, pool: str, where: str, tmp_path: Path, script: Any
) -> None:
    """An error in the worker's own code (not a task's) used to leave the
    rank sending heartbeats for the task its slot had held, or, in a message
    taken in by a listening slot, end the rank without a word to the master:
    the job hung.  Now the rank says Bye unasked and the master resubmits
    what it held."""
    if (pool, where) != ("solo", "_maintain") and mpi.name == "openmpi":
        pytest.skip("the pools and threads are MPI-agnostic; once under MPICH keeps the suite short")
    marks = tmp_path / "marks"
    marks.mkdir()
    stats_path = tmp_path / "stats.json"
    tasks = 200
    job = [str(script(SABOTAGE)), str(marks), str(tasks), where]
    res = farm_run(
        mpi,
        4,
        ["run", "--pool", pool, "--stats-json", str(stats_path), "-q", *job],
        timeout=90,
        check=0,
    )
    out = _result_line(res)
    assert out["wrong"] == 0
    victim = out["victim"]
    assert not [name for name in os.listdir(marks) if name.endswith(f".{victim}")], "a task ran on the failed rank"
    stats = read_json(stats_path)
    assert stats["lost_ranks"] == [victim]
    assert stats["done"] == tasks + 1 and stats["failed"] == 0 and stats["duplicates"] == 0
    assert stats["ranks"][str(victim)]["alive"] is False
