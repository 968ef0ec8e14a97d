"""The journal end to end: durable results, task keys, ``--resume`` after a kill, damage, locking, status.

Every test runs real farms under ``mpiexec``; those whose outcome depends on
the launcher (a kill, a lock held by a live job) run under both MPI wheels,
the others under MPICH only.  Background jobs write their output to files and
are killed (whole process group) at teardown, so nothing outlives a test.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import pickle
import random
import re
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import conftest
import pytest
from conftest import MPI, ROOT, Result, farm_run, read_json, run

from taskfarm import _journal_writer as journal_writer
from taskfarm._journal import SUCCESS, read_journal
from taskfarm._journal_writer import JournalWriter

pytestmark = pytest.mark.mpi

TIMEOUT = 90.0
#: tasks of the kill test (the brief's 2,000)
KILL_TASKS = 2000

JOB = """\
import json
import sys
import time

import numpy as np
from taskfarm import FarmExecutor


def work(i):
    time.sleep(0.001)
    return {"i": i, "sq": i * i, "arr": np.arange(4, dtype=np.float64) * i}


n, out = int(sys.argv[1]), sys.argv[2]
with FarmExecutor() as ex:
    results = [{"i": r["i"], "sq": r["sq"], "arr": r["arr"].tolist()} for r in ex.map(work, range(n))]
with open(out, "w") as f:
    json.dump(results, f)
"""

#: JOB whose last task waits (a countdown) while a gate file is named and missing:
#: a run signalled midway cannot have finished before the signal lands, whether
#: the launcher passes it on (a drain leaves a task that has not started) or ends
#: the job itself, however slowly (Open MPI's took 0.5 s here, with ~500 of the
#: 2,000 tasks left)
GATED_JOB = (
    JOB.replace("from taskfarm import FarmExecutor", "from taskfarm import FarmExecutor, Task")
    .replace("import json\n", "import json\nimport os\n")
    .replace(
        """with FarmExecutor() as ex:
    results = [{"i": r["i"], "sq": r["sq"], "arr": r["arr"].tolist()} for r in ex.map(work, range(n))]
""",
        """gate = sys.argv[3] if len(sys.argv) > 3 else None
hold = 300.0 if gate is not None and not os.path.exists(gate) else None
with FarmExecutor() as ex:
    last = ex.submit_task(Task(work, (n - 1,), countdown=hold))
    rows = [*ex.map(work, range(n - 1)), last.result()]
    results = [{"i": r["i"], "sq": r["sq"], "arr": r["arr"].tolist()} for r in rows]
""",
    )
)
assert GATED_JOB.count("countdown=hold") == 1 and "import os" in GATED_JOB


def expected(n: int) -> list[dict[str, Any]]:
    return [{"i": i, "sq": i * i, "arr": [float(k * i) for k in range(4)]} for i in range(n)]


# --------------------------------------------------------------------------
# background jobs
# --------------------------------------------------------------------------


@dataclasses.dataclass
class Job:
    """A farm running in the background, in its own session (process group)."""

    proc: subprocess.Popen[bytes]
    args: list[str]
    out: Path
    err: Path
    started: float

    def output(self, returncode: int) -> Result:
        return Result(self.args, returncode, self.out.read_text(), self.err.read_text())

    def running(self) -> bool:
        return self.proc.poll() is None

    def processes(self) -> list[int]:
        """The launcher and every process under it (proxies, ranks).

        Both launchers put ranks in process groups (MPICH: sessions) of their
        own, so signalling the launcher's group would miss them.
        """
        return [self.proc.pid, *descendants(self.proc.pid)]

    def ranks(self) -> list[int]:
        """The processes running this job's Python (rank 0 first: the lowest pid)."""
        python = os.path.realpath(self.args[self.args.index("-m") - 1])
        found = []
        for pid in descendants(self.proc.pid):
            try:
                if os.path.realpath(f"/proc/{pid}/exe") == python:
                    found.append(pid)
            except OSError:
                pass
        return sorted(found)

    def kill_all(self, sig: int = signal.SIGKILL) -> None:
        """Signal every process of the job at once (as a node failure or walltime kill does)."""
        for pid in self.processes():
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    def finish(self, timeout: float, check: int | None = None) -> Result:
        """Wait for the launcher; on timeout kill the job and fail with its output."""
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill_all()
            self.proc.wait()
            pytest.fail(f"timed out after {timeout} s\n{self.output(-9).explain()}")
        res = self.output(code)
        if check is not None and code != check:
            pytest.fail(f"expected exit code {check}\n{res.explain()}")
        return res


def job_starter(tmp_path: Path) -> Iterator[Callable[..., Job]]:
    """Yields ``start(mpi, n, cli_args)``; every job it started is killed afterwards."""
    jobs: list[Job] = []

    def start_job(mpi: MPI, n: int, cli_args: list[str], env: dict[str, str] | None = None) -> Job:
        i = len(jobs)
        out, err = tmp_path / f"job{i}.out", tmp_path / f"job{i}.err"
        args = [*mpi.launch(n), mpi.python, "-m", "taskfarm", *map(str, cli_args)]
        with open(out, "wb") as fo, open(err, "wb") as fe:
            proc = subprocess.Popen(args, stdout=fo, stderr=fe, env=mpi.env(env), cwd=ROOT, start_new_session=True)
        job = Job(proc, args, out, err, time.monotonic())
        jobs.append(job)
        return job

    yield start_job
    for job in jobs:
        job.kill_all()  # ranks too, even if the launcher is gone
        job.proc.wait()


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Callable[..., Job]]:
    """Start ``mpiexec -n N python -m taskfarm ARGS`` in the background; killed at teardown."""
    yield from job_starter(tmp_path)


def descendants(root: int) -> list[int]:
    """Every process below ``root`` (from /proc), parents before children."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    out: list[int] = []
    todo = [root]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def wait_until(cond: Callable[[], bool], what: str, job: Job | None = None, timeout: float = 60.0) -> None:
    """`conftest.wait_until`, failing at once with ``job``'s output if it ends first."""
    if job is None:
        conftest.wait_until(cond, what, timeout)
        return
    conftest.wait_until(
        cond,
        what,
        timeout,
        ended=lambda: None if job.running() else "the job ended\n" + job.output(job.proc.returncode).explain(),
        context=lambda: job.output(-1).explain(),
    )


def size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def successes(journal: Path) -> int:
    """Tasks with a recorded success (reads while a farm writes; no lock needed)."""
    try:
        return read_journal(journal, results=False).counts()[SUCCESS]
    except FileNotFoundError:
        return 0
    except Exception:  # noqa: BLE001 - not created yet, or its header not yet written
        return 0


def lock_free(journal: Path) -> bool:
    """True once no process holds the journal's write lock (a killed job's ranks are gone)."""
    fd = os.open(str(journal) + ".lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)
    return True


def status(mpi: MPI, journal: Path, *more: str, check: int | None = None) -> Result:
    return run(
        [mpi.python, "-m", "taskfarm", "status", str(journal), *more], timeout=TIMEOUT, env=mpi.env(), check=check
    )


def farm(mpi: MPI, cli_args: list[Any], *, check: int | None = 0, timeout: float = TIMEOUT) -> Result:
    """``mpiexec -n 3 python -m taskfarm CLI_ARGS`` (arguments of any type, as strings)."""
    return farm_run(mpi, 3, [str(a) for a in cli_args], timeout=timeout, check=check)


def taskfarm_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("taskfarm:")]


# --------------------------------------------------------------------------
# kill at a random point, resume
# --------------------------------------------------------------------------

_reference: dict[str, tuple[list[Any], int]] = {}


def reference(mpi: MPI, tmp: Path) -> tuple[list[Any], int]:
    """Results and journal size of an uninterrupted run (once per MPI)."""
    if mpi.name not in _reference:
        (tmp / "job.py").write_text(GATED_JOB)
        journal, out = tmp / "ref.journal", tmp / "ref.json"
        farm(mpi, ["run", "-q", "--journal", journal, tmp / "job.py", KILL_TASKS, out])
        _reference[mpi.name] = (read_json(out), size(journal))
    return _reference[mpi.name]


@pytest.mark.parametrize("sig", ["SIGKILL", "SIGTERM"])
def test_killed_at_random_point_resume_gives_every_result_once(
    mpi: MPI, sig: str, start: Callable[..., Job], tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    ref_results, ref_size = reference(mpi, tmp_path_factory.mktemp(f"ref-{mpi.name}"))
    assert ref_results == expected(KILL_TASKS)
    script = tmp_path / "job.py"
    script.write_text(GATED_JOB)
    journal = tmp_path / "farm.journal"
    frac = random.Random(f"{mpi.name}/{sig}").uniform(0.2, 0.8)
    gate = tmp_path / "gate"  # missing: the last task waits, so the job cannot finish first
    job = start(
        mpi,
        3,
        ["run", "-q", "--grace", "5", "--journal", journal, script, KILL_TASKS, tmp_path / "first.json", gate],
    )
    wait_until(lambda: size(journal) >= frac * ref_size, f"the journal to reach {frac:.0%}", job)
    if sig == "SIGKILL":
        job.kill_all(signal.SIGKILL)  # every process at once, as a node failure does
        res = job.finish(TIMEOUT)
        assert res.returncode == -signal.SIGKILL
    else:
        job.proc.send_signal(signal.SIGTERM)  # to the launcher, which passes it on
        res = job.finish(TIMEOUT)
        # Open MPI's launcher ends the job itself on SIGTERM and exits 1 (docs/journal.md)
        assert res.returncode == 75 if mpi.name == "mpich" else res.returncode != 0, res.explain()
    wait_until(lambda: lock_free(journal), "the killed job's ranks to be gone", timeout=30)
    before = read_journal(journal)
    done = before.counts()[SUCCESS]
    assert 0 < done < KILL_TASKS, f"killed at {frac:.0%} of the bytes but {done} tasks were done"
    st = status(mpi, journal, "--json", check=75)
    assert json.loads(st.stdout)["counts"][SUCCESS] == done
    if sig == "SIGTERM" and mpi.name == "mpich":
        assert before.runs[-1]["status"] == "drained"

    gate.touch()  # the resumed run's last task does not wait
    stats = tmp_path / "stats.json"
    farm(
        mpi,
        [
            "run",
            "-q",
            "--resume",
            "--journal",
            journal,
            "--stats-json",
            stats,
            script,
            KILL_TASKS,
            tmp_path / "second.json",
            gate,
        ],
    )
    assert read_json(tmp_path / "second.json") == ref_results
    after = read_journal(journal)
    assert len(after.tasks) == KILL_TASKS
    bad = {k: (e.state, e.successes) for k, e in after.tasks.items() if (e.state, e.successes) != (SUCCESS, 1)}
    assert not bad, f"{len(bad)} keys without exactly one success: {list(bad.items())[:5]}"
    counts = read_json(stats)
    assert counts["resume"]["reused"] == done  # finished tasks were not run again
    assert counts["submitted"] == KILL_TASKS - done
    status(mpi, journal, check=0)


# --------------------------------------------------------------------------
# the writer's bookkeeping (no MPI)
# --------------------------------------------------------------------------


def _frame(value: object) -> tuple[bytes, list[Any]]:
    return pickle.dumps(value, 5), []


def test_writer_forgets_finished_tasks_and_aliases_late_records(tmp_path: Path) -> None:
    path = tmp_path / "j"
    with JournalWriter(path) as w:
        for i in range(100):
            w.submitted(f"k{i}", label="f", t=0.0)
            w.dispatched(f"k{i}", rank=1, attempt=1, t=0.0)
            if i % 10 == 0:
                w.failed(f"k{i}", rank=1, attempt=1, t=0.0, error=None, error_text="x", final=True)
            elif i % 10 == 1:
                w.failed(f"k{i}", rank=1, attempt=1, t=0.0, error=None, error_text="cut", final=False)
            else:
                w.succeeded(f"k{i}", rank=1, attempt=1, t_start=0.0, t_end=1.0, result=_frame(i))
        assert sorted(w._live) == [f"k{i}" for i in range(1, 100, 10)]  # only the unfinished
        w.succeeded("k2", rank=2, attempt=1, t_start=2.0, t_end=3.0, result=_frame("late"))  # an ALIAS
        w.cancelled("k0", t=4.0)  # a late record about a failed task: it stays failed
    st = read_journal(path)
    assert st.counts() == {"PENDING": 0, "RUNNING": 0, "RETRY": 10, SUCCESS: 80, "FAILURE": 10, "CANCELLED": 0}
    assert pickle.loads(st.tasks["k2"].result[0]) == 2 and st.tasks["k2"].successes == 2
    assert st.task_ids == 102
    with JournalWriter(path) as w:  # a resumed run: fresh ids continue after the old ones
        assert w._next_id == 102 and not w._live
        w.submitted("k1", label="f", t=5.0)
        w.dispatched("k1", rank=1, attempt=1, t=5.0)
        w.succeeded("k1", rank=1, attempt=1, t_start=5.0, t_end=6.0, result=_frame("one"))
    assert pickle.loads(read_journal(path).tasks["k1"].result[0]) == "one"


def test_version_1_journal_is_read_and_continued(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "j"
    monkeypatch.setattr(journal_writer, "FORMAT_VERSION", 1)  # the version it writes
    with JournalWriter(path) as w:  # version 1: one id per distinct key
        w.submitted("a", label="f", t=0.0)
        w.submitted("b", label="f", t=0.0)
        w.succeeded("a", rank=1, attempt=1, t_start=0.0, t_end=1.0, result=_frame("A"))
    monkeypatch.undo()
    with JournalWriter(path) as w:  # appended by the version 1 rule, never mixed
        w.submitted("a", label="f", t=2.0)
        w.submitted("c", label="f", t=2.0)
        w.succeeded("c", rank=1, attempt=1, t_start=2.0, t_end=3.0, result=_frame("C"))
        w.succeeded("b", rank=1, attempt=1, t_start=2.0, t_end=3.0, result=_frame("B"))
    st = read_journal(path)
    assert st.format_version == 1
    assert {k: pickle.loads(e.result[0]) for k, e in st.tasks.items()} == {"a": "A", "b": "B", "c": "C"}


def test_discard_leaves_the_journal_as_it_was(tmp_path: Path) -> None:
    path = tmp_path / "j"
    with JournalWriter(path) as w:
        w.submitted("a", label="f", t=0.0)
    before = path.read_bytes()
    w = JournalWriter(path)
    w.run_started({"x": 1})
    w.submitted("b", label="g", t=1.0)
    w.sync()
    w.submitted("c", label="g", t=1.0)
    w.discard()
    assert path.read_bytes() == before
    with JournalWriter(path):  # the lock was released
        pass


# --------------------------------------------------------------------------
# task keys are the same in every process
# --------------------------------------------------------------------------

DIGESTS = """\
import functools
import sys
import time

import numpy as np
from taskfarm._resume import function_digest

K = 3


def work(i, scale=2.0):
    time.sleep(0.001)
    return {"arr": np.arange(4.0) * i * K * scale, "k": i in {"a", "b", "c"}}


def make(k):
    def inner(x):
        return work(x) if x in {"p", "q", "r"} else k

    return inner


print(function_digest(work).hex(), function_digest(make(5)).hex(), function_digest(make(6)).hex(),
      function_digest(functools.partial(work, scale=3)).hex())
"""


def test_function_digest_is_the_same_under_any_hash_seed(mpich: MPI, tmp_path: Path) -> None:
    # dill's payload lists a function's globals in set order, which follows the hash seed
    path = tmp_path / "digests.py"

    def digests(text: str, seed: int) -> list[str]:
        path.write_text(text)
        env = mpich.env({"PYTHONHASHSEED": str(seed)})
        return run([mpich.python, str(path)], timeout=TIMEOUT, env=env, check=0).stdout.split()

    first = digests(DIGESTS, 1)
    assert len(set(first)) == 4  # closures over other values, partials: other digests
    assert all(digests(DIGESTS, seed) == first for seed in (2, 3, 4))
    assert digests("# a comment moves every line\n" + DIGESTS, 5) == first
    changed = digests(DIGESTS.replace("i * K * scale", "i * K + scale"), 6)
    assert changed[0] != first[0] and changed[3] != first[3]


# --------------------------------------------------------------------------
# durability, results of any type
# --------------------------------------------------------------------------


def test_result_is_in_the_journal_before_its_future_resolves(mpich: MPI, script: Any, tmp_path: Path) -> None:
    path = script(
        """\
import concurrent.futures as cf
import json
import sys

from taskfarm import FarmExecutor
from taskfarm._journal import read_journal


def f(i):
    return i


journal, out = sys.argv[1], sys.argv[2]
missing = []
with FarmExecutor() as ex:
    futures = [ex.submit(f, i) for i in range(60)]
    for fut in cf.as_completed(futures):
        entry = read_journal(journal, results=False).tasks.get(fut.key)
        if entry is None or entry.state != "SUCCESS":
            missing.append(fut.key)
with open(out, "w") as fo:
    json.dump(missing, fo)
"""
    )
    journal, out = tmp_path / "j", tmp_path / "out.json"
    farm(mpich, ["run", "-q", "--journal", journal, path, journal, out])
    assert read_json(out) == []


def test_numpy_results_come_back_from_the_journal(mpich: MPI, script: Any, tmp_path: Path) -> None:
    path = script(
        """\
import json
import sys

import numpy as np
from taskfarm import FarmExecutor


def big(i):
    return {"a": np.full((200, 100), float(i)), "f": np.asfortranarray(np.arange(6.0).reshape(2, 3) + i),
            "s": "x" * i}


with FarmExecutor() as ex:
    res = list(ex.map(big, range(8)))
ok = all(
    r["a"].shape == (200, 100) and (r["a"] == i).all() and r["a"].flags.writeable and r["a"].flags.aligned
    and (r["f"] == np.arange(6.0).reshape(2, 3) + i).all() and r["s"] == "x" * i
    for i, r in enumerate(res)
)
with open(sys.argv[1], "w") as fo:
    json.dump(ok, fo)
"""
    )
    journal, stats = tmp_path / "j", tmp_path / "stats.json"
    farm(mpich, ["run", "-q", "--journal", journal, path, tmp_path / "1.json"])
    farm(mpich, ["run", "-q", "--resume", "--journal", journal, "--stats-json", stats, path, tmp_path / "2.json"])
    assert read_json(tmp_path / "1.json") is True
    assert read_json(tmp_path / "2.json") is True
    counts = read_json(stats)
    assert (counts["resume"]["reused"], counts["submitted"]) == (8, 0)


def test_bundled_plain_values_come_back_from_the_journal(mpich: MPI, script: Any, tmp_path: Path) -> None:
    """Bundled calls whose values ride as they are (plain types) are journaled
    one pickle each on rank 0, and a resumed run gets every value back, of its type."""
    path = script(
        """\
import json
import sys

from taskfarm import FarmExecutor


def plain(i):
    return [None, i % 2 == 0, i, i / 4, complex(i, 1), str(i), bytes([i % 256])][i % 7]


with FarmExecutor() as ex:
    list(ex.map(plain, range(50), chunksize=1))  # timed: the burst below can be bundled
    futures = [ex.submit(plain, i) for i in range(600)]
    values = [f.result(90) for f in futures]
ok = all(v == plain(i) and type(v) is type(plain(i)) for i, v in enumerate(values))
with open(sys.argv[1], "w") as fo:
    json.dump(ok, fo)
"""
    )
    journal, first, again = tmp_path / "j", tmp_path / "first.json", tmp_path / "again.json"
    farm(mpich, ["run", "-q", "--journal", journal, "--stats-json", first, path, tmp_path / "1.json"])
    farm(mpich, ["run", "-q", "--resume", "--journal", journal, "--stats-json", again, path, tmp_path / "2.json"])
    assert read_json(tmp_path / "1.json") is True
    assert read_json(tmp_path / "2.json") is True
    assert read_json(first)["bundled"] > 300  # most of the burst rode in bundles
    counts = read_json(again)
    assert (counts["resume"]["reused"], counts["submitted"]) == (650, 0)


API_JOB = """\
import json
import os
import sys

from taskfarm import FarmExecutor


def cube(i):
    return i**3


journal, out = sys.argv[1], sys.argv[2]
workers = {"max_workers": 2} if len(sys.argv) > 3 else {}  # spawn mode: plain python
ex = FarmExecutor(journal=journal, resume=os.path.exists(journal), **workers)
with ex:
    results = list(ex.map(cube, range(30)))
with open(out, "w") as fo:
    json.dump({"results": results, "resume": ex.statistics().resume}, fo)
"""


@pytest.mark.parametrize("mode", ["mpiexec", "spawn"])
def test_executor_journal_argument(mode: str, mpich: MPI, script: Any, tmp_path: Path) -> None:
    path, journal, out = script(API_JOB), tmp_path / "j", tmp_path / "out.json"
    if mode == "mpiexec":  # no taskfarm run: the script's own FarmExecutor opens the journal
        cmd = [*mpich.launch(3), mpich.python, str(path), str(journal), str(out)]
    else:
        cmd = [mpich.python, str(path), str(journal), str(out), "spawn"]
    run(cmd, timeout=TIMEOUT, env=mpich.env(), check=0)
    assert read_json(out) == {"results": [i**3 for i in range(30)], "resume": None}
    run(cmd, timeout=TIMEOUT, env=mpich.env(), check=0)
    got = read_json(out)
    assert got["results"] == [i**3 for i in range(30)]
    assert (got["resume"]["reused"], got["resume"]["new"]) == (30, 0)
    st = read_journal(journal)
    assert len(st.tasks) == 30 and len(st.runs) == 2 and st.runs[-1]["status"] == "complete"


# --------------------------------------------------------------------------
# task identity: user keys, task files, other work
# --------------------------------------------------------------------------

KEYED = """\
import json
import sys

from taskfarm import FarmExecutor, Task


def f(i, offset):
    return i * i + offset


n, offset, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
with FarmExecutor() as ex:
    futures = [ex.submit_task(Task(f, (i, offset), key=f"run-{i}", label=f"sq{i}")) for i in range(n)]
    results = [fut.result() for fut in futures]
with open(out, "w") as fo:
    json.dump(results, fo)
"""


def test_user_keys_resume_and_refuse_other_content(mpich: MPI, script: Any, tmp_path: Path) -> None:
    path = script(KEYED)
    journal, stats, out = tmp_path / "j", tmp_path / "stats.json", tmp_path / "out.json"
    farm(mpich, ["run", "-q", "--journal", journal, path, 20, 0, out])
    assert read_journal(journal).tasks["run-3"].label.startswith("sq3 [")
    # same keys, same content (the labels given to Task do not break it): all reused
    farm(mpich, ["run", "-q", "--resume", "--journal", journal, "--stats-json", stats, path, 24, 0, out])
    assert read_json(out) == [i * i for i in range(24)]
    assert read_json(stats)["resume"] == {"journal_tasks": 20, "reused": 20, "new": 4, "rerun": 0, "not_resubmitted": 0}
    # same keys, other arguments: refused, naming the key
    before = journal.read_bytes()
    res = farm(mpich, ["run", "-q", "--resume", "--journal", journal, path, 24, 7, out], check=2)
    assert "'run-0'" in res.stderr and "other function or arguments" in res.stderr, res.explain()
    assert "Traceback" not in res.stderr
    assert read_journal(journal).counts()[SUCCESS] == 24
    assert journal.read_bytes()[: len(before)] == before
    # --force-resume trusts the keys: the recorded results stand
    farm(mpich, ["run", "-q", "--resume", "--force-resume", "--journal", journal, path, 24, 7, out])
    assert read_json(out) == [i * i for i in range(24)]


def test_journal_of_other_work_is_refused_and_left_alone(mpich: MPI, script: Any, tmp_path: Path) -> None:
    work_a = script(JOB.replace("def work(i):", "def work(i):  # work A"))
    work_b = script(
        JOB.replace("i * i", "i * i * i")
        .replace("def work(i):", "def other(i):")
        .replace("ex.map(work", "ex.map(other")
    )
    journal, stats = tmp_path / "j", tmp_path / "stats.json"
    farm(mpich, ["run", "-q", "--journal", journal, work_a, 40, tmp_path / "a.json"])
    before = journal.read_bytes()
    t0 = time.monotonic()
    res = farm(mpich, ["run", "--resume", "--journal", journal, work_b, 40, tmp_path / "b.json"], check=2)
    assert time.monotonic() - t0 < 30
    lines = taskfarm_lines(res.stderr)
    assert any("journal from other work" in line and "none of the first 32" in line for line in lines), res.explain()
    assert "Traceback" not in res.stderr
    assert journal.read_bytes() == before, "a refused resume must leave the journal as it was"
    farm(
        mpich,
        [
            "run",
            "-q",
            "--resume",
            "--force-resume",
            "--journal",
            journal,
            "--stats-json",
            stats,
            work_b,
            40,
            tmp_path / "b.json",
        ],
    )
    assert read_json(tmp_path / "b.json") == [dict(r, sq=r["i"] ** 3) for r in expected(40)]
    assert read_json(stats)["resume"]["new"] == 40
    assert len(read_journal(journal).tasks) == 80


def test_partly_new_task_list_is_reported(mpich: MPI, script: Any, tmp_path: Path) -> None:
    path = script(JOB)
    journal = tmp_path / "j"
    farm(mpich, ["run", "-q", "--journal", journal, path, 20, tmp_path / "a.json"])
    res = farm(mpich, ["run", "--resume", "--journal", journal, path, 30, tmp_path / "b.json"], timeout=TIMEOUT)
    assert read_json(tmp_path / "b.json") == expected(30)
    assert any(
        "resumed: 20 of 20 recorded tasks reused, 0 rerun, 10 new" in line for line in taskfarm_lines(res.stderr)
    ), res.explain()


def test_task_file_resumes_after_a_line_is_inserted(mpich: MPI, tmp_path: Path) -> None:
    tasks = tmp_path / "tasks.txt"
    tasks.write_text("".join(f"echo task-{i}\n" for i in range(6)))
    journal, stats, run_dir = tmp_path / "j", tmp_path / "stats.json", tmp_path / "run"
    common = ["run", "-q", "--journal", journal, "--run-dir", run_dir, "--stats-json", stats]
    farm(mpich, [*common, "--tasks", tasks])
    tasks.write_text("# added later\necho first\n" + tasks.read_text())  # every line number moves
    farm(mpich, [*common, "--resume", "--tasks", tasks])
    resume = read_json(stats)["resume"]
    assert (resume["reused"], resume["new"], resume["rerun"]) == (6, 1, 0)
    status(mpich, journal, check=0)


# --------------------------------------------------------------------------
# failed tasks, status
# --------------------------------------------------------------------------

FLAKY = """\
import json
import os
import sys

from taskfarm import FarmExecutor


def f(i, flag):
    if i % 5 == 0 and not os.path.exists(flag):
        raise ValueError(f"bad {i}")
    return i


flag, out = sys.argv[1], sys.argv[2]
with FarmExecutor() as ex:
    futures = [ex.submit(f, i, flag) for i in range(20)]
    results = []
    for fut in futures:
        try:
            results.append(fut.result())
        except ValueError as exc:
            results.append(f"ValueError: {exc}")
with open(out, "w") as fo:
    json.dump(results, fo)
"""


def test_failed_tasks_are_kept_unless_retry_failed(mpich: MPI, script: Any, tmp_path: Path) -> None:
    path = script(FLAKY)
    journal, stats, flag, out = tmp_path / "j", tmp_path / "stats.json", tmp_path / "flag", tmp_path / "out.json"
    first = [f"ValueError: bad {i}" if i % 5 == 0 else i for i in range(20)]
    farm(mpich, ["run", "-q", "--journal", journal, path, flag, out])
    assert read_json(out) == first
    res = status(mpich, journal, check=1)
    assert "failed tasks (4):" in res.stdout and "ValueError: bad 0" in res.stdout
    assert "per rank:" in res.stdout
    report = json.loads(status(mpich, journal, "--json", check=1).stdout)
    assert report["counts"]["FAILURE"] == 4 and report["counts"][SUCCESS] == 16
    assert {e["error_text"].strip().splitlines()[-1] for e in report["failed"]} == {
        f"ValueError: bad {i}" for i in (0, 5, 10, 15)
    }
    assert set(report["per_rank"]) == {"1", "2"}
    # resume: failures come back as they were, nothing runs
    farm(mpich, ["run", "-q", "--resume", "--journal", journal, "--stats-json", stats, path, flag, out])
    assert read_json(out) == first
    assert (read_json(stats)["resume"]["reused"], read_json(stats)["submitted"]) == (20, 0)
    # --retry-failed: only the failed ones run again (and now succeed)
    flag.touch()
    farm(
        mpich, ["run", "-q", "--resume", "--retry-failed", "--journal", journal, "--stats-json", stats, path, flag, out]
    )
    assert read_json(out) == list(range(20))
    assert (read_json(stats)["resume"]["rerun"], read_json(stats)["submitted"]) == (4, 4)
    status(mpich, journal, check=0)


# --------------------------------------------------------------------------
# damage and locking
# --------------------------------------------------------------------------


def test_torn_tail_of_a_real_journal_resumes_correctly(mpich: MPI, script: Any, tmp_path: Path) -> None:
    path = script(JOB)
    journal = tmp_path / "j"
    farm(mpich, ["run", "-q", "--journal", journal, path, 300, tmp_path / "a.json"])
    full = journal.stat().st_size
    cut = int(full * 0.7)
    while True:  # a cut that falls inside a record (not on a boundary)
        os.truncate(journal, cut)
        if read_journal(journal).torn_tail_bytes:
            break
        cut += 1
    done = read_journal(journal).counts()[SUCCESS]
    assert 0 < done < 300
    res = status(mpich, journal, check=75)
    assert "torn bytes at the end ignored" in res.stdout
    farm(mpich, ["run", "-q", "--resume", "--journal", journal, path, 300, tmp_path / "b.json"])
    assert read_json(tmp_path / "b.json") == expected(300)
    st = read_journal(journal)
    assert st.torn_tail_bytes == 0 and all(e.successes == 1 for e in st.tasks.values())


def test_corrupt_middle_is_a_one_line_error_naming_the_offset(mpich: MPI, script: Any, tmp_path: Path) -> None:
    path = script(JOB)
    journal = tmp_path / "j"
    farm(mpich, ["run", "-q", "--journal", journal, path, 100, tmp_path / "a.json"])
    data = bytearray(journal.read_bytes())
    # damage the key in the SUBMIT record of task 50 (not frame data: status skips results)
    key = list(read_journal(journal).tasks)[50]
    pos = data.index(key.encode()) + 3
    data[pos] ^= 0xFF
    journal.write_bytes(bytes(data))
    for res in (
        farm(mpich, ["run", "-q", "--resume", "--journal", journal, path, 100, tmp_path / "b.json"], check=2),
        status(mpich, journal, check=2),
    ):
        assert "Traceback" not in res.stderr, res.explain()
        lines = taskfarm_lines(res.stderr)
        assert len(lines) == 1, res.explain()
        match = re.search(r"corrupt at byte offset (\d+)", lines[0])
        assert match and 0 < int(match.group(1)) <= pos, res.explain()
    assert journal.read_bytes() == bytes(data), "a damaged journal is never written to"


def test_second_farm_on_the_same_journal_is_refused(
    mpi: MPI, script: Any, start: Callable[..., Job], tmp_path: Path
) -> None:
    path = script(
        """\
import sys
import time

from taskfarm import FarmExecutor


def slow(i):
    time.sleep(0.1)
    return i


with FarmExecutor() as ex:
    assert list(ex.map(slow, range(60))) == list(range(60))
"""
    )
    journal = tmp_path / "j"
    first = start(mpi, 3, ["run", "-q", "--journal", journal, path])
    wait_until(lambda: successes(journal) >= 1, "the first farm's first result", first)
    t0 = time.monotonic()
    res = farm(mpi, ["run", "-q", "--resume", "--journal", journal, path], check=2)
    assert time.monotonic() - t0 < 15
    lines = taskfarm_lines(res.stderr)
    assert len(lines) == 1 and re.search(r"being written by another farm \(host \S+, pid \d+\)", lines[0]), (
        res.explain()
    )
    assert first.running(), "the refused farm must not disturb the running one"
    first.finish(TIMEOUT, check=0)
    st = read_journal(journal)
    assert st.complete() and len(st.tasks) == 60 and len(st.runs) == 1


# --------------------------------------------------------------------------
# the master's memory with the journal on
# --------------------------------------------------------------------------


@pytest.mark.slow
def test_master_memory_is_flat_over_many_journaled_tasks(mpich: MPI, script: Any, tmp_path: Path) -> None:
    path = script(
        """\
import json
import resource
import sys

from taskfarm import FarmExecutor


def noop(i):
    return i


n_small, n, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
peak = {}
with FarmExecutor() as ex:
    for i, r in enumerate(ex.map(noop, range(n), chunksize=1)):
        if i + 1 in (n_small, n):
            peak[i + 1] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
with open(out, "w") as fo:
    json.dump(peak, fo)
"""
    )
    journal, out = tmp_path / "j", tmp_path / "out.json"
    farm(mpich, ["run", "-q", "--journal", journal, path, 20_000, 200_000, out], timeout=180)
    peak = read_json(out)
    small, big = peak["20000"], peak["200000"]  # KiB
    # ~10 MiB of slack for allocator noise; a key kept per task would add ~30 MiB here
    assert big - small < 10 * 1024, f"rank 0 peak RSS {small} KiB after 20k tasks, {big} KiB after 200k"
    st = read_journal(journal, results=False)
    assert len(st.tasks) == 200_000 and st.complete()
