"""Stopping in time: SIGTERM/SIGINT/SIGUSR1, the deadline, cut-off tasks; then ``--resume``.

A drain stops dispatching, lets running tasks finish within ``--grace``,
flushes the journal, ends every rank and exits 75.  What reaches rank 0
depends on the launcher, so every test runs under both MPI wheels:

* MPICH's ``mpiexec`` passes SIGTERM, SIGINT and SIGUSR1 on to every rank;
* Open MPI's passes SIGUSR1 on, but on SIGTERM/SIGINT it ends the job itself
  within about half a second and exits 1, whatever the ranks do (the journal
  stays consistent; resume still works).  Hence the batch scripts turn
  Slurm's signals into SIGUSR1 for the launcher (docs/journal.md).
"""

from __future__ import annotations

import os
import pickle
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import MPI, alive, read_json
from test_resume import TIMEOUT, Job, farm, job_starter, lock_free, status, successes, wait_until

from taskfarm._journal import RUNNING, SUCCESS, read_journal

pytestmark = pytest.mark.mpi

#: seconds a drain may take beyond the grace (teardown, launcher)
DRAIN_SLACK = 10.0

WORK = """\
import json
import os
import sys
import time

from taskfarm import FarmExecutor, Task


def work(i, pause, flag):
    if flag and i >= 4 and not os.path.exists(flag):
        time.sleep(60)  # cut off by the drain
    time.sleep(pause)
    return i * i


n, pause, flag, out = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3], sys.argv[4]
isolation = sys.argv[5] if len(sys.argv) > 5 and sys.argv[5] else None
# while a gate file is named and missing, the last task waits (a countdown): see
# test_resume.GATED_JOB
gate = sys.argv[6] if len(sys.argv) > 6 else None
hold = 300.0 if gate is not None and not os.path.exists(gate) else None
with FarmExecutor() as ex:
    futures = [
        ex.submit_task(
            Task(work, (i, pause, flag), max_retries=0, isolation=isolation, countdown=hold if i == n - 1 else None)
        )
        for i in range(n)
    ]
    results = [f.result() for f in futures]
with open(out, "w") as fo:
    json.dump(results, fo)
"""


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Callable[..., Job]]:
    """Start a farm in the background (see test_resume.job_starter)."""
    yield from job_starter(tmp_path)


def threads_and_signals(pids: list[int]) -> str:
    """Each process's threads: name, state, pending, blocked and caught
    signals (hex masks, as /proc has them) and where each sleeps."""
    keys = ("State", "SigPnd", "ShdPnd", "SigBlk", "SigCgt")
    lines = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                command = f.read().replace(b"\0", b" ").decode(errors="replace")
            lines.append(f"pid {pid}: {command[:120]}")
            for tid in sorted(os.listdir(f"/proc/{pid}/task"), key=int):
                base = f"/proc/{pid}/task/{tid}"
                with open(f"{base}/status") as f:
                    fields = dict(line.split(":", 1) for line in f if ":" in line)
                with open(f"{base}/comm") as f, open(f"{base}/wchan") as g:
                    name, wchan = f.read().strip(), g.read().strip()
                shown = " ".join(f"{k}={fields.get(k, '?').strip()}" for k in keys)
                lines.append(f"  tid {tid} {name}: {shown} wchan={wchan}")
        except OSError as exc:
            lines.append(f"  ({exc})")
    return "\n".join(lines)


def check_resume(mpi: MPI, journal: Path, args: list[Any], n: int, out: Path) -> None:
    """Resume the stopped run: every result, each key with exactly one success."""
    wait_until(lambda: lock_free(journal), "the stopped job's ranks to be gone", timeout=30)
    farm(mpi, ["run", "-q", "--resume", "--journal", journal, *args])
    assert read_json(out) == [i * i for i in range(n)]
    st = read_journal(journal, results=False)
    assert len(st.tasks) == n
    assert all(e.state == SUCCESS and e.successes == 1 for e in st.tasks.values())
    status(mpi, journal, check=0)


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT", "SIGUSR1"])
def test_signal_to_the_launcher_drains_then_resume_completes(
    mpi: MPI, sig: str, script: Any, start: Callable[..., Job], tmp_path: Path
) -> None:
    n, grace = 600, 5
    path, journal, out, gate = script(WORK), tmp_path / "j", tmp_path / "out.json", tmp_path / "gate"
    args = [path, n, 0.005, "", out, "", gate]  # missing, the gate holds the last task back
    job = start(mpi, 3, ["run", "-q", "--grace", grace, "--journal", journal, *map(str, args)])
    wait_until(lambda: successes(journal) >= 60, "60 results", job)
    t0 = time.monotonic()
    job.proc.send_signal(getattr(signal, sig))
    res = job.finish(TIMEOUT)
    assert time.monotonic() - t0 < grace + DRAIN_SLACK, res.explain()
    forwarded = mpi.name == "mpich" or sig == "SIGUSR1"
    if forwarded:
        assert res.returncode == 75, res.explain()
        assert f"taskfarm: {sig}: draining" in res.stderr
    else:  # Open MPI's launcher ends the job itself
        assert res.returncode != 0, res.explain()
    wait_until(lambda: lock_free(journal), "the stopped job's ranks to be gone", timeout=30)
    st = read_journal(journal, results=False)
    assert 0 < st.counts()[SUCCESS] < n
    if forwarded:
        assert st.runs[-1]["status"] == "drained"
        assert st.counts()[RUNNING] == 0  # running tasks had their grace; nothing left half-done
    status(mpi, journal, check=75)
    gate.touch()
    check_resume(mpi, journal, args, n, out)


def test_sigterm_to_every_rank_drains(mpi: MPI, script: Any, start: Callable[..., Job], tmp_path: Path) -> None:
    """What Slurm does at the time limit under srun: every rank gets SIGTERM itself."""
    n = 600
    path, journal, out = script(WORK), tmp_path / "j", tmp_path / "out.json"
    args = [path, n, 0.005, "", out]
    job = start(mpi, 3, ["run", "-q", "--grace", 5, "--journal", journal, *map(str, args)])
    wait_until(lambda: successes(journal) >= 60, "60 results", job)
    ranks = job.ranks()
    assert len(ranks) == 3, ranks
    for pid in ranks:
        os.kill(pid, signal.SIGTERM)  # workers ignore it, rank 0 drains
    res = job.finish(TIMEOUT, check=75)
    assert res.stderr.count("taskfarm: SIGTERM: draining") == 1, res.explain()
    assert read_journal(journal, results=False).runs[-1]["status"] == "drained"
    check_resume(mpi, journal, args, n, out)


def test_deadline_drains_by_itself(mpi: MPI, script: Any, tmp_path: Path) -> None:
    # drain starts at deadline - grace - 10 s (teardown margin) = 4 s after start, when
    # the job has long run all but its last task, held back by the missing gate
    n, deadline = 1000, 15.0
    path, journal, out, gate = script(WORK), tmp_path / "j", tmp_path / "out.json", tmp_path / "gate"
    args = [path, n, 0.005, "", out, "", gate]
    t0 = time.monotonic()
    farm(mpi, ["run", "-q", "--deadline", deadline, "--grace", 1, "--journal", journal, *args], check=75)
    assert time.monotonic() - t0 < deadline
    st = read_journal(journal, results=False)
    assert 0 < st.counts()[SUCCESS] < n and st.runs[-1]["status"] == "drained"
    gate.touch()
    check_resume(mpi, journal, args, n, out)


@pytest.mark.parametrize("isolation", ["process", "inline"])
def test_task_cut_off_by_the_drain_runs_again_despite_max_retries_0(
    mpi: MPI, isolation: str, script: Any, start: Callable[..., Job], tmp_path: Path
) -> None:
    n = 8
    path, journal, out, flag = script(WORK), tmp_path / "j", tmp_path / "out.json", tmp_path / "flag"
    stats_path = tmp_path / "stats.json"
    args = [path, n, 0.0, flag, out, isolation]
    cli = ["run", "-q", "--grace", 0.5, "--journal", journal, "--stats-json", stats_path]
    job = start(mpi, 3, [*map(str, cli), *map(str, args)])
    wait_until(lambda: successes(journal) >= 4, "the quick tasks", job)
    t0 = time.monotonic()
    job.proc.send_signal(signal.SIGUSR1)
    # when rank 0 took the signal: a drain that began late and a job that ended
    # late look alike in the total (it took ~60 s, twice, in clean-clone runs;
    # the drain itself began late).  If it has not begun in time, where each
    # process's threads are and what signals they hold goes into the failure.
    def draining() -> bool:
        return "taskfarm: SIGUSR1: draining" in job.err.read_text(errors="replace")

    snapshot = ""
    deadline = t0 + DRAIN_SLACK
    while not draining() and job.running() and time.monotonic() < deadline:
        time.sleep(0.01)
    if not draining() and job.running():
        snapshot = f"\nstill no drain after {DRAIN_SLACK:.0f} s:\n{threads_and_signals(job.processes())}"
    wait_until(draining, "the drain", job, TIMEOUT)
    began = time.monotonic() - t0
    # a drain that began in time and a job that still ended late (~60 s, once
    # in a clean-clone run, with both ranks reported as not stopping): where
    # each process's threads are once the job should have ended
    end_deadline = t0 + 0.5 + DRAIN_SLACK
    while job.running() and time.monotonic() < end_deadline:
        time.sleep(0.01)
    if job.running():
        snapshot += (
            f"\nstill running {0.5 + DRAIN_SLACK:.1f} s after the signal:\n{threads_and_signals(job.processes())}"
        )
    res = job.finish(TIMEOUT)
    assert time.monotonic() - t0 < 0.5 + DRAIN_SLACK, (
        f"the drain began {began:.1f} s after the signal{snapshot}\n{res.explain()}"
    )
    # the workers kill their tasks' processes, or cut inline tasks off (a
    # signal on the main thread), and stop cleanly: no MPI_Abort
    assert res.returncode == 75, res.explain()
    assert read_json(stats_path)["did_not_stop"] == [], res.explain()
    wait_until(lambda: lock_free(journal), "the stopped job's ranks to be gone", timeout=30)
    st = read_journal(journal, results=False)
    cut = [e for e in st.tasks.values() if e.state != SUCCESS]
    assert cut and all(e.attempts == 0 and e.state != "FAILURE" for e in cut), cut
    flag.touch()
    check_resume(mpi, journal, args, n, out)
    st = read_journal(journal, results=False)
    assert all(st.tasks[e.key].attempts == 1 for e in cut)  # the cut-off attempt never counted


def test_a_drain_stops_running_commands_and_their_ranks_stop_cleanly(
    mpi: MPI, start: Callable[..., Job], tmp_path: Path
) -> None:
    """Shell commands still running when a drain's grace runs out are stopped
    (SIGTERM, which a command on a worker rank ignores as the rank does, then
    SIGKILL 0.5 s later) and their workers stop cleanly: exit 75, no MPI_Abort.
    Before, the worker waited 5 s for the SIGKILL, the master gave up after
    2 s and ended the job with MPI_Abort (MPICH: 75 or 9), and the commands
    ran on, orphaned, beside the resumed run that started them again."""
    pids = [tmp_path / f"pid{i}" for i in range(2)]
    lines = [f"echo $$ > {pid}.tmp && mv {pid}.tmp {pid} && exec sleep 60" for pid in pids]
    tasks = tmp_path / "tasks.txt"
    tasks.write_text("\n".join(["true", "true", *lines, "true"]) + "\n")
    journal, stats_path = tmp_path / "j", tmp_path / "stats.json"
    cli = ["run", "-q", "--grace", 0.5, "--journal", journal, "--stats-json", stats_path]
    cli += ["--run-dir", tmp_path / "run", "--tasks", tasks]  # not the repository's ./taskfarm-run
    job = start(mpi, 3, cli)
    wait_until(lambda: all(pid.exists() for pid in pids), "both long commands to start", job)
    job.proc.send_signal(signal.SIGUSR1)
    res = job.finish(TIMEOUT)
    assert res.returncode == 75, res.explain()
    assert read_json(stats_path)["did_not_stop"] == [], res.explain()
    running = [pid for pid in (int(p.read_text()) for p in pids) if alive(pid)]
    assert not running, f"commands left running: {running}"


BUNDLE_CUT = """\
import json
import os
import signal
import sys
import time

from taskfarm import FarmExecutor


def call(i, pidfile, gate, ledger):
    if i == CUT_AT and not os.path.exists(gate):
        with open(pidfile) as f:
            os.kill(int(f.read()), signal.SIGUSR1)  # the drain begins as this call starts
        time.sleep(60)
    if ledger:  # what ran to its end, whatever the journal says
        fd = os.open(ledger, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        os.write(fd, f"{i}\\n".encode())
        os.close(fd)
    return i


gate, out, pidfile, ledger = sys.argv[1:5]
with open(pidfile, "w") as f:
    f.write(str(os.getpid()))
with FarmExecutor() as ex:
    for f in [ex.submit(call, -1, "", "", "") for _ in range(50)]:
        f.result()  # the function is timed as quick: its calls are bundled
    futures = [ex.submit(call, i, pidfile, gate, ledger) for i in range(N_CALLS)]
    results = [f.result() for f in futures]
with open(out, "w") as fo:
    json.dump(results, fo)
"""
#: calls in the job, and the one whose start begins the drain
BUNDLE_CUT_N, BUNDLE_CUT_AT = 300, 150


def test_calls_done_when_a_drain_cuts_their_bundle_off_are_journaled(
    mpi: MPI, script: Any, start: Callable[..., Job], tmp_path: Path
) -> None:
    """A call that ended shortly before the drain's grace ran out used to be
    lost: its result waited for company, or for its bundle (`RESULT_LINGER`),
    when Stop came, and rank 0 dropped what came after the drain ended.  A
    resumed run did it again (7-37 of the 150 calls before the cut, in four
    runs here).  Now a worker sends what it has done when Stop comes, and
    rank 0 journals the successes of the calls the drain cut off."""
    text = BUNDLE_CUT.replace("CUT_AT", str(BUNDLE_CUT_AT)).replace("N_CALLS", str(BUNDLE_CUT_N))
    gate, out, pidfile, ledger = (tmp_path / name for name in ("gate", "out.json", "pid", "ledger"))
    journal, stats_path = tmp_path / "j", tmp_path / "stats.json"
    args = [script(text), gate, out, pidfile, ledger]
    cli = ["run", "-q", "--grace", 0.1, "--journal", journal, "--stats-json", stats_path]
    job = start(mpi, 3, [*map(str, cli), *map(str, args)])
    res = job.finish(TIMEOUT)
    # the call that began it is cut off (a signal: it runs inline on the main
    # thread), the rest of its bundle never runs, and the ranks stop cleanly
    assert res.returncode == 75, res.explain()
    assert read_json(stats_path)["did_not_stop"] == [], res.explain()
    wait_until(lambda: lock_free(journal), "the stopped job's ranks to be gone", timeout=30)
    ran = {int(line) for line in ledger.read_text().split()}
    done = {value for value, _ in _successes(journal)}
    assert ran and ran <= done, f"ran to the end but not journaled: {sorted(ran - done)}"
    assert BUNDLE_CUT_AT not in done
    gate.touch()
    farm(mpi, ["run", "-q", "--resume", "--journal", journal, *args])
    assert read_json(out) == list(range(BUNDLE_CUT_N))
    calls = sorted(item for item in _successes(journal) if item[0] >= 0)  # not the warm-up's
    assert calls == [(i, 1) for i in range(BUNDLE_CUT_N)], calls


def _successes(journal: Path) -> list[tuple[Any, int]]:
    """Each succeeded key's value and how many successes it has."""
    st = read_journal(journal)
    return [(pickle.loads(e.result[0]), e.successes) for e in st.tasks.values() if e.state == SUCCESS and e.result]


THREAD_MASKS = """\
import json
import os
import sys
import threading

from taskfarm import FarmExecutor


def masks():
    out = {}
    for tid in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{tid}/status") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
        out[tid] = [fields["Name"].strip(), int(fields["SigBlk"], 16)]
    return out


with FarmExecutor() as ex:
    ex.submit(abs, -1).result()  # the farm is up, its threads and MPI's too
    report = {"main": str(threading.get_native_id()), "threads": masks()}
with open(sys.argv[1], "w") as out:
    json.dump(report, out)
"""


def test_only_the_main_thread_of_rank_0_takes_the_drain_signals(mpi: MPI, script: Any, tmp_path: Path) -> None:
    """The kernel hands a signal to any thread that does not block it, and
    Python runs its handler only when the main thread runs Python: a drain
    signal taken by another thread while the main thread waited in
    ``result()`` began the drain only when that task ended (60 s late, ~1 run
    in 10 of the test above).  Every other thread of rank 0 (the farm's, and
    those MPI started) must block them."""
    out = tmp_path / "masks.json"
    farm(mpi, ["run", "-q", script(THREAD_MASKS), out])
    report = read_json(out)
    drain_bits = {1 << (int(sig) - 1) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)}
    main = report["threads"].pop(report["main"])
    assert not any(main[1] & bit for bit in drain_bits), main
    assert report["threads"], "rank 0 runs no other thread: the farm's service thread is missing"
    threads = report["threads"].items()
    open_to_them = {tid: name for tid, (name, mask) in threads if not all(mask & b for b in drain_bits)}
    assert not open_to_them, f"threads of rank 0 that can take a drain signal: {open_to_them}"


LONE_WAIT = """\
import os
import sys
import time

from taskfarm import FarmExecutor, Task


def wait_for(path):
    while not os.path.exists(path):
        time.sleep(0.01)
    return path


warm, ready = sys.argv[1], sys.argv[2]
with FarmExecutor() as ex:
    # every worker runs a task first, so that every worker's rings have come
    blockers = [ex.submit_task(Task(wait_for, (warm,), time_limit=120)) for _ in range(ex.workers)]
    open(warm, "w").close()
    [b.result() for b in blockers]
    # in a process of its own, which the drain can cut off: the ranks stop cleanly
    lone = ex.submit_task(Task(wait_for, (warm + ".never",), isolation="process"))
    open(ready, "w").close()
    lone.result()  # the signal comes while this thread listens for the farm's only task
"""


def test_a_drain_signal_reaches_a_main_thread_that_listens_for_the_only_task(
    mpi: MPI, script: Any, start: Callable[..., Job], tmp_path: Path
) -> None:
    """A main thread waiting for the farm's only task sleeps on the doorbell
    and runs rounds of the farm itself, with the drain signals held back
    while it does (taskfarm._master, "Short cuts"): it must take them again,
    and a signal that comes while it sleeps must start the drain."""
    warm, ready = tmp_path / "warm", tmp_path / "ready"
    job = start(mpi, 3, ["run", "-q", "--grace", 1, script(LONE_WAIT), warm, ready])
    wait_until(ready.exists, "the lone task to be submitted", job)
    t0 = time.monotonic()
    job.proc.send_signal(signal.SIGUSR1)  # both launchers pass it on
    res = job.finish(TIMEOUT)
    assert time.monotonic() - t0 < 1 + DRAIN_SLACK, res.explain()
    assert res.returncode == 75, res.explain()
    assert "taskfarm: SIGUSR1: draining" in res.stderr
