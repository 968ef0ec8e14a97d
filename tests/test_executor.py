"""FarmExecutor under mpiexec, under both MPI wheels.

Each test contributes a section of script that uses the executor and records
what it saw; the sections of a group run as one script through ``python -m
taskfarm run`` on 3 ranks (rank 0 plus two workers), one job per group and MPI
(the machine has two cores: a job start per test would cost minutes), and each
test asserts on its own section's part of the JSON the job wrote.  A section
that raises records its traceback and fails only its own test.  Tasks that
must stay busy wait for a gate file the section creates when it is ready,
never for a fixed time.
"""

from __future__ import annotations

import os
import re
import textwrap
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from conftest import _VENVS, MPI, farm_run, read_json, run

from taskfarm._master import MASTER_SWITCH_INTERVAL, _fast_switching, _restore_switching
from taskfarm._scheduler import MAX_PREFETCH

pytestmark = pytest.mark.mpi

RANKS = 3
TIMEOUT = 150.0

PRELUDE = '''\
import concurrent.futures as cf
import itertools
import json
import os
import sys
import threading
import time
import traceback

import taskfarm

OUT = sys.argv[1]
GATE = OUT + ".gate"
results = {}


def ident(x):
    return x


def add(a, b=0):
    return a + b


def sq(x):
    return x * x


def wait_for(path, limit=60.0):
    """Block (in a task) until the script creates ``path``."""
    deadline = time.monotonic() + limit
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(path)
        time.sleep(0.005)
    return "released"


def block_workers(ex):
    """One task per worker that waits for the gate.  Each goes as a task of its
    own (a time limit is an option), never bundled with the others, which would
    block one worker twice and leave another free: the function may have been
    timed as quick by an earlier section."""
    return [ex.submit_task(taskfarm.Task(wait_for, (GATE,), time_limit=120)) for _ in range(ex.workers)]


def open_gate():
    with open(GATE, "a"):
        pass


def until_main_thread_sleeps_on_a_lock(limit=60.0):
    """From another thread: return once the main thread sleeps in a futex
    wait (a lock, a condition), or after ``limit`` seconds."""
    main = threading.main_thread()
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        with open(f"/proc/self/task/{main.native_id}/wchan") as f:
            if "futex" in f.read():
                return
        time.sleep(0.001)

'''

#: group -> section name -> script text (module level of the group's script)
GROUPS: dict[str, dict[str, str]] = {}

Results = Callable[[tuple[str, str]], dict[str, Any]]


def section(group: str, name: str, text: str) -> tuple[str, str]:
    """Register a section of a group's script; its ``out`` dict becomes results[name]."""
    GROUPS.setdefault(group, {})[name] = textwrap.dedent(text).strip("\n")
    return group, name


def group_script(group: str) -> str:
    """The group's sections, each guarded, at module level (so its functions are __main__'s)."""
    parts = [PRELUDE]
    for name, text in GROUPS[group].items():
        parts.append(
            f"# ---- {name}\n"
            f"GATE = OUT + {('.gate-' + name)!r}\n"
            f"out = results.setdefault({name!r}, {{}})\n"
            "try:\n"
            f"{textwrap.indent(text, '    ')}\n"
            "except BaseException:\n"
            "    out['__error__'] = traceback.format_exc()\n"
            "finally:\n"
            "    open_gate()  # never leave a task of this section waiting\n\n"
        )
    parts.append("with open(OUT, 'w') as f:\n    json.dump(results, f)\n")
    return "".join(parts)


@pytest.fixture(scope="module", params=["mpich", "openmpi"])
def farm_results(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Results]:
    """Under one MPI: ``farm_results((group, name))`` is that section's output."""
    venv = _VENVS[request.param]
    if not (venv / "bin" / "mpiexec").exists():
        pytest.skip(f"{request.param} venv not set up ({venv}); run make test")
    mpi = MPI(request.param, venv)
    done: dict[str, dict[str, Any]] = {}

    def get(key: tuple[str, str]) -> dict[str, Any]:
        group, name = key
        if group not in done:
            where = tmp_path_factory.mktemp(f"{group}-{mpi.name}")
            path = where / f"{group}.py"
            path.write_text(group_script(group))
            out = where / "out.json"
            farm_run(mpi, RANKS, ["run", "-q", str(path), str(out)], timeout=TIMEOUT)
            done[group] = read_json(out)
        got: dict[str, Any] = done[group][name]
        if "__error__" in got:
            pytest.fail(f"section {name} raised:\n{got['__error__']}")
        return got

    yield get


# --------------------------------------------------------------------------
# submit, map
# --------------------------------------------------------------------------


SUBMIT_AND_RESULT = section(
    "basics",
    "submit_and_result",
    """
    with taskfarm.FarmExecutor() as ex:
        f = ex.submit(add, 2, b=3)
        out["value"] = f.result(timeout=60)
        out["is_future"] = isinstance(f, cf.Future)
        out["state"] = f.state.value
        out["rank"] = f.rank
        out["many"] = [g.result(60) for g in [ex.submit(add, i, i) for i in range(100)]]
        out["workers"] = ex.workers
        out["pids"] = sorted({ex.submit(os.getpid).result(60) for _ in range(4)} | {os.getpid()})
        out["switch_interval"] = sys.getswitchinterval()
    """,
)


def test_the_switch_interval_is_shortened_for_the_farm_and_given_back() -> None:
    import sys

    original = sys.getswitchinterval()
    try:
        sys.setswitchinterval(0.005)
        previous = _fast_switching()
        # Python keeps whole microseconds: 50 us reads back as 4.9999999999999996e-05
        assert previous == pytest.approx(0.005) and sys.getswitchinterval() == pytest.approx(MASTER_SWITCH_INTERVAL)
        _restore_switching(previous)
        assert sys.getswitchinterval() == pytest.approx(0.005)
        sys.setswitchinterval(0.00002)  # the program's own, shorter: kept
        assert _fast_switching() == pytest.approx(0.00002) and sys.getswitchinterval() == pytest.approx(0.00002)
        previous = _fast_switching()
        sys.setswitchinterval(0.002)  # the program set one of its own meanwhile: kept
        _restore_switching(previous)
        assert sys.getswitchinterval() == pytest.approx(0.002)
    finally:
        sys.setswitchinterval(original)


def test_submit_and_result(farm_results: Results) -> None:
    got = farm_results(SUBMIT_AND_RESULT)
    assert got["value"] == 5
    assert got["is_future"] is True
    assert got["state"] == "SUCCESS"
    assert got["rank"] in (1, 2)
    assert got["many"] == [2 * i for i in range(100)]
    assert got["workers"] == RANKS - 1
    assert got["switch_interval"] == pytest.approx(MASTER_SWITCH_INTERVAL)  # the service thread gets the GIL soon
    assert len(got["pids"]) >= 2  # tasks ran in other processes than the script


MAP_RETURNS_RESULTS_IN_INPUT_ORDER = section(
    "basics",
    "map_returns_results_in_input_order",
    """
    def jitter(x):
        # later items finish first on the other worker: order must still hold
        time.sleep(0.002 * (x % 3))
        return x * x

    with taskfarm.FarmExecutor() as ex:
        out["sq"] = list(ex.map(jitter, range(300)))
        out["two"] = list(ex.map(add, range(100), range(100, 250)))  # shortest input wins
        out["empty"] = list(ex.map(sq, []))
        out["tuples"] = list(ex.map(len, [(1, 2), (3, 4, 5), ()]))  # an item is one argument
        before = ex.statistics().submitted
        out["many"] = list(ex.map(sq, range(20_000))) == [i * i for i in range(20_000)]
        out["many_tasks"] = ex.statistics().submitted - before
    """,
)


def test_map_returns_results_in_input_order(farm_results: Results) -> None:
    got = farm_results(MAP_RETURNS_RESULTS_IN_INPUT_ORDER)
    assert got["sq"] == [i * i for i in range(300)]
    assert got["two"] == [2 * i + 100 for i in range(100)]
    assert got["empty"] == []
    assert got["tuples"] == [2, 3, 0]
    assert got["many"] is True
    # automatic chunking: a few one-item probes, then chunks, not a task per item
    assert got["many_tasks"] < 200


MAP_WITH_CHUNKSIZE_BATCHES_ITEMS_INTO_FEWER_TASKS = section(
    "basics",
    "map_with_chunksize_batches_items_into_fewer_tasks",
    """
    with taskfarm.FarmExecutor() as ex:
        before = ex.statistics().submitted
        out["chunked"] = list(ex.map(sq, range(300), chunksize=7))
        out["tasks"] = ex.statistics().submitted - before
        out["one"] = list(ex.map(add, range(5), range(5), chunksize=1))
        try:
            ex.map(sq, range(3), chunksize=0)
            out["bad_chunksize"] = None
        except ValueError:
            out["bad_chunksize"] = "ValueError"
    """,
)


def test_map_with_chunksize_batches_items_into_fewer_tasks(farm_results: Results) -> None:
    got = farm_results(MAP_WITH_CHUNKSIZE_BATCHES_ITEMS_INTO_FEWER_TASKS)
    assert got["chunked"] == [i * i for i in range(300)]
    assert got["tasks"] == -(-300 // 7)
    assert got["one"] == [0, 2, 4, 6, 8]
    assert got["bad_chunksize"] == "ValueError"


MAP_IS_LAZY_OVER_AN_INFINITE_INPUT = section(
    "basics",
    "map_is_lazy_over_an_infinite_input",
    """
    consumed = 0

    def naturals():
        global consumed
        for i in itertools.count():
            consumed = i + 1
            yield i

    with taskfarm.FarmExecutor() as ex:
        s0 = ex.statistics()
        squares = ex.map(sq, naturals())
        out["first"] = list(itertools.islice(squares, 2000))
        out["consumed"] = consumed
        del squares  # closing map's iterator cancels what it submitted ahead
    s = ex.statistics()
    out["stats"] = [s.submitted - s0.submitted, s.done - s0.done, s.cancelled - s0.cancelled,
                    s.failed - s0.failed]
    """,
)


def test_map_is_lazy_over_an_infinite_input(farm_results: Results) -> None:
    got = farm_results(MAP_IS_LAZY_OVER_AN_INFINITE_INPUT)
    assert got["first"] == [i * i for i in range(2000)]
    assert 2000 <= got["consumed"] < 200_000  # a bounded window ahead, not the input
    submitted, done, cancelled, failed = got["stats"]
    assert failed == 0
    assert done + cancelled == submitted


MAP_TIMEOUT_RAISES_TIMEOUT_ERROR = section(
    "basics",
    "map_timeout_raises_timeout_error",
    """
    with taskfarm.FarmExecutor() as ex:
        pending = ex.map(wait_for, [GATE, GATE], timeout=0.3)
        t0 = time.monotonic()
        try:
            next(pending)
            out["raised"] = None
        except cf.TimeoutError as exc:
            out["raised"] = type(exc).__name__
        out["waited"] = time.monotonic() - t0
        open_gate()
    """,
)


def test_map_timeout_raises_timeout_error(farm_results: Results) -> None:
    got = farm_results(MAP_TIMEOUT_RAISES_TIMEOUT_ERROR)
    assert got["raised"] == "TimeoutError"
    assert got["waited"] < 10  # it did not wait for the tasks (they wait for the gate)


# --------------------------------------------------------------------------
# as_completed, wait, cancel, shutdown
# --------------------------------------------------------------------------


AS_COMPLETED_AND_WAIT_WORK_ON_FARM_FUTURES = section(
    "basics",
    "as_completed_and_wait_work_on_farm_futures",
    """
    def fail(x):
        raise ValueError(x)

    with taskfarm.FarmExecutor() as ex:
        fs = [ex.submit(ident, i) for i in range(40)]
        out["as_completed"] = sorted(f.result() for f in cf.as_completed(fs, timeout=60))
        done, not_done = cf.wait(fs, timeout=60)
        out["all_completed"] = [len(done), len(not_done)]

        blocker = ex.submit(wait_for, GATE)
        bad = ex.submit(fail, 1)
        done, not_done = cf.wait([blocker, bad], timeout=60, return_when=cf.FIRST_EXCEPTION)
        out["first_exception"] = [bad in done, blocker in not_done]
        quick = ex.submit(ident, 5)
        done, not_done = cf.wait([blocker, quick], timeout=60, return_when=cf.FIRST_COMPLETED)
        out["first_completed"] = [quick in done, blocker in not_done]
        open_gate()
        out["blocker"] = blocker.result(60)
    """,
)


def test_as_completed_and_wait_work_on_farm_futures(farm_results: Results) -> None:
    got = farm_results(AS_COMPLETED_AND_WAIT_WORK_ON_FARM_FUTURES)
    assert got["as_completed"] == list(range(40))
    assert got["all_completed"] == [40, 0]
    assert got["first_exception"] == [True, True]
    assert got["first_completed"] == [True, True]
    assert got["blocker"] == "released"


CALLBACK_THAT_WAITS_IS_REFUSED = section(
    "basics",
    "callback_that_waits_is_refused",
    """
    with taskfarm.FarmExecutor() as ex:
        blocker = ex.submit(wait_for, GATE)
        seen = []
        called = threading.Event()

        def waits(fut):
            t0 = time.monotonic()
            try:
                blocker.result(timeout=20)
                seen.append("returned")
            except BaseException as exc:
                seen.append(type(exc).__name__)
            seen.append(time.monotonic() - t0)
            seen.append(blocker.exception(0) if blocker.done() else "not done")  # a zero timeout only looks
            called.set()

        quick = ex.submit(ident, 5)
        quick.add_done_callback(waits)
        out["quick"] = quick.result(60)
        out["called"] = called.wait(60)
        open_gate()
        out["blocker"] = blocker.result(60)
        out["seen"] = seen[:2] + [str(seen[2])]
    """,
)


def test_a_done_callback_that_waits_for_another_task_is_refused_at_once(farm_results: Results) -> None:
    """Callbacks run in the thread that resolves the farm's futures: one that
    waited there for another task's result would wait for good (here it
    waited out its 20 s timeout, the farm stalled meanwhile).  The wait is
    refused with a RuntimeError at once; a zero timeout still only looks."""
    got = farm_results(CALLBACK_THAT_WAITS_IS_REFUSED)
    assert got["quick"] == 5 and got["called"] is True
    assert got["seen"][0] == "RuntimeError", got
    assert got["seen"][1] < 5.0, got
    assert got["seen"][2] == "not done", got
    assert got["blocker"] == "released"


#: calls behind blocked workers: 100 more than their pipelines can hold, so that
#: the last 100 are still at the master, however fast its thread dispatches
BEHIND_BLOCKERS = (RANKS - 1) * (1 + MAX_PREFETCH) + 100
SENT = BEHIND_BLOCKERS - 100

CANCEL_BEFORE_DISPATCH = section(
    "basics",
    "cancel_before_dispatch",
    f"""
    with taskfarm.FarmExecutor() as ex:
        s0 = ex.statistics()
        blockers = block_workers(ex)
        fs = [ex.submit(ident, i) for i in range({BEHIND_BLOCKERS})]
        back = fs[{SENT}:]  # behind what the workers can hold
        out["cancel_returned"] = [f.cancel() for f in back]
        out["cancelled"] = [f.cancelled() for f in back]
        out["states"] = sorted({{f.state.value for f in back}})
        open_gate()
        done, not_done = cf.wait(fs + blockers, timeout=60)
        out["wait"] = [len(done), len(not_done)]
        out["results"] = [f.result() for f in fs[:{SENT}]]
        try:
            back[0].result()
            out["result_of_cancelled"] = None
        except cf.CancelledError:
            out["result_of_cancelled"] = "CancelledError"
        out["cancel_done"] = fs[0].cancel()  # finished: cannot be cancelled
        out["blocker_ranks"] = sorted(b.rank for b in blockers)
    s = ex.statistics()
    out["stats"] = {{
        "done": s.done - s0.done,
        "cancelled": s.cancelled - s0.cancelled,
        "submitted": s.submitted - s0.submitted,
    }}
    """,
)


def test_cancel_before_dispatch(farm_results: Results) -> None:
    got = farm_results(CANCEL_BEFORE_DISPATCH)
    assert all(got["cancel_returned"]) and len(got["cancel_returned"]) == 100
    assert all(got["cancelled"])
    assert got["states"] == ["CANCELLED"]
    assert got["wait"] == [BEHIND_BLOCKERS + RANKS - 1, 0]
    assert got["results"] == list(range(SENT))
    assert got["result_of_cancelled"] == "CancelledError"
    assert got["cancel_done"] is False
    assert got["blocker_ranks"] == list(range(1, RANKS))  # every worker was blocked
    # the cancelled tasks never ran (a task cancelled before the farm's thread
    # took it in is not counted at all; one cancelled later counts as cancelled)
    stats = got["stats"]
    assert stats["done"] == SENT + RANKS - 1
    assert stats["submitted"] == stats["done"] + stats["cancelled"]


SHUTDOWN_WITH_CANCEL_FUTURES = section(
    "basics",
    "shutdown_with_cancel_futures",
    f"""
    ex = taskfarm.FarmExecutor()
    blockers = block_workers(ex)
    fs = [ex.submit(ident, i) for i in range({BEHIND_BLOCKERS})]
    cancel_order = []
    for i, f in enumerate(fs):
        f.add_done_callback(lambda f, i=i: f.cancelled() and cancel_order.append(i))
    # the blockers go once shutdown cancels the last task, far back in the queue
    fs[-1].add_done_callback(lambda f: open_gate())
    ex.shutdown(wait=True, cancel_futures=True)
    out["cancelled_newest_first"] = cancel_order == sorted(cancel_order, reverse=True)
    out["last_cancelled"] = fs[-1].cancelled()
    out["all_done"] = all(f.done() for f in fs + blockers)
    out["cancelled"] = sum(f.cancelled() for f in fs)
    out["ok"] = [f.result() == i for i, f in enumerate(fs) if not f.cancelled()]
    # a blocker the farm's thread had not dispatched yet is cancelled too (FIFO:
    # then nothing behind it was dispatched either)
    out["blockers"] = ["cancelled" if b.cancelled() else b.result() for b in blockers]
    try:
        ex.submit(ident, 1)
        out["after"] = None
    except RuntimeError:
        out["after"] = "RuntimeError"
    """,
)


def test_shutdown_with_cancel_futures(farm_results: Results) -> None:
    got = farm_results(SHUTDOWN_WITH_CANCEL_FUTURES)
    assert got["last_cancelled"] is True
    assert got["all_done"] is True
    # newest first: no later task is dispatched while earlier ones are being cancelled
    assert got["cancelled_newest_first"] is True
    assert got["cancelled"] >= 100  # the queue beyond what workers held was cancelled, not run
    assert all(got["ok"]) and len(got["ok"]) + got["cancelled"] == BEHIND_BLOCKERS
    assert set(got["blockers"]) <= {"released", "cancelled"}
    assert got["after"] == "RuntimeError"


CONTEXT_MANAGER_WAITS_FOR_ITS_FUTURES = section(
    "basics",
    "context_manager_waits_for_its_futures",
    """
    def slowish(x):
        time.sleep(0.002)
        return x

    with taskfarm.FarmExecutor() as ex:
        out["enter_is_self"] = isinstance(ex, taskfarm.FarmExecutor)
        fs = [ex.submit(slowish, i) for i in range(100)]
    out["done_at_exit"] = all(f.done() for f in fs)
    out["results"] = [f.result(0) for f in fs]
    """,
)


def test_context_manager_waits_for_its_futures(farm_results: Results) -> None:
    got = farm_results(CONTEXT_MANAGER_WAITS_FOR_ITS_FUTURES)
    assert got["enter_is_self"] is True
    assert got["done_at_exit"] is True
    assert got["results"] == list(range(100))


SUBMIT_AFTER_SHUTDOWN_RAISES_RUNTIME_ERROR = section(
    "basics",
    "submit_after_shutdown_raises_runtime_error",
    """
    ex = taskfarm.FarmExecutor()
    out["before"] = ex.submit(ident, 1).result(60)
    ex.shutdown()
    ex.shutdown()  # a second call is harmless
    errors = []
    for attempt in (lambda: ex.submit(ident, 2), lambda: list(ex.map(ident, [3]))):
        try:
            attempt()
            errors.append(None)
        except RuntimeError:
            errors.append("RuntimeError")
    out["errors"] = errors
    """,
)


def test_submit_after_shutdown_raises_runtime_error(farm_results: Results) -> None:
    got = farm_results(SUBMIT_AFTER_SHUTDOWN_RAISES_RUNTIME_ERROR)
    assert got["before"] == 1
    assert got["errors"] == ["RuntimeError", "RuntimeError"]


# --------------------------------------------------------------------------
# initializer
# --------------------------------------------------------------------------


INITIALIZER_RUNS_ONCE_PER_WORKER_WITH_ITS_INITARGS = section(
    "basics",
    "initializer_runs_once_per_worker_with_its_initargs",
    """
    LOG = OUT + ".init"

    def init(tag, log):
        sys._taskfarm_test_tag = tag
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\\n")

    def probe(i):
        time.sleep(0.005)  # long enough that both workers get some
        return [os.getpid(), getattr(sys, "_taskfarm_test_tag", None)]

    with taskfarm.FarmExecutor(initializer=init, initargs=("hello", LOG)) as ex:
        out["probes"] = [f.result(60) for f in [ex.submit(probe, i) for i in range(60)]]
    with open(LOG) as f:
        out["init_pids"] = [int(line) for line in f]
    out["master_pid"] = os.getpid()
    """,
)


def test_initializer_runs_once_per_worker_with_its_initargs(farm_results: Results) -> None:
    got = farm_results(INITIALIZER_RUNS_ONCE_PER_WORKER_WITH_ITS_INITARGS)
    task_pids = {pid for pid, _ in got["probes"]}
    assert {tag for _, tag in got["probes"]} == {"hello"}  # ran before every task, with initargs
    assert len(got["init_pids"]) == len(set(got["init_pids"]))  # once per worker
    assert task_pids <= set(got["init_pids"])
    assert len(task_pids) == RANKS - 1
    assert got["master_pid"] not in got["init_pids"]


FAILING_INITIALIZER_FAILS_ITS_TASKS_WITH_BROKEN_FARM_ERROR = section(
    "basics",
    "failing_initializer_fails_its_tasks_with_broken_farm_error",
    """
    def bad_init():
        raise RuntimeError("init failed")

    with taskfarm.FarmExecutor(initializer=bad_init) as ex:
        errors = [f.exception(60) for f in [ex.submit(ident, i) for i in range(10)]]
    out["types"] = sorted({type(e).__name__ for e in errors})
    out["broken_executor"] = all(isinstance(e, cf.BrokenExecutor) for e in errors)
    with taskfarm.FarmExecutor() as ex:  # the farm itself is fine
        out["after"] = ex.submit(ident, 7).result(60)
    """,
)


def test_failing_initializer_fails_its_tasks_with_broken_farm_error(farm_results: Results) -> None:
    got = farm_results(FAILING_INITIALIZER_FAILS_ITS_TASKS_WITH_BROKEN_FARM_ERROR)
    assert got["types"] == ["BrokenFarmError"]
    assert got["broken_executor"] is True
    assert got["after"] == 7


# --------------------------------------------------------------------------
# exceptions and what can cross the wire
# --------------------------------------------------------------------------


TASK_EXCEPTION_KEEPS_ITS_TYPE_WITH_A_REMOTE_TRACEBACK = section(
    "wire",
    "task_exception_keeps_its_type_with_a_remote_traceback",
    """
    class MyError(Exception):
        pass

    def boom(x):
        raise KeyError(x)

    def my_boom():
        raise MyError("mine")

    with taskfarm.FarmExecutor() as ex:
        f = ex.submit(boom, "k")
        try:
            f.result(60)
        except KeyError as exc:
            out["type"] = type(exc).__name__
            out["args"] = list(exc.args)
            out["cause"] = type(exc.__cause__).__name__
            out["is_remote"] = isinstance(exc.__cause__, taskfarm.RemoteTraceback)
            out["text"] = str(exc.__cause__)
        out["rank"] = f.rank
        try:
            ex.submit(my_boom).result(60)
        except MyError as exc:  # a class of the script is caught as itself
            out["my_error"] = list(exc.args)
        out["later"] = ex.submit(ident, 1).result(60)
    """,
)


def test_task_exception_keeps_its_type_with_a_remote_traceback(farm_results: Results) -> None:
    got = farm_results(TASK_EXCEPTION_KEEPS_ITS_TYPE_WITH_A_REMOTE_TRACEBACK)
    assert got["type"] == "KeyError" and got["args"] == ["k"]
    assert got["cause"] == "RemoteTraceback" and got["is_remote"] is True
    text = got["text"]
    rank = re.search(r"\brank (\d+)", text)
    assert rank and int(rank.group(1)) == got["rank"]
    assert os.uname().nodename in text  # the host (all ranks run on this machine here)
    attempt = re.search(r"\battempt (\d+)", text)
    assert attempt and int(attempt.group(1)) == 1
    assert "boom" in text and "KeyError" in text  # the worker's frames
    assert got["my_error"] == ["mine"]
    assert got["later"] == 1


LAMBDAS_CLOSURES_AND_MAIN_FUNCTIONS_WORK = section(
    "wire",
    "lambdas_closures_and_main_functions_work",
    """
    import dataclasses

    OFFSET = 100

    def helper(x):
        return x + OFFSET

    def uses_helper(x):
        return helper(x) * 2

    def make_adder(n):
        def adder(x):
            return x + n
        return adder

    def make_cell():
        value = 1
        def get():
            return value
        def put(v):
            nonlocal value
            value = v
        return get, put

    def apply(fn, x):
        return fn(x)

    @dataclasses.dataclass
    class Point:
        x: int

    def shift(p):
        return Point(p.x + 1)

    with taskfarm.FarmExecutor() as ex:
        out["lambda"] = ex.submit(lambda x: x * 3, 5).result(60)
        out["closure"] = ex.submit(make_adder(10), 5).result(60)
        out["main_fn"] = ex.submit(uses_helper, 1).result(60)
        out["map_lambda"] = list(ex.map(lambda x: -x, range(5)))
        out["map_main_fn"] = list(ex.map(uses_helper, range(5)))
        out["fn_argument"] = ex.submit(apply, helper, 1).result(60)
        out["lambda_argument"] = ex.submit(apply, lambda y: y * 7, 6).result(60)
        get, put = make_cell()
        first = ex.submit(get).result(60)
        put(2)  # the closure changed between two submits: the worker sees it
        out["cell"] = [first, ex.submit(get).result(60)]
        p = ex.submit(shift, Point(1)).result(60)
        out["point"] = [p.x, type(p) is Point]
    """,
)


def test_lambdas_closures_and_main_functions_work(farm_results: Results) -> None:
    got = farm_results(LAMBDAS_CLOSURES_AND_MAIN_FUNCTIONS_WORK)
    assert got["lambda"] == 15
    assert got["closure"] == 15
    assert got["main_fn"] == 202
    assert got["map_lambda"] == [0, -1, -2, -3, -4]
    assert got["map_main_fn"] == [2 * (i + 100) for i in range(5)]
    assert got["fn_argument"] == 101
    assert got["lambda_argument"] == 42
    assert got["cell"] == [1, 2]
    assert got["point"] == [2, True]


UNPICKLABLE_ARGUMENT_FAILS_ONLY_ITS_FUTURE = section(
    "wire",
    "unpicklable_argument_fails_only_its_future",
    """
    import pickle

    with taskfarm.FarmExecutor() as ex:
        outcomes = []
        for f in [
            ex.submit(ident, threading.Lock()),
            ex.submit(ident, {"deep": [1, threading.Lock()]}),
            ex.submit(add, 1, b=threading.Lock()),
        ]:
            e = f.exception(60)
            outcomes.append([
                type(e).__name__,
                isinstance(e, taskfarm.SerializationError),
                isinstance(e, pickle.PicklingError),
                getattr(e, "where", None),
                getattr(e, "type_name", ""),
            ])
        out["outcomes"] = outcomes
        out["after"] = [f.result(60) for f in [ex.submit(ident, i) for i in range(20)]]
    """,
)


def test_unpicklable_argument_fails_only_its_future(farm_results: Results) -> None:
    got = farm_results(UNPICKLABLE_ARGUMENT_FAILS_ONLY_ITS_FUTURE)
    for name, is_ser, is_pickling, where, type_name in got["outcomes"]:
        assert (name, is_ser, is_pickling, where) == ("SerializationError", True, True, "argument")
        assert "lock" in type_name
    assert got["after"] == list(range(20))


REDUCE_RAISING_PROPAGATES_UNCHANGED = section(
    "wire",
    "reduce_raising_propagates_unchanged",
    """
    class Bad:
        def __reduce__(self):
            raise ValueError("mine")

    def make_bad():
        return Bad()

    with taskfarm.FarmExecutor() as ex:
        got = []
        for f in (ex.submit(ident, Bad()), ex.submit(make_bad)):
            e = f.exception(60)
            got.append([type(e).__name__, list(e.args)])
        out["got"] = got
        out["after"] = ex.submit(ident, 3).result(60)
    """,
)


def test_reduce_raising_propagates_unchanged(farm_results: Results) -> None:
    got = farm_results(REDUCE_RAISING_PROPAGATES_UNCHANGED)
    assert got["got"] == [["ValueError", ["mine"]], ["ValueError", ["mine"]]]
    assert got["after"] == 3


UNPICKLABLE_RESULT_FAILS_ONLY_ITS_FUTURE = section(
    "wire",
    "unpicklable_result_fails_only_its_future",
    """
    def make_lock(i):
        return threading.Lock() if i == 3 else i

    with taskfarm.FarmExecutor() as ex:
        fs = [ex.submit(make_lock, i) for i in range(8)]
        e = fs[3].exception(60)
        out["error"] = [type(e).__name__, e.where, e.type_name]
        out["others"] = [f.result(60) for i, f in enumerate(fs) if i != 3]
    """,
)


def test_unpicklable_result_fails_only_its_future(farm_results: Results) -> None:
    got = farm_results(UNPICKLABLE_RESULT_FAILS_ONLY_ITS_FUTURE)
    name, where, type_name = got["error"]
    assert (name, where) == ("SerializationError", "result")
    assert "lock" in type_name
    assert got["others"] == [0, 1, 2, 4, 5, 6, 7]


EXCEPTION_THAT_CANNOT_BE_UNPICKLED_FAILS_ONLY_ITS_FUTURE = section(
    "wire",
    "exception_that_cannot_be_unpickled_fails_only_its_future",
    """
    class TwoArgs(Exception):
        def __init__(self, a, b):
            super().__init__(f"{a}/{b}")

    def raise_two(i):
        if i == 2:
            raise TwoArgs(1, 2)
        return i

    with taskfarm.FarmExecutor() as ex:
        fs = [ex.submit(raise_two, i) for i in range(6)]
        e = fs[2].exception(60)
        out["error"] = [type(e).__name__, e.where, e.type_name]
        out["remote"] = isinstance(e.__cause__, taskfarm.RemoteTraceback)
        out["others"] = [f.result(60) for i, f in enumerate(fs) if i != 2]
        out["after"] = ex.submit(ident, 9).result(60)
    """,
)


def test_exception_that_cannot_be_unpickled_fails_only_its_future(farm_results: Results) -> None:
    got = farm_results(EXCEPTION_THAT_CANNOT_BE_UNPICKLED_FAILS_ONLY_ITS_FUTURE)
    assert got["error"] == ["SerializationError", "exception", "TwoArgs"]
    assert got["remote"] is True  # the worker's traceback is still attached
    assert got["others"] == [0, 1, 3, 4, 5]
    assert got["after"] == 9


NUMPY_ARRAYS_IN_AND_OUT = section(
    "wire",
    "numpy_arrays_in_and_out",
    """
    import numpy as np

    def double(a):
        return a * 2

    def make(n):
        return np.arange(n, dtype=np.float64)

    rng = np.random.default_rng(0)
    small = np.arange(10, dtype=np.int32)
    big = rng.random(2 * 1024 * 1024)  # 16 MiB
    fortran = np.asfortranarray(rng.random((300, 200)).astype(np.float32))
    with taskfarm.FarmExecutor() as ex:
        out["small"] = bool(np.array_equal(ex.submit(double, small).result(60), small * 2))
        back = ex.submit(ident, big).result(60)
        out["big"] = [bool(np.array_equal(back, big)), back.nbytes, str(back.dtype), back.shape[0]]
        back[0] = -1.0  # results are writable, like any array
        out["writable"] = float(back[0])
        out["strided"] = bool(np.array_equal(ex.submit(ident, big[::3]).result(60), big[::3]))
        f_back = ex.submit(ident, fortran).result(60)
        out["fortran"] = [bool(np.array_equal(f_back, fortran)), str(f_back.dtype)]
        made = ex.submit(make, 2 * 1024 * 1024).result(60)
        out["made"] = [made.nbytes, float(made[-1])]
        pair = ex.submit(ident, {"a": big, "b": [small, big]}).result(60)
        out["nested"] = bool(np.array_equal(pair["b"][1], big) and np.array_equal(pair["b"][0], small))
    """,
)


def test_numpy_arrays_in_and_out(farm_results: Results) -> None:
    got = farm_results(NUMPY_ARRAYS_IN_AND_OUT)
    assert got["small"] is True
    assert got["big"] == [True, 16 * 1024 * 1024, "float64", 2 * 1024 * 1024]
    assert got["writable"] == -1.0
    assert got["strided"] is True
    assert got["fortran"] == [True, "float32"]
    assert got["made"] == [16 * 1024 * 1024, float(2 * 1024 * 1024 - 1)]
    assert got["nested"] is True


EXECUTOR_REUSE_AND_TWO_EXECUTORS_IN_SEQUENCE = section(
    "basics",
    "executor_reuse_and_two_executors_in_sequence",
    """
    with taskfarm.FarmExecutor() as ex:
        out["one_by_one"] = [ex.submit(add, i, 1).result(60) for i in range(200)]
        out["batch"] = sum(f.result(60) for f in [ex.submit(add, i, 1) for i in range(300)])
        out["map_again"] = sum(ex.map(sq, range(100)))
    with taskfarm.FarmExecutor() as ex2:
        out["second"] = list(ex2.map(add, range(50), range(50)))
    ex3 = taskfarm.FarmExecutor()
    out["third"] = ex3.submit(add, 40, 2).result(60)
    ex3.shutdown()
    out["submitted"] = ex3.statistics().submitted
    """,
)


def test_executor_reuse_and_two_executors_in_sequence(farm_results: Results) -> None:
    got = farm_results(EXECUTOR_REUSE_AND_TWO_EXECUTORS_IN_SEQUENCE)
    assert got["one_by_one"] == list(range(1, 201))
    assert got["batch"] == sum(range(1, 301))
    assert got["map_again"] == sum(i * i for i in range(100))
    assert got["second"] == [2 * i for i in range(50)]
    assert got["third"] == 42
    assert got["submitted"] >= 200 + 300 + 1 + 2  # every executor used the one farm


FUTURES_AS_ARGUMENTS = section(
    "wire",
    "futures_as_arguments",
    """
    import numpy as np

    def tenfold(x):
        return 10 * x

    def fail():
        raise ValueError("input failed")

    def total(values):
        return sum(values)

    def ones(n):
        return np.ones(n)

    with taskfarm.FarmExecutor() as ex:
        out["simple"] = ex.submit(add, ex.submit(tenfold, 1), 2).result(60)
        x = ex.submit(tenfold, 1)
        for _ in range(10):
            x = ex.submit(add, x, 1)
        out["chain"] = x.result(60)
        out["nested"] = ex.submit(total, [ex.submit(tenfold, i) for i in range(5)]).result(60)
        out["kwargs"] = ex.submit(add, a=ex.submit(tenfold, 2), b=ex.submit(tenfold, 3)).result(60)
        done = ex.submit(tenfold, 4)
        done.result(60)
        out["done_input"] = ex.submit(add, done, 1).result(60)
        twice = ex.submit(tenfold, 5)
        out["twice"] = ex.submit(add, twice, twice).result(60)
        out["array_input"] = ex.submit(np.sum, ex.submit(ones, 1 << 20)).result(60)
        out["lambda_too"] = ex.submit(lambda v, f: f(v), ex.submit(tenfold, 6), lambda y: y + 1).result(60)
        e = ex.submit(add, ex.submit(fail), 1).exception(60)
        out["failed_input"] = type(e).__name__
    """,
)


def test_futures_as_arguments(farm_results: Results) -> None:
    got = farm_results(FUTURES_AS_ARGUMENTS)
    assert got["simple"] == 12
    assert got["chain"] == 20
    assert got["nested"] == 100
    assert got["kwargs"] == 50
    assert got["done_input"] == 41
    assert got["twice"] == 100
    assert got["array_input"] == float(1 << 20)
    assert got["lambda_too"] == 61
    assert got["failed_input"] == "DependencyFailed"


# --------------------------------------------------------------------------
# bundles: plain calls submitted faster than they run ride together
# (taskfarm._master, "Bundles"); each keeps its own future and outcome
# --------------------------------------------------------------------------

#: plain calls per bundle section: far more than the ranks hold at once
BURST = 2000

BUNDLED_CALLS_KEEP_THEIR_OWN_OUTCOMES = section(
    "bundles",
    "bundled_calls_keep_their_own_outcomes",
    f"""
    def half_of_even(i):
        if i % 97 == 5:
            raise ValueError(i)
        return i // 2

    with taskfarm.FarmExecutor() as ex:
        list(ex.map(ident, range(50), chunksize=1))  # calls timed: bundles can be sized
        s0 = ex.statistics()
        fs = [ex.submit(half_of_even, i) for i in range({BURST})]
        cf.wait(fs, timeout=90)
        s = ex.statistics()
    bad = [i for i in range({BURST}) if i % 97 == 5]
    out["values_ok"] = all(f.result() == i // 2 for i, f in enumerate(fs) if i not in bad)
    errors = [fs[i].exception() for i in bad]
    out["errors"] = sorted({{type(e).__name__ for e in errors}})
    out["error_args"] = [e.args[0] for e in errors] == bad
    out["remote_tracebacks"] = all("Traceback on rank" in str(e.__cause__) for e in errors)
    out["bad"] = len(bad)
    out["stats"] = {{k: getattr(s, k) - getattr(s0, k) for k in ("submitted", "done", "failed", "bundled")}}
    """,
)


def test_bundled_calls_keep_their_own_outcomes(farm_results: Results) -> None:
    got = farm_results(BUNDLED_CALLS_KEEP_THEIR_OWN_OUTCOMES)
    assert got["values_ok"] is True
    assert got["errors"] == ["ValueError"] and got["error_args"] is True
    assert got["remote_tracebacks"] is True
    stats = got["stats"]
    assert stats["submitted"] == BURST
    assert (stats["done"], stats["failed"]) == (BURST - got["bad"], got["bad"])
    assert stats["bundled"] > BURST // 2  # most of the burst rode in bundles


BUNDLED_CALLS_AS_INPUTS_AND_CANCELLED = section(
    "bundles",
    "bundled_calls_as_inputs_and_cancelled",
    f"""
    def fail_on_7(i):
        if i == 7:
            raise ValueError(i)
        return i

    with taskfarm.FarmExecutor() as ex:
        list(ex.map(ident, range(50), chunksize=1))
        # inputs submitted in the same burst: still held when their dependent arrives
        fs = [ex.submit(fail_on_7, i) for i in range({BURST})]
        out["dependent"] = ex.submit(add, fs[{BURST} - 1], 1).result(90)
        out["failed_input"] = type(ex.submit(add, fs[7], 1).exception(90)).__name__
        # every input done before the counts start: a call in another bundle than
        # the last call's may still run, and end between the two counts ("done"
        # read 2 more than the burst's in ~1 run in 20)
        cf.wait(fs, timeout=90)
        # a burst cancelled at once: the held calls and those in bundles not yet
        # sent; the workers are blocked meanwhile, so only their pipelines' worth
        # can have gone out, however fast no-ops would come back
        s0 = ex.statistics()
        blockers = block_workers(ex)
        gs = [ex.submit(ident, i) for i in range({BURST})]
        cancelled = sum(g.cancel() for g in gs)
        open_gate()
        done, not_done = cf.wait(gs + blockers, timeout=90)
        s = ex.statistics()
    out["blockers"] = [b.result() for b in blockers]
    out["blocker_ranks"] = sorted(b.rank for b in blockers)
    out["cancelled"] = cancelled
    out["not_done"] = len(not_done)
    out["ran_ok"] = all(g.result() == i for i, g in enumerate(gs) if not g.cancelled())
    out["stats"] = {{k: getattr(s, k) - getattr(s0, k) for k in ("submitted", "done", "cancelled", "failed")}}
    """,
)


def test_bundled_calls_as_inputs_and_cancelled(farm_results: Results) -> None:
    got = farm_results(BUNDLED_CALLS_AS_INPUTS_AND_CANCELLED)
    assert got["dependent"] == BURST
    assert got["failed_input"] == "DependencyFailed"
    assert got["not_done"] == 0  # wait() sees every cancelled call
    assert got["ran_ok"] is True
    # the ranks hold only a pipeline's worth: at most 1 + MAX_PREFETCH calls per slot
    assert got["cancelled"] >= BURST - (RANKS - 1) * (1 + MAX_PREFETCH)
    assert got["blockers"] == ["released"] * (RANKS - 1)
    assert got["blocker_ranks"] == list(range(1, RANKS))  # every worker was blocked
    assert got["stats"] == {
        "submitted": BURST + RANKS - 1,
        "done": BURST - got["cancelled"] + RANKS - 1,
        "cancelled": got["cancelled"],
        "failed": 0,
    }


# --------------------------------------------------------------------------
# the short cuts on an idle farm (taskfarm._master, "Short cuts")
# --------------------------------------------------------------------------

#: lone round trips, back to back, on a quiet farm
LONE = 20

SHORT_CUTS = section(
    "shortcuts",
    "lone_tasks",
    f"""
    def rank_of(i):
        return int(os.environ["TASKFARM_RANK"])


    def flaky(path):
        if not os.path.exists(path):
            open(path, "w").close()
            raise ValueError("first attempt")
        return "second attempt"


    with taskfarm.FarmExecutor() as ex:
        blockers = block_workers(ex)  # every worker runs a task, so every worker's rings have come
        open_gate()
        out["blockers"] = [b.result(60) for b in blockers]
        from taskfarm._executor import last_farm

        # the ranks each round trip rang (rank 0's transport, wrapped here)
        transport = last_farm().transport
        rung = []
        real_ring = transport.ring
        transport.ring = lambda peer: (rung.append(peer), real_ring(peer))[1]
        import taskfarm._farm_state as state_mod
        import taskfarm._shortcuts as shortcuts_mod
        from taskfarm._trials import Trial

        quiet = shortcuts_mod.RING_AHEAD_QUIET
        shortcuts_mod.RING_AHEAD_QUIET = 0.0  # these round trips come back to back
        kept = last_farm()._ring_trial = Trial(1)
        kept.decided = True  # as a farm that timed the early ring faster
        s0 = ex.statistics()
        trips = []
        for i in range({LONE}):
            before = len(rung)
            rank = ex.submit(rank_of, i).result(60)
            trips.append((rank, rung[before:]))
        s1 = ex.statistics()
        out["trips"] = trips
        # a farm's own trial: its idle round trips take turns, rung early and
        # not, until each way is timed; then the faster is kept
        trial = last_farm()._ring_trial = Trial(state_mod.RING_AHEAD_SAMPLES)
        tried = []
        while trial.decided is None and len(tried) < 100:
            before = len(rung)
            rank = ex.submit(rank_of, len(tried)).result(60)
            tried.append((rank, rung[before:]))
        after = []
        for i in range(6):
            before = len(rung)
            rank = ex.submit(rank_of, i).result(60)
            after.append((rank, rung[before:]))
        out["trial"] = [trial.decided, tried, after]
        # back to back (a result within RING_AHEAD_QUIET): never rung early
        shortcuts_mod.RING_AHEAD_QUIET = 3600.0
        kept.decided = True
        last_farm()._ring_trial = kept
        hot = []
        for i in range(6):
            before = len(rung)
            rank = ex.submit(rank_of, i).result(60)
            hot.append((rank, rung[before:]))
        out["hot"] = hot
        shortcuts_mod.RING_AHEAD_QUIET = quiet
        transport.ring = real_ring
        out["values"] = [ex.submit(add, i, 1).result(60) for i in range(3)]
        out["submit_rounds"] = s1.submit_rounds - s0.submit_rounds
        out["result_rounds"] = s1.result_rounds - s0.result_rounds
        out["exception"] = type(ex.submit(int, "x").exception(60)).__name__
        # a timeout while this thread listens for the farm's only task
        late = ex.submit(wait_for, GATE + ".late", 120)
        t0 = time.monotonic()
        try:
            late.result(timeout=0.2)
            out["timeout"] = None
        except cf.TimeoutError:
            out["timeout"] = "TimeoutError"
        out["timeout_took"] = time.monotonic() - t0
        open(GATE + ".late", "w").close()
        out["late"] = late.result(60)
        # a done-callback that submits, run by whichever thread took the result
        chained = []
        called = threading.Event()

        def chain(f):
            chained.append(ex.submit(add, f.result(), 1))
            called.set()

        first = ex.submit(add, 1, 1)
        first.add_done_callback(chain)
        out["first"] = first.result(60)
        out["chained"] = chained[0].result(60) if called.wait(60) else None
        # a lone task that fails once and is retried
        out["retried"] = ex.submit_task(taskfarm.Task(flaky, (GATE + ".flaky",), max_retries=1)).result(60)
        # two threads wait for the farm's only task: one listens, the other waits on the future
        both = ex.submit(wait_for, GATE + ".both", 120)
        other = []
        waiter = threading.Thread(target=lambda: other.append(both.result(60)))
        waiter.start()
        open(GATE + ".both", "w").close()
        out["both"] = [both.result(60), (waiter.join(60), other)[1]]
        # a signal for the main thread while it waits to take the round (the
        # idle service thread has let it go; another thread holds it here)
        import signal
        from taskfarm._executor import last_farm

        class Interrupted(Exception):
            pass

        def interrupt(signum, frame):
            raise Interrupted()

        farm_ = last_farm()
        main = threading.main_thread()
        taken = threading.Event()

        def hold_the_round():
            with farm_._round:
                taken.set()
                until_main_thread_sleeps_on_a_lock()  # the round's
                signal.pthread_kill(main.ident, signal.SIGINT)

        previous = signal.signal(signal.SIGINT, interrupt)
        rounds = ex.statistics().submit_rounds
        holder = threading.Thread(target=hold_the_round)
        holder.start()
        taken.wait(60)
        try:
            farm_._inline_round(receive=False, wait=True)
            out["interrupted"] = False
        except Interrupted:
            out["interrupted"] = True
        holder.join(60)
        signal.signal(signal.SIGINT, previous)
        out["round_ran"] = ex.statistics().submit_rounds - rounds
        free = farm_._round.acquire(blocking=False)
        if free:
            farm_._round.release()
        out["round_free"] = free
        out["sigint_blocked"] = signal.SIGINT in signal.pthread_sigmask(signal.SIG_BLOCK, [])
        out["after_signal"] = ex.submit(add, 2, 2).result(60)
        # the service thread takes the result a listening thread waits for (its
        # ring came while that thread was not asleep on the doorbell): it must
        # poke the listener, which has no safety-net look to wake it here
        import taskfarm._master
        import taskfarm._shortcuts
        from taskfarm._transport import Wakeup

        real_listen, real_cap = Wakeup.listen, taskfarm._master.DOORBELL_POLL_CAP
        late = threading.Event()

        def listen_late(self, timeout=None):
            if late.is_set():  # once: keep off the doorbell until the service thread has the result
                late.clear()
                open(GATE + ".poke", "w").close()
                while not farm_._listened.done():
                    time.sleep(0.001)
            return real_listen(self, timeout)

        Wakeup.listen = listen_late
        taskfarm._master.DOORBELL_POLL_CAP = taskfarm._shortcuts.DOORBELL_POLL_CAP = 3600.0
        try:
            lone = ex.submit(wait_for, GATE + ".poke")
            late.set()
            t0 = time.monotonic()
            out["poked_value"] = lone.result(30)  # unpoked, the listener would sleep all 30 s
            out["poked_took"] = time.monotonic() - t0
            out["listened_late"] = not late.is_set()
        finally:
            Wakeup.listen, taskfarm._master.DOORBELL_POLL_CAP = real_listen, real_cap
            taskfarm._shortcuts.DOORBELL_POLL_CAP = real_cap
        # a signal the kernel handed to another thread: the main thread, waiting
        # on a future (two unfinished: no listening), runs its handler within a
        # slice of its wait, not once the future resolves
        def open_sliced(signum, frame):
            open(GATE + ".sliced", "w").close()

        def signal_elsewhere():
            until_main_thread_sleeps_on_a_lock()  # the future's condition
            signal.pthread_kill(threading.get_ident(), signal.SIGUSR1)  # this thread, not the main one

        previous = signal.signal(signal.SIGUSR1, open_sliced)
        try:
            gated = [
                ex.submit_task(taskfarm.Task(wait_for, (GATE + ".sliced", 30.0), time_limit=120))
                for _ in range(ex.workers)
            ]
            elsewhere = threading.Thread(target=signal_elsewhere)
            elsewhere.start()
            sliced = []
            for g in gated:
                try:
                    sliced.append(g.result())
                except TimeoutError:
                    sliced.append("the gate stayed shut: the handler waited for the task")
            out["sliced"] = sliced
            elsewhere.join(60)
        finally:
            signal.signal(signal.SIGUSR1, previous)
        # the same while the main thread waits for an executor's futures as it
        # leaves its with block (shutdown's own wait)
        def open_shut(signum, frame):
            open(GATE + ".shut", "w").close()

        previous = signal.signal(signal.SIGUSR1, open_shut)
        try:
            t0 = time.monotonic()
            with taskfarm.FarmExecutor() as inner:
                shut = [
                    inner.submit_task(taskfarm.Task(wait_for, (GATE + ".shut", 30.0), time_limit=120))
                    for _ in range(inner.workers)
                ]
                elsewhere = threading.Thread(target=signal_elsewhere)
                elsewhere.start()
            out["shutdown_took"] = time.monotonic() - t0
            out["shutdown_values"] = [g.exception(0) is None for g in shut]
            elsewhere.join(60)
        finally:
            signal.signal(signal.SIGUSR1, previous)
        # the same while the main thread waits in concurrent.futures.wait, in
        # as_completed, and in result() with a timeout of its own
        def waits_sliced(name, wait):
            gate = GATE + "." + name

            def open_gate(signum, frame):
                open(gate, "w").close()

            previous = signal.signal(signal.SIGUSR1, open_gate)
            try:
                gated = [
                    ex.submit_task(taskfarm.Task(wait_for, (gate, 30.0), time_limit=120))
                    for _ in range(ex.workers)
                ]
                elsewhere = threading.Thread(target=signal_elsewhere)
                elsewhere.start()
                t0 = time.monotonic()
                wait(gated)
                out[name + "_took"] = time.monotonic() - t0
                out[name + "_values"] = [g.exception(60) is None for g in gated]
                elsewhere.join(60)
            finally:
                signal.signal(signal.SIGUSR1, previous)

        waits_sliced("cf_wait", lambda fs: cf.wait(fs))
        waits_sliced("as_completed", lambda fs: list(cf.as_completed(fs)))
        waits_sliced("result_timeout", lambda fs: [f.result(120) for f in fs])
        # a thread listening for the farm's only task gives the doorbell back
        # once another task is submitted: the farm's rings are the service
        # thread's again, and the listener waits as any other thread does
        alone = ex.submit(wait_for, GATE + ".alone", 120)
        # taken in first: a thread that starts to wait while its task is still
        # a submission in the queue waits the usual way (no short cut)
        deadline = time.monotonic() + 30
        while alone.task_id not in farm_._tasks and time.monotonic() < deadline:
            time.sleep(0.001)
        listener = threading.Thread(target=alone.exception, args=(60,))
        listener.start()
        deadline = time.monotonic() + 30
        while farm_._listened is not alone and time.monotonic() < deadline:
            time.sleep(0.001)
        out["listened_alone"] = farm_._listened is alone
        if not out["listened_alone"]:  # what wait_here saw, for a failure's report (a rare race, not understood)
            out["not_listening"] = {{
                "tasks": {{str(t): repr(sub.future) for t, sub in list(farm_._tasks.items())}},
                "alone": repr(alone),
                "submissions": [repr(s)[:80] for s in list(farm_._submissions)],
                "ringing": repr(farm_._ringing),
                "listening_held": farm_._listening.locked(),
                "listener_alive": listener.is_alive(),
                "service_only": farm_._service_only(),
            }}
        # gated too: a company that ended before the poked listener looked
        # would leave it the farm's only task again, and it would listen on
        company = ex.submit(wait_for, GATE + ".company", 120)
        deadline = time.monotonic() + 10  # the poke gives it back at once; unpoked, it listened until its task ended
        while farm_._listened is not None and time.monotonic() < deadline:
            time.sleep(0.001)
        out["gave_back"] = farm_._listened is None and not alone.done()
        open(GATE + ".company", "w").close()
        out["company"] = company.result(60)
        open(GATE + ".alone", "w").close()
        listener.join(60)
        out["alone"] = alone.result(60)
        # one rank runs a long task, the other idles: the thread that submits
        # a task sends it to the idle rank itself (two tasks: no listening)
        busy = ex.submit(wait_for, GATE + ".busy", 120)
        deadline = time.monotonic() + 30
        while busy.running() is False and time.monotonic() < deadline:
            time.sleep(0.001)
        apart = taskfarm._master.SUBMIT_APART
        taskfarm._master.SUBMIT_APART = 0.0  # back to back here, as if apart
        s0 = ex.statistics()
        beside = [ex.submit(rank_of, i).result(60) for i in range({LONE})]
        out["beside_rounds"] = ex.statistics().submit_rounds - s0.submit_rounds
        taskfarm._master.SUBMIT_APART = 3600.0  # every submit in one stream: the service thread's
        s0 = ex.statistics()
        beside += [ex.submit(rank_of, i).result(60) for i in range({LONE})]
        out["stream_rounds"] = ex.statistics().submit_rounds - s0.submit_rounds
        taskfarm._master.SUBMIT_APART = apart
        open(GATE + ".busy", "w").close()
        out["beside"] = [busy.result(60), sorted(set(beside)), busy.rank]
    """,
)


def test_a_lone_task_is_sent_and_taken_by_the_calling_thread(farm_results: Results) -> None:
    """On a quiet farm the thread that submits the farm's only task sends it,
    and the thread that waits for it takes its result, while the service
    thread sleeps.  Most round trips take both (15-20 of 20 in 16 runs here);
    one may not when the service thread is awake anyway, so a quarter must."""
    got = farm_results(SHORT_CUTS)
    assert got["blockers"] == ["released"] * (RANKS - 1)
    assert got["values"] == [1, 2, 3]
    assert got["submit_rounds"] >= LONE // 4, got
    assert got["result_rounds"] >= LONE // 4, got


def test_a_task_for_an_idle_rank_is_sent_by_the_calling_thread(farm_results: Results) -> None:
    """While one rank runs a long task and another idles, a submit with nothing
    else waiting is sent by the submitting thread, not the service thread it
    would wake (0.06-0.13 ms off its round trip here); a quarter must, as above.
    Not within a stream of submits (`SUBMIT_APART`): the service thread takes
    those in batches."""
    got = farm_results(SHORT_CUTS)
    assert got["stream_rounds"] == 0, got
    busy, ranks, busy_rank = got["beside"]
    assert busy == "released", got["beside"]
    assert ranks == sorted(set(range(1, RANKS)) - {busy_rank}), got["beside"]  # every one went to the idle rank
    assert got["beside_rounds"] >= LONE // 4, got


def test_a_lone_task_rings_its_rank_before_it_is_sent(farm_results: Results) -> None:
    """On a quiet farm whose trial kept the early ring (the script sets it so),
    the submit rings the rank the task will go to before it prepares the
    task (`Farm._ring_ahead`), so that the rank wakes meanwhile, and again
    after the send.  Every ring must go to the rank the task runs
    on (the scheduler's `next_rank`); a round trip whose round the service
    thread took has no early ring, so most, not all, must ring twice."""
    trips = farm_results(SHORT_CUTS)["trips"]
    assert all(0 < rank < RANKS for rank, _ in trips), trips
    assert all(set(rings) <= {rank} for rank, rings in trips), trips
    assert sum(1 for rank, rings in trips if rings == [rank, rank]) >= LONE // 4, trips


def test_a_farm_times_its_idle_round_trips_both_ways_and_keeps_the_faster(farm_results: Results) -> None:
    """Ringing early pays on one machine and costs on another
    (`taskfarm._trials`): a farm's idle round trips take turns, rung early
    and not, until each way is timed, and then it keeps one.  Back to back
    (a result within `RING_AHEAD_QUIET`) it never rings early."""
    got = farm_results(SHORT_CUTS)
    decided, tried, after = got["trial"]
    assert decided in (True, False), got["trial"]
    early = [rings == [rank, rank] for rank, rings in tried]
    assert sum(early) >= 2 and early.count(False) >= 2, tried  # both ways were taken
    assert all(set(rings) <= {rank} for rank, rings in tried + after), got["trial"]
    if decided:
        assert sum(rings == [rank, rank] for rank, rings in after) >= 2, after
    else:
        assert all(len(rings) <= 1 for _, rings in after), after
    assert all(len(rings) <= 1 for _, rings in got["hot"]), got["hot"]


def test_the_short_cuts_keep_the_future_contract(farm_results: Results) -> None:
    got = farm_results(SHORT_CUTS)
    assert got["exception"] == "ValueError"
    assert got["timeout"] == "TimeoutError"
    assert got["timeout_took"] < 5.0  # the timeout, not the task's end
    assert got["late"] == "released"
    assert got["first"] == 2
    assert got["chained"] == 3
    assert got["retried"] == "second attempt"
    assert got["both"] == ["released", ["released"]]


def test_a_signal_waits_until_a_user_threads_round_is_over(farm_results: Results) -> None:
    """A handler's exception raised while the main thread waits for the
    round, or halfway through it, would leave the round taken or the
    scheduler half changed: the signal is handled once the round is let go."""
    got = farm_results(SHORT_CUTS)
    assert got["interrupted"] is True
    assert got["round_ran"] == 1
    assert got["round_free"] is True
    assert got["sigint_blocked"] is False
    assert got["after_signal"] == 4


def test_a_signal_taken_by_another_thread_is_handled_while_the_main_thread_waits(farm_results: Results) -> None:
    """The kernel may hand a drain signal to a thread that does not block it
    (one MPI started before taskfarm could block it there); Python runs the
    handler only when the main thread runs, so a main thread waiting on a
    future, or for an executor's futures in shutdown, wakes every
    `MAIN_THREAD_WAIT_SLICE` (here: its handler opens the gate its tasks wait
    for, else they give up after 30 s)."""
    got = farm_results(SHORT_CUTS)
    assert got["sliced"] == ["released", "released"], got
    # and while it waits for an executor's futures in shutdown (leaving ``with``)
    assert got["shutdown_values"] == [True, True], got
    assert got["shutdown_took"] < 15.0, got


@pytest.mark.parametrize("wait", ["cf_wait", "as_completed", "result_timeout"])
def test_the_main_thread_runs_a_signal_handler_while_it_waits_in_concurrent_futures(
    farm_results: Results, wait: str
) -> None:
    """As above, while the main thread waits in `concurrent.futures.wait`,
    in ``as_completed`` (their waiters sleep on an event of their own, which
    `FarmFuture` slices when the main thread installs it), and in
    ``result()`` with a timeout (before, only a wait without one was sliced)."""
    got = farm_results(SHORT_CUTS)
    assert got[wait + "_values"] == [True, True], got
    assert got[wait + "_took"] < 15.0, got


def test_a_listening_thread_gives_the_doorbell_back_when_another_task_comes(farm_results: Results) -> None:
    """The short cut is for the farm's only task: a submit while a thread
    listens for one pokes it, and it goes back to the usual wait (a main
    thread's in slices).  Before, it listened until its task ended, and a
    main thread waiting on two tasks of which the second was not yet taken
    in listened too, so a signal handled by another thread waited for them."""
    got = farm_results(SHORT_CUTS)
    assert got["listened_alone"] is True, got
    assert got["company"] == "released"
    assert got["gave_back"] is True, got
    assert got["alone"] == "released"


def test_a_listening_thread_is_poked_when_the_service_thread_takes_its_result(farm_results: Results) -> None:
    """A result's ring that finds the listening thread off the doorbell wakes
    the service thread, which takes the result; it must poke the listener
    (`Farm._wake_listener`), or the listener sleeps until its safety-net
    look (turned off here: its wait's 30 s timeout)."""
    got = farm_results(SHORT_CUTS)
    assert got["listened_late"] is True  # the short cut was taken, and the result left to the service thread
    assert got["poked_value"] == "released"
    assert got["poked_took"] < 15.0, got


THREAD_LEVEL_SCRIPT = """\
import json
import sys

import mpi4py

mpi4py.rc.thread_level = sys.argv[2]
from mpi4py import MPI

import taskfarm

try:
    with taskfarm.farm() as ex:
        if ex is not None:
            ex.submit(abs, -1).result(60)
    out = {"error": None}
except taskfarm.BrokenFarmError as exc:
    out = {"error": type(exc).__name__, "names_the_level": "MPI_THREAD_FUNNELED" in str(exc)}
if MPI.COMM_WORLD.Get_rank() == 0:
    with open(sys.argv[1], "w") as f:
        json.dump(out, f)
"""


@pytest.mark.parametrize("level", ["funneled", "serialized"])
def test_mpi_initialised_without_enough_thread_support_is_refused(
    mpi: MPI, script: Callable[[str], Any], tmp_path: Any, level: str
) -> None:
    """taskfarm's threads call MPI one at a time: MPI_THREAD_SERIALIZED is
    enough, and MPI initialised with less before taskfarm was imported
    fails the farm with a clear error on every rank, no hang."""
    out = tmp_path / "out.json"
    path = script(THREAD_LEVEL_SCRIPT)
    run([*mpi.launch(2), mpi.python, str(path), str(out), level], timeout=TIMEOUT, env=mpi.env(), check=0)
    got = read_json(out)
    if level == "funneled":
        assert got == {"error": "BrokenFarmError", "names_the_level": True}
    else:
        assert got == {"error": None}


# --------------------------------------------------------------------------
# bundles: what their calls send back before the bundle ends
# --------------------------------------------------------------------------


BUNDLE_PARTS = section(
    "bundle_parts",
    "calls_ahead_of_a_long_one",
    """
    def quick_or_gated(i, gated, path):
        return wait_for(path, 120) if i == gated else i

    with taskfarm.FarmExecutor() as ex:
        for f in [ex.submit(quick_or_gated, i, -1, "") for i in range(50)]:
            f.result(60)  # the function is timed as quick: its calls are bundled
        # the gated call may happen to begin its bundle: then try another burst
        for attempt in range(5):
            gate = f"{GATE}.{attempt}"
            futures = [ex.submit(quick_or_gated, i, 100, gate) for i in range(200)]
            gated = futures[100]
            deadline = time.monotonic() + 60
            while gated._bundle <= 0 and time.monotonic() < deadline:  # until it is bundled
                time.sleep(0.001)
            ahead = [f for f in futures[:100] if f._bundle == gated._bundle]
            out["ahead"] = len(ahead)
            out["bundled"] = gated._bundle > 0
            deadline = time.monotonic() + 30
            while not all(f.done() for f in ahead) and time.monotonic() < deadline:
                time.sleep(0.001)
            out["ahead_done_while_gated"] = all(f.done() for f in ahead) and not gated.done()
            open(gate, "w").close()
            out["values"] = [f.result(120) for f in futures] == [*range(100), "released", *range(101, 200)]
            out["bursts"] = attempt + 1
            if ahead or not out["bundled"]:
                break
    """,
)


def test_calls_ahead_of_a_long_one_in_a_bundle_come_back_before_it_ends(farm_results: Results) -> None:
    """A bundle's calls used to come back together once its last call ended:
    one long call held back the results of those ahead of it (and their
    journal records), and a drain that cut the bundle off lost them.  Done
    calls now go while the bundle runs (`Kind.PARTS`)."""
    got = farm_results(BUNDLE_PARTS)
    assert got["bundled"] is True and got["ahead"] >= 1, got
    assert got["ahead_done_while_gated"] is True, got
    assert got["values"] is True, got
