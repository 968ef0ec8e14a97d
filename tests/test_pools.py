"""Worker pools: solo, threads, processes; async tasks; rank 0 working (docs/pools.md).

The first half tests the runners of `taskfarm._pools` in this process (no
MPI): child processes, time limits, validation.  The second half runs farms
under mpiexec and shows concurrency by counting overlapping task intervals
per rank, never by timing a run.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import json
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import MPI, Result, farm_run, read_json

from taskfarm import _serialization as ser
from taskfarm._errors import SerializationError, TimeLimitExceeded, WorkerLostError
from taskfarm._pools import (
    CHILD_ENV,
    BundleProgress,
    Child,
    EventLoop,
    Library,
    Outcome,
    PoolSpec,
    Revocation,
    call_limited,
    execute,
    execute_parts,
    parse_size,
)
from taskfarm._protocol import FnRef, Initializer, Kind, Part, PartResult, PartValues, TaskItem

# --------------------------------------------------------------------------
# Runners in this process (tasks are mostly stdlib functions, so that a
# child does not have to import this test module: it starts faster)
# --------------------------------------------------------------------------


def _item(fn: Any, *args: Any, task_id: int = 1, time_limit: float | None = None) -> tuple[TaskItem, Library]:
    digest, payload = ser.FunctionCache().get(fn)
    call, buffers = ser.dumps((args, {}), "argument")
    item = TaskItem(task_id, 1, FnRef(digest, payload), call, buffers, (), time_limit)
    library = Library()
    library.learn(item.fn)
    return item, library


def _value(outcome: Outcome) -> Any:
    value = ser.loads(outcome.payload, outcome.buffers)
    if not outcome.ok:
        assert isinstance(value, BaseException)
    return value


def getpid_and_env(names: tuple[str, ...]) -> tuple[int, dict[str, str | None]]:
    import mpi4py

    env = {name: os.environ.get(name) for name in names}
    env["mpi4py_initialize"] = str(mpi4py.rc.initialize)
    return os.getpid(), env


@pytest.fixture
def child_cleanup() -> Any:
    children: list[Child] = []
    yield children
    for child in children:
        child.kill()


def test_child_keeps_running_tasks_without_mpi_or_launcher_variables(
    monkeypatch: pytest.MonkeyPatch, child_cleanup: list[Child]
) -> None:
    monkeypatch.setenv("PMI_RANK", "3")
    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "3")
    monkeypatch.setenv("TASKFARM_TEST_KEPT", "yes")
    names = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "TASKFARM_TEST_KEPT", CHILD_ENV)
    item, library = _item(getpid_and_env, names)
    child = Child(library, 1, "host")
    child_cleanup.append(child)
    first = child.run(item, 0, "head\n")
    second = child.run(item._replace(task_id=2, fn=FnRef(item.fn.digest, None)), 0, "head\n")
    pid, env = _value(first)
    assert first.ok and second.ok
    assert _value(second)[0] == pid == child.pid != os.getpid()  # one child, reused
    assert env == {
        "PMI_RANK": None,
        "OMPI_COMM_WORLD_RANK": None,
        "TASKFARM_TEST_KEPT": "yes",
        CHILD_ENV: "1",
        "mpi4py_initialize": "False",
    }
    assert child.tasks == 2 and child.rss > 0


def test_child_large_result_travels_out_of_band(child_cleanup: list[Child]) -> None:
    import numpy

    item, library = _item(numpy.ones, 1 << 17)
    child = Child(library, 1, "host")
    child_cleanup.append(child)
    outcome = child.run(item, 0, "")
    assert outcome.ok and outcome.buffers  # the 1 MiB went as its own buffer
    value = _value(outcome)
    assert value.shape == (1 << 17,) and value.sum() == 1 << 17


@pytest.mark.parametrize(
    ("fn", "args", "described"),
    [(os._exit, (7,), "exited with code 7"), (ctypes.string_at, (0,), "was killed by SIGSEGV")],
)
def test_child_that_dies_fails_its_task_with_worker_lost(
    fn: Any, args: tuple[Any, ...], described: str, child_cleanup: list[Child]
) -> None:
    item, library = _item(fn, *args)
    child = Child(library, 1, "host")
    child_cleanup.append(child)
    outcome = child.run(item, 0, "head\n")
    assert not outcome.ok and outcome.crashed
    error = _value(outcome)
    assert isinstance(error, WorkerLostError)
    assert described in str(error) and f"pid {child.pid}" in str(error)
    assert outcome.traceback.startswith("head\n")
    assert not child.alive()


def test_child_killed_from_outside_fails_its_task(child_cleanup: list[Child]) -> None:
    item, library = _item(time.sleep, 30)
    child = Child(library, 1, "host")
    child_cleanup.append(child)
    threading.Timer(0.3, os.kill, (child.pid, signal.SIGKILL)).start()
    outcome = child.run(item, 0, "")
    assert outcome.crashed and "was killed by SIGKILL" in str(_value(outcome))


def test_child_over_its_time_limit_is_killed(child_cleanup: list[Child]) -> None:
    item, library = _item(time.sleep, 30, time_limit=0.3)
    child = Child(library, 1, "host")
    child_cleanup.append(child)
    started = time.monotonic()
    outcome = child.run(item, 0, "")
    assert time.monotonic() - started < 5
    assert not outcome.ok and not outcome.crashed  # a time limit is not a crash
    assert isinstance(_value(outcome), TimeLimitExceeded)
    assert not child.alive()


def record_init(path: str) -> None:
    with open(path, "a") as f:
        f.write(f"{os.getpid()}\n")


def test_child_runs_the_executor_initializer_once(tmp_path: Path, child_cleanup: list[Child]) -> None:
    item, library = _item(os.getpid)
    digest, payload = ser.FunctionCache().get(record_init)
    marks = tmp_path / "inits"
    library.add_initializer(Initializer(5, FnRef(digest, payload), ser.dumps(((str(marks),), {}), "argument")[0]))
    child = Child(library, 1, "host")
    child_cleanup.append(child)
    pids = {_value(child.run(item, 5, "")) for _ in range(3)}
    assert pids == {child.pid}
    assert marks.read_text().split() == [str(child.pid)]


def spin(seconds: float) -> str:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass
    return "finished"


def catch_everything() -> str:
    try:
        spin(10)
    except Exception:  # noqa: BLE001 - a task that swallows its time limit
        pass
    return "carried on"


async def sleepy(seconds: float) -> str:
    import asyncio

    await asyncio.sleep(seconds)
    return "slept"


def _on(where: str, work: Callable[[], None], join_seconds: float) -> None:
    """Run ``work`` on the main thread ("main...") or in a thread of its own."""
    if where.startswith("main"):
        work()
    else:
        thread = threading.Thread(target=work)
        thread.start()
        thread.join(join_seconds)


@pytest.mark.parametrize("where", ["main", "thread"])
@pytest.mark.parametrize("fn", [spin, catch_everything])
def test_inline_time_limit_stops_python_code(where: str, fn: Any) -> None:
    outcome: list[Any] = []

    def attempt() -> None:
        started = time.monotonic()
        try:
            call_limited(fn, (10,) if fn is spin else (), {}, 0.2, None)
        except TimeLimitExceeded as exc:
            outcome.append((exc, time.monotonic() - started))

    _on(where, attempt, 30)
    assert outcome, "the time limit did not fire"
    assert outcome[0][1] < 3
    time.sleep(0.3)  # no stray asynchronous exception arrives later
    assert call_limited(spin, (0.01,), {}, 5.0, None) == "finished"


#: set by the tasks below once they run, so that a revocation is sent only then
_RUNNING = threading.Event()


def sleep_long() -> str:
    _RUNNING.set()
    time.sleep(30)  # one blocking call: only a signal cuts it short
    return "slept"


def swallow_exceptions() -> str:
    _RUNNING.set()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            time.sleep(0.01)
        except Exception:  # noqa: BLE001 - a task that swallows errors does not swallow a revocation
            pass
    return "carried on"


def _run_revoked(fn: Callable[[], str], revocation: Revocation, task_id: int) -> tuple[Outcome, float, bool]:
    """Run ``fn`` as task ``task_id`` under ``revocation``; another thread revokes it once it runs."""
    _RUNNING.clear()
    revoked = []
    revoker = threading.Thread(target=lambda: revoked.append(_RUNNING.wait(10) and revocation.revoke(task_id)))
    revoker.start()
    started = time.monotonic()
    outcome = execute(lambda: fn, (), (), (), None, "head\n", revocation=revocation, task_id=task_id)
    took = time.monotonic() - started
    revoker.join(10)
    return outcome, took, revoked == [True]


def _as_slot(where: str, revocation: Revocation, work: Callable[[], None]) -> None:
    """Run ``work`` as a slot would: on the main thread (the solo pool, with
    the signal's handler; without it, as an asynchronous exception), or in a
    thread of its own."""
    with revocation.installed() if where == "main" else contextlib.nullcontext():
        _on(where, work, 60)


@pytest.mark.parametrize(
    ("where", "fn"),
    [
        ("main", sleep_long),
        ("main", swallow_exceptions),
        ("main-no-handler", swallow_exceptions),
        ("thread", swallow_exceptions),
    ],
)
def test_a_revoked_task_is_cut_off_and_the_slot_runs_on(where: str, fn: Callable[[], str]) -> None:
    """A speculative copy that lost: cut off on the main thread by a signal (even
    inside ``time.sleep``), in a slot thread by an asynchronous exception; a
    late revocation of it never touches the slot's next task."""
    revocation = Revocation()
    results: list[tuple[Outcome, float, bool]] = []

    def serve() -> None:
        results.append(_run_revoked(fn, revocation, 7))
        # the next task, and a revocation of the old one that comes too late
        revocation.begin(8)
        assert not revocation.revoke(7)
        revocation.end()
        outcome = execute(lambda: lambda: "next", (), (), (), None, "", revocation=revocation, task_id=8)
        results.append((outcome, 0.0, False))

    _as_slot(where, revocation, serve)
    assert len(results) == 2, "the slot did not run on"
    (cut, took, revoked), (after, _, _) = results
    assert revoked and not cut.ok and took < 10
    assert type(_value(cut)).__name__ == "_Revoked"
    assert after.ok and _value(after) == "next"


def quick_or_long(i: int) -> int:
    if i == 2:
        swallow_exceptions()
    return i


@pytest.mark.parametrize("where", ["main", "thread"])
def test_a_bundle_cut_off_stops_at_the_call_it_was_in(where: str) -> None:
    """A drain's Stop cuts a running bundle off: the calls before it keep
    their values, the call it lands in fails, the calls after never run."""
    parts, function = _parts(quick_or_long, (1,), (2,), (3,), (4,))
    revocation = Revocation()
    _RUNNING.clear()
    cutter = threading.Thread(target=lambda: _RUNNING.wait(10) and revocation.cut_off())
    cutter.start()
    got: list[tuple[list[PartResult], PartValues | None]] = []

    def run() -> None:
        got.append(execute_parts(parts, function, "", revocation=revocation, task_id=9))

    _as_slot(where, revocation, run)
    cutter.join(10)
    (results, values), = got
    assert values is not None and values.task_ids == [1] and values.values == [1]
    assert [(r.task_id, r.ok) for r in results] == [(2, False)]  # 3 and 4 never ran
    assert type(ser.loads(results[0].payload, results[0].buffers)).__name__ == "_Revoked"
    assert not revocation.cut_off()  # nothing runs now


def test_a_revocation_names_its_task_and_cuts_a_child_once() -> None:
    revocation = Revocation()
    cuts: list[int] = []
    revocation.begin(3, cut=lambda: cuts.append(3))
    assert not revocation.revoke(4)  # another task: not this slot's
    assert revocation.revoke(3) and not revocation.revoke(3)
    revocation.end()
    assert cuts == [3] and not revocation.revoke(3)


def test_async_time_limit_cancels_on_a_shared_loop() -> None:
    loop = EventLoop()
    try:
        assert call_limited(sleepy, (0.01,), {}, 5.0, loop) == "slept"
        started = time.monotonic()
        with pytest.raises(TimeLimitExceeded):
            call_limited(sleepy, (30,), {}, 0.2, loop)
        assert time.monotonic() - started < 3
    finally:
        loop.close()


def divide_or_sleep(how: str, x: int) -> Any:
    """A bundle's one function, with a value, an error or a coroutine to give."""
    return sleepy(x) if how == "sleep" else divmod(7, x)


def _parts(fn: Any, *calls: tuple[Any, ...]) -> tuple[tuple[Part, ...], Callable[[], Any]]:
    """A bundle's parts and its function's loader, as the worker has them."""
    library = Library()
    ref = FnRef(*ser.FunctionCache().get(fn))
    library.learn(ref)
    parts = tuple(Part(task_id, ser.dumps((args, {}), "argument")[0]) for task_id, args in enumerate(calls, 1))
    return parts, lambda: library.function(ref.digest)


def test_bundle_parts_each_get_their_own_outcome() -> None:
    parts, function = _parts(divide_or_sleep, ("div", 2), ("div", 0), ("sleep", 0), ("div", 7))
    results, values = execute_parts(parts, function, "HEAD\n")
    assert values is None  # tuples, an exception, and a str from a coroutine: each a part
    assert [r.task_id for r in results] == [1, 2, 3, 4]
    assert [r.ok for r in results] == [True, False, True, True]
    assert [ser.loads(r.payload, r.buffers) for r in results[::2]] == [(3, 1), "slept"]  # a coroutine is awaited
    assert ser.loads(results[3].payload, results[3].buffers) == (1, 0)
    error = ser.loads(results[1].payload, results[1].buffers)
    assert isinstance(error, ZeroDivisionError)
    assert results[1].traceback.startswith("HEAD\n") and "ZeroDivisionError" in results[1].traceback
    assert results[0].traceback == "" and results[3].traceback == ""
    # one clock reading ends a call and starts the next: the parts tile the bundle's time
    assert all(a.t_end == b.t_start for a, b in itertools.pairwise(results))
    assert all(r.t_start <= r.t_end for r in results)


def same(x: Any) -> Any:
    return x


def test_bundle_values_of_plain_types_ride_as_they_are() -> None:
    """Values of exactly the plain types go in the columns, without a pickle
    of their own; a list, or an int subclass, gets a part as before."""
    plain: list[Any] = [None, True, 7, 1.5, 2j, "s", b"b"]
    parts, function = _parts(same, *[(v,) for v in plain[:3]], ([1],), *[(v,) for v in plain[3:]], (Kind.TASKS,))
    results, values = execute_parts(parts, function, "")
    assert [r.task_id for r in results] == [4, 9] and all(r.ok for r in results)
    assert [ser.loads(r.payload, r.buffers) for r in results] == [[1], Kind.TASKS]
    assert values is not None
    assert values.task_ids == [1, 2, 3, 5, 6, 7, 8]
    assert values.values == plain and [type(v) for v in values.values] == [type(v) for v in plain]
    # the same clock readings as parts: each call starts where the one before ended
    assert values.t_starts[1:3] == values.t_ends[:2] and values.t_starts[3] == results[0].t_end
    assert results[1].t_start == values.t_ends[-1]


def test_bundle_values_of_numpy_scalars_ride_as_they_are() -> None:
    """numpy's numeric scalars (what numeric functions return) go in the
    columns too, keeping their types; a numpy array or string still gets a part."""
    numeric: list[Any] = [np.float64(1.5), np.int64(7), np.bool_(True), np.float32(0.25), np.complex128(2j)]
    parts, function = _parts(same, *[(v,) for v in numeric], (np.zeros(2),), (np.str_("s"),))
    results, values = execute_parts(parts, function, "")
    assert values is not None and values.task_ids == [1, 2, 3, 4, 5]
    assert values.values == numeric and [type(v) for v in values.values] == [type(v) for v in numeric]
    assert [r.task_id for r in results] == [6, 7]


def test_bundle_parts_take_scalar_arguments_as_they_are() -> None:
    """A part's call is its pickle, or the scalar arguments themselves (a tuple)."""
    parts, function = _parts(divide_or_sleep, ("div", 2))
    parts = (*parts, Part(2, (None, 3)), Part(3, ("div", 0)))  # `divide_or_sleep(how, x)`
    results, values = execute_parts(parts, function, "")
    assert values is None
    assert [r.ok for r in results] == [True, True, False]
    assert [ser.loads(r.payload, r.buffers) for r in results[:2]] == [(3, 1), (2, 1)]
    assert isinstance(ser.loads(results[2].payload, results[2].buffers), ZeroDivisionError)


def test_bundle_parts_fail_alike_when_the_initializer_failed() -> None:
    parts, function = _parts(len, ("a",), ("bc",))
    cause = RuntimeError("no database")
    results, values = execute_parts(parts, function, "", init_error=cause)
    assert values is None and [r.ok for r in results] == [False, False]
    for r in results:
        error = ser.loads(r.payload, r.buffers)
        assert type(error).__name__ == "BrokenFarmError" and "no database" in str(error)


def test_bundle_parts_fail_alike_when_the_function_cannot_be_loaded_once_per_bundle() -> None:
    parts, _ = _parts(len, ("a",), ("bc",), ("def",))
    loads: list[int] = []

    def function() -> Any:
        loads.append(1)
        raise ImportError("No module named 'gone'")  # as dill loading a function from a missing module

    results, values = execute_parts(parts, function, "HEAD\n")
    assert loads == [1] and values is None
    assert [(r.task_id, r.ok) for r in results] == [(1, False), (2, False), (3, False)]
    for r in results:
        assert isinstance(ser.loads(r.payload, r.buffers), ImportError) and r.traceback.startswith("HEAD\n")


def test_pool_spec_validation_and_sizes() -> None:
    assert PoolSpec.make() == PoolSpec("solo", 1)
    assert PoolSpec.make(concurrency=4) == PoolSpec("threads", 4)
    assert PoolSpec.make("processes", 2, 10, 1 << 30) == PoolSpec("processes", 2, 10, 1 << 30)
    for bad in ({"pool": "fork"}, {"pool": "solo", "concurrency": 2}, {"concurrency": 0}, {"max_tasks_per_child": 0}):
        with pytest.raises(ValueError):
            PoolSpec.make(**bad)
    assert parse_size("2G") == 2 << 30 and parse_size("500M") == 500 << 20
    assert parse_size("64k") == 64 << 10 and parse_size("1.5GiB") == 3 << 29 and parse_size("4096") == 4096
    for bad_size in ("", "lots", "-1M", "0"):
        with pytest.raises(ValueError):
            parse_size(bad_size)


def test_task_and_executor_reject_unknown_isolation() -> None:
    from taskfarm import Task

    with pytest.raises(ValueError):
        Task(print, isolation="container")
    assert Task(print, isolation="process").policy_overrides()["isolation"] == "process"


# --------------------------------------------------------------------------
# Pools under MPI
# --------------------------------------------------------------------------


OVERLAP = r"""
import asyncio, json, os, sys, threading, time
import taskfarm

def sync_task(i):
    start = time.monotonic()
    time.sleep(0.1)
    return os.environ["TASKFARM_RANK"], start, time.monotonic(), threading.current_thread().name

async def async_task(i):
    start = time.monotonic()
    await asyncio.sleep(0.1)
    return os.environ["TASKFARM_RANK"], start, time.monotonic(), threading.current_thread().name

with taskfarm.FarmExecutor() as ex:
    out = {}
    for name, fn in (("sync", sync_task), ("async", async_task)):
        fs = [ex.submit(fn, i) for i in range(int(sys.argv[1]))]
        out[name] = [f.result() for f in fs]
print("RESULT " + json.dumps(out))
"""


def _result_line(res: Result) -> Any:
    for line in res.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    pytest.fail(f"no RESULT line\n{res.explain()}")


def _max_overlap(intervals: list[tuple[float, float]]) -> int:
    """Most intervals open at once (an end at the same instant as a start closes first)."""
    points = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    open_now = most = 0
    for _, step in points:
        open_now += step
        most = max(most, open_now)
    return most


@pytest.mark.mpi
@pytest.mark.parametrize(("pool", "k"), [("solo", 1), ("threads", 3), ("processes", 2)])
def test_each_rank_runs_k_tasks_at_once_and_never_more(
    mpich: MPI, pool: str, k: int, tmp_path: Path, script: Any
) -> None:
    stats_path = tmp_path / "stats.json"
    tasks = 8 * k
    cli = ["run", "--pool", pool, "--concurrency", str(k), "--stats-json", str(stats_path), "-q"]
    res = farm_run(mpich, 3, [*cli, str(script(OVERLAP)), str(tasks)], timeout=120)
    out = _result_line(res)
    for kind in ("sync", "async"):
        by_rank: dict[str, list[tuple[float, float]]] = {}
        for rank, start, end, _ in out[kind]:
            by_rank.setdefault(rank, []).append((start, end))
        assert sorted(by_rank) == ["1", "2"], (kind, by_rank.keys())
        overlaps = {rank: _max_overlap(intervals) for rank, intervals in by_rank.items()}
        assert overlaps == {"1": k, "2": k}, (kind, overlaps)
    threads = {name for *_, name in out["async"]}
    if pool == "threads":
        assert threads == {"taskfarm-asyncio"}  # the rank's coroutines share one event loop
        assert {name for *_, name in out["sync"]} <= {f"taskfarm-slot-{i}" for i in range(k)}
    elif pool == "solo":
        assert threads == {"MainThread"}
    stats = read_json(stats_path)
    assert stats["pool"] == pool and stats["concurrency"] == k
    assert stats["done"] == 2 * tasks
    for rank in ("1", "2"):
        r = stats["ranks"][rank]
        assert r["slots"] == k and r["pool"] == pool
        assert len(r["slot_busy_fraction"]) == k
        assert 0 < r["busy_fraction"] <= 1


ASYNC_DRIVER = r"""
import asyncio, json, time
import taskfarm

def square(i):
    time.sleep(0.01 * (i % 3))
    return i * i

async def main():
    with taskfarm.FarmExecutor() as ex:
        one = await asyncio.wrap_future(ex.submit(square, 12))
        fs = [ex.submit(square, i) for i in range(30)]
        ticks = 0
        async def ticker():
            nonlocal ticks
            while True:
                await asyncio.sleep(0.001)
                ticks += 1
        tick = asyncio.ensure_future(ticker())
        order = []
        async for f in taskfarm.as_completed_async(fs):
            order.append(f.result())
        tick.cancel()
        gathered = await asyncio.gather(*(asyncio.wrap_future(f) for f in fs))
        try:
            async for f in taskfarm.as_completed_async([ex.submit(time.sleep, 1)], timeout=0.1):
                pass
            timed_out = False
        except TimeoutError:
            timed_out = True
    return {"one": one, "order": sorted(order), "gathered": gathered, "ticks": ticks, "timed_out": timed_out}

print("RESULT " + json.dumps(asyncio.run(main())))
"""


@pytest.mark.mpi
def test_asyncio_program_on_rank0_awaits_farm_futures(mpich: MPI, script: Any) -> None:
    res = farm_run(mpich, 3, ["run", "-q", str(script(ASYNC_DRIVER))], timeout=60)
    out = _result_line(res)
    squares = [i * i for i in range(30)]
    assert out["one"] == 144
    assert out["order"] == squares and out["gathered"] == squares
    assert out["ticks"] > 0  # the loop kept running while results were awaited
    assert out["timed_out"]


TINY = r"""
import json, os, sys
import taskfarm

def where(i):
    return i * i, os.environ["TASKFARM_RANK"], os.getpid(), os.environ.get("TASKFARM_CHILD")

with taskfarm.FarmExecutor() as ex:
    fs = [ex.submit(where, i) for i in range(int(sys.argv[1]))]
    out = [f.result() for f in fs]
print("RESULT " + json.dumps({"ok": [o[0] for o in out] == [i * i for i in range(len(out))],
                              "where": sorted({(o[1], o[2], o[3]) for o in out}), "master": os.getpid()}))
"""


@pytest.mark.mpi
@pytest.mark.parametrize("pool", ["solo", "processes"])
def test_master_works_takes_a_share_of_many_tiny_tasks(mpi: MPI, pool: str, tmp_path: Path, script: Any) -> None:
    if pool == "processes" and mpi.name == "openmpi":
        pytest.skip("once under MPICH keeps the suite short")
    stats_path = tmp_path / "stats.json"
    cli = ["run", "--master-works", "--pool", pool, "--stats-json", str(stats_path), "-q"]
    res = farm_run(mpi, 3, [*cli, str(script(TINY)), "3000"], timeout=120)
    out = _result_line(res)
    assert out["ok"]
    stats = read_json(stats_path)
    assert stats["master_works"] is True
    assert stats["done"] == 3000 and stats["duplicates"] == 0
    assert sorted(stats["ranks"]) == ["0", "1", "2"]
    assert all(r["tasks"] > 0 for r in stats["ranks"].values()), stats["ranks"]
    assert stats["ranks"]["0"]["slots"] == 1
    rank0 = [(pid, child) for rank, pid, child in out["where"] if rank == "0"]
    if pool == "processes":
        assert rank0 and all(pid != out["master"] and child == "1" for pid, child in rank0)
    else:
        assert rank0 == [(out["master"], None)]


LEAKY = r"""
import json, os, sys
import taskfarm

LEAK = []

def leak(i, megabytes):
    LEAK.append(b"\x01" * (megabytes << 20))
    return os.getpid()

with taskfarm.FarmExecutor() as ex:
    pids = [ex.submit(leak, i, int(sys.argv[1])).result() for i in range(int(sys.argv[2]))]
print("RESULT " + json.dumps(pids))
"""


@pytest.mark.mpi
@pytest.mark.parametrize(
    ("limit", "megabytes", "per_child"),
    [(["--max-tasks-per-child", "3"], 0, 3), (["--max-memory-per-child", "100M"], 40, 2)],
)
def test_leaky_children_are_recycled_between_tasks(
    mpich: MPI, limit: list[str], megabytes: int, per_child: int, tmp_path: Path, script: Any
) -> None:
    stats_path = tmp_path / "stats.json"
    cli = ["run", "--pool", "processes", *limit, "--stats-json", str(stats_path), "-q"]
    res = farm_run(mpich, 2, [*cli, str(script(LEAKY)), str(megabytes), "9"], timeout=120)
    pids = _result_line(res)
    runs = [len(list(group)) for _, group in __import__("itertools").groupby(pids)]
    assert runs == [per_child] * (9 // per_child) + ([9 % per_child] if 9 % per_child else [])
    assert len(set(pids)) == len(runs)  # a recycled child never comes back
    stats = read_json(stats_path)
    assert stats["ranks"]["1"]["child_restarts"] == len(runs) - 1 + (9 % per_child == 0)


def test_unpicklable_result_in_a_child_fails_only_its_task(child_cleanup: list[Child]) -> None:
    item, library = _item(threading.Lock)
    child = Child(library, 1, "host")
    child_cleanup.append(child)
    outcome = child.run(item, 0, "")
    assert not outcome.ok and not outcome.crashed
    assert isinstance(_value(outcome), SerializationError)
    assert child.alive()


PROGRESS: list[BundleProgress] = []
TAKEN: list[tuple[list[PartResult], PartValues | None]] = []
SINCE: list[float] = []


def take_at_three(x: Any) -> Any:
    """The comm thread's part, played by the third call: it takes what is done."""
    if x == 3:
        SINCE.append(PROGRESS[0].waiting_since())  # when call 1 ended
        TAKEN.append(PROGRESS[0].take())
    return [x] if x == 2 else x


def test_a_bundles_calls_done_are_taken_once_by_whoever_takes_first() -> None:
    """`BundleProgress`: the calls done by the time another thread takes them
    go with that take (the comm thread sends them, `Kind.PARTS`), and the
    bundle's own result has only the rest; each call once, in order."""
    PROGRESS[:] = [BundleProgress()]
    TAKEN.clear()
    SINCE.clear()
    parts, function = _parts(take_at_three, (1,), (2,), (3,), (4,))
    results, values = execute_parts(parts, function, "", progress=PROGRESS[0])
    ((early_results, early_values),) = TAKEN
    assert early_values is not None and early_values.task_ids == [1] and early_values.values == [1]
    assert [early_values.t_ends[0]] == SINCE
    assert [r.task_id for r in early_results] == [2] and ser.loads(early_results[0].payload, ()) == [2]
    assert results == [] and values is not None and values.task_ids == [3, 4] and values.values == [3, 4]
    assert PROGRESS[0].take() == ([], None) and PROGRESS[0].waiting_since() == 0.0  # nothing twice
