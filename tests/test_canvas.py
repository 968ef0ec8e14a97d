"""chain, group, chord: what each submits (over a recording executor), and real DAGs under mpiexec."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from conftest import MPI, farm_run

import taskfarm
from taskfarm import FarmFuture, GroupResult, Signature, Task, chain, chord, group, signature


def add(a: int, b: int) -> int:
    return a + b


def total(xs: list[int]) -> int:
    return sum(xs)


class Recorder:
    """Records the Tasks a canvas submits; hands out unresolved futures."""

    def __init__(self) -> None:
        self.tasks: list[Task] = []
        self.futures: list[FarmFuture] = []

    def submit_task(self, task: Task) -> FarmFuture:
        self.tasks.append(task)
        future = FarmFuture(len(self.tasks), label=task.fn.__name__)
        self.futures.append(future)
        return future


@pytest.fixture
def rec() -> Recorder:
    return Recorder()


def test_chain_passes_each_result_as_the_next_first_argument(rec: Recorder) -> None:
    last = chain(signature(add, 1, 2), signature(add, 10), signature(total)).submit(rec)  # type: ignore[arg-type]
    first, second, third = rec.tasks
    assert first.args == (1, 2)
    assert second.args == (rec.futures[0], 10)
    assert third.args == (rec.futures[1],)
    assert last is rec.futures[2]


def test_pipe_operator_builds_the_same_chain(rec: Recorder) -> None:
    canvas = signature(add, 1, 2) | signature(add, 3) | signature(add, 4)
    assert isinstance(canvas, chain) and len(canvas.tasks) == 3  # nested chains are flattened
    canvas.submit(rec)  # type: ignore[arg-type]
    assert [t.args for t in rec.tasks] == [(1, 2), (rec.futures[0], 3), (rec.futures[1], 4)]


def test_immutable_signature_ignores_the_previous_result(rec: Recorder) -> None:
    chain(signature(add, 1, 2), signature(add, 5, 5).set(immutable=True)).submit(rec)  # type: ignore[arg-type]
    assert rec.tasks[1].args == (5, 5)


def test_group_members_run_side_by_side_and_share_the_parent(rec: Recorder) -> None:
    result = chain(signature(add, 1, 1), group(signature(add, 1), signature(add, 2))).submit(rec)  # type: ignore[arg-type]
    assert isinstance(result, GroupResult) and list(result) == rec.futures[1:]
    assert rec.tasks[1].args == (rec.futures[0], 1) and rec.tasks[2].args == (rec.futures[0], 2)


def test_group_of_a_generator_and_of_a_list(rec: Recorder) -> None:
    assert len(group(signature(add, i, i) for i in range(4))) == 4
    assert len(group([signature(add, i, i) for i in range(3)])) == 3
    assert len(group()) == 0


def test_chord_body_gets_the_list_of_the_header_futures(rec: Recorder) -> None:
    body = chord([signature(add, i, i) for i in range(3)], signature(total)).submit(rec)  # type: ignore[arg-type]
    assert rec.tasks[-1].args == (rec.futures[:3],)
    assert type(rec.tasks[-1].args[0]) is list  # a plain list: the master fills it with values
    assert body is rec.futures[-1]


def test_group_pipe_signature_is_a_chord(rec: Recorder) -> None:
    canvas = group(signature(add, 1, 1), signature(add, 2, 2)) | signature(total)
    assert isinstance(canvas, chord)


def test_nested_groups_give_nested_lists(rec: Recorder) -> None:
    header = group(group(signature(add, 1, 1), signature(add, 2, 2)), signature(add, 3, 3))
    chord(header, signature(total)).submit(rec)  # type: ignore[arg-type]
    f = rec.futures
    assert rec.tasks[-1].args == ([[f[0], f[1]], f[2]],)


def test_empty_chord_header_gives_the_body_an_empty_list(rec: Recorder) -> None:
    chord([], signature(total)).submit(rec)  # type: ignore[arg-type]
    assert rec.tasks == [Task(total, ([],))]


def test_task_objects_and_callables_are_steps_with_their_options(rec: Recorder) -> None:
    chain(Task(add, (1, 2), priority=7, max_retries=2), total).submit(rec)  # type: ignore[arg-type]
    assert rec.tasks[0].priority == 7 and rec.tasks[0].max_retries == 2
    assert rec.tasks[1].fn is total and rec.tasks[1].args == (rec.futures[0],)


def test_set_gives_task_options_without_changing_the_original(rec: Recorder) -> None:
    s = signature(add, 1, 2)
    t = s.set(countdown=5, priority=3, expires=1e12)
    assert s.options == {} and t.options == {"countdown": 5, "priority": 3, "expires": 1e12}
    t.submit(rec)  # type: ignore[arg-type]
    assert rec.tasks[0].countdown == 5 and rec.tasks[0].priority == 3


def test_bad_steps_and_options_are_refused() -> None:
    with pytest.raises(TypeError, match="unknown task option"):
        signature(add, 1).set(countdwn=3)
    with pytest.raises(TypeError, match="callable"):
        Signature(42)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="canvas step"):
        chain(signature(add, 1, 1), 42)
    with pytest.raises(ValueError, match="at least one"):
        chain()


def test_repr_reads_like_celery() -> None:
    assert repr(signature(add, 1, b=2)) == "s:add(1, b=2)"
    assert repr(signature(add, 1, 2) | signature(total)) == "s:add(1, 2) | s:total()"


def test_group_result_get_ready_and_counts() -> None:
    a, b, c = FarmFuture(1), FarmFuture(2), FarmFuture(3)
    result = GroupResult([a, GroupResult([b]), c])
    assert not result.ready()
    for f, v in ((a, 1), (b, 2)):
        f.set_running_or_notify_cancel()
        f.set_result(v)
    assert result.completed_count() == 2 and not result.ready()
    with pytest.raises(TimeoutError):
        result.get(timeout=0.01)
    c.set_running_or_notify_cancel()
    c.set_exception(ValueError("c"))
    assert result.ready() and result.failed() and not result.successful()
    with pytest.raises(ValueError, match="c"):
        result.get()


def test_exported_from_taskfarm() -> None:
    for name in ("chain", "group", "chord", "signature", "Signature", "GroupResult", "PeriodicTask"):
        assert name in taskfarm.__all__ and hasattr(taskfarm, name)


# -- under mpiexec --------------------------------------------------------------------
CANVAS_SCRIPT = r"""
import json, sys, time
import taskfarm
from taskfarm import Task, chain, chord, group, signature as s

def add(a, b): return a + b
def mul(a, b): return a * b
def inc(x): return x + 1
def ident(x): return x
def total(xs): return sum(xs)
def boom(*args): raise ValueError("boom")
def deep_sum(tree):
    if isinstance(tree, dict):
        return sum(deep_sum(v) for v in tree.values())
    if isinstance(tree, (list, tuple)):
        return sum(deep_sum(v) for v in tree)
    return tree
def wait_file(path):
    import os
    for _ in range(2000):
        if os.path.exists(path):
            return 1
        time.sleep(0.005)
    raise TimeoutError(path)

width, gate = int(sys.argv[2]), sys.argv[3]
out = {}
with taskfarm.FarmExecutor() as ex:
    out["chain"] = chain(s(add, 2, 2), s(add, 4), s(mul, 8)).submit(ex).result()
    out["pipe"] = (s(add, 1, 1) | s(mul, 10)).submit(ex).result()
    out["group"] = group(s(mul, i, i) for i in range(6)).submit(ex).get()
    out["chord"] = chord([s(add, i, i) for i in range(10)], s(total)).submit(ex).result()
    out["mixed"] = chain(s(add, 1, 1), group(s(add, 1), s(mul, 10)), s(total)).submit(ex).result()
    out["immutable"] = chain(s(add, 1, 1), s(add, 5, 5).set(immutable=True)).submit(ex).result()

    # futures as inputs at any depth in Task.args and in submit's arguments
    a, b, c = ex.submit(ident, 1), ex.submit(ident, 20), ex.submit(ident, 300)
    nested = {"x": [a, (b, {"y": [c, [a]]})], "z": (4000,)}
    out["nested_task"] = ex.submit_task(Task(deep_sum, (nested,))).result()
    out["nested_submit"] = ex.submit(deep_sum, [[[[[a]]]], {"k": (b,)}]).result()

    # a failed input fails its dependents with DependencyFailed naming it; the others run
    gate_bad = ex.submit(wait_file, gate + ".bad")
    bad = ex.submit(boom, gate_bad)
    after = ex.submit(inc, bad)
    after2 = ex.submit(inc, after)
    ok = ex.submit(inc, gate_bad)
    open(gate + ".bad", "w").close()
    errors = {}
    for name, f in (("bad", bad), ("after", after), ("after2", after2)):
        e = f.exception(60)
        errors[name] = [type(e).__name__, str(e)]
    out["failure"] = {"ids": [bad.task_id, after.task_id], "errors": errors, "ok": ok.result(),
                      "states": [bad.state.value, after.state.value, ok.state.value]}
    head_fail = chord([s(inc, 1), s(boom), s(inc, 2)], s(total)).submit(ex)
    out["chord_failure"] = type(head_fail.exception(60)).__name__

    # a dependent is SCHEDULED while its input runs
    gated = ex.submit(wait_file, gate)
    dependent = ex.submit(inc, gated)
    out["scheduled_state"] = dependent.state.value
    open(gate, "w").close()
    out["gated"] = dependent.result(60)

    # wide: a chord over 10,000 tasks, and 10,000 tasks that depend on one input
    t = time.monotonic()
    out["wide"] = chord([s(ident, i) for i in range(width)], s(total)).submit(ex).result()
    fan = chain(s(ident, 1), group(s(add, i) for i in range(width))).submit(ex)
    out["fan_out"] = sum(fan.get())
    out["wide_seconds"] = time.monotonic() - t
with open(sys.argv[1], "w") as f:
    json.dump(out, f)
"""


@pytest.mark.mpi
def test_canvas_and_dependencies_under_mpiexec(mpi: MPI, tmp_path: Path) -> None:
    width = 10_000
    script = tmp_path / "canvas.py"
    script.write_text(CANVAS_SCRIPT)
    out = tmp_path / "out.json"
    farm_run(mpi, 3, ["run", "-q", str(script), str(out), str(width), str(tmp_path / "gate")], timeout=120)
    r = json.loads(out.read_text())
    assert r["chain"] == 64 and r["pipe"] == 20
    assert r["group"] == [i * i for i in range(6)]
    assert r["chord"] == sum(2 * i for i in range(10))
    assert r["mixed"] == 3 + 20 and r["immutable"] == 10
    assert r["nested_task"] == 1 + 20 + 300 + 1 + 4000 and r["nested_submit"] == 21
    fail = r["failure"]
    bad_id, after_id = fail["ids"]
    assert fail["errors"]["bad"][0] == "ValueError"
    assert fail["errors"]["after"][0] == "DependencyFailed"
    assert f"input task {bad_id} " in fail["errors"]["after"][1]  # names the failed input
    assert fail["errors"]["after2"][0] == "DependencyFailed"
    assert f"input task {after_id} " in fail["errors"]["after2"][1]
    assert fail["ok"] == 2
    assert fail["states"] == ["FAILURE", "FAILURE", "SUCCESS"]
    assert r["chord_failure"] == "DependencyFailed"
    assert r["scheduled_state"] == "SCHEDULED" and r["gated"] == 2
    assert r["wide"] == sum(range(width))
    assert r["fan_out"] == sum(1 + i for i in range(width))


DEEP_SCRIPT = r"""
import json, sys, time
import taskfarm
from taskfarm import chain, signature as s

def inc(x): return x + 1

depth = int(sys.argv[2])
with taskfarm.FarmExecutor() as ex:
    t = time.monotonic()
    steps = chain(s(inc, 0), *[s(inc) for _ in range(depth - 1)])
    last = steps.submit(ex)
    submitted = time.monotonic() - t
    value = last.result()
    stats = ex.statistics()
with open(sys.argv[1], "w") as f:
    json.dump({"value": value, "submit_seconds": submitted, "seconds": time.monotonic() - t,
               "done": stats.done, "failed": stats.failed}, f)
"""


@pytest.mark.mpi
def test_deep_chain_does_not_deadlock(mpi: MPI, tmp_path: Path) -> None:
    # one round trip per step: 10,000 under MPICH; Open MPI's round trip is slower here, so fewer
    depth = 10_000 if mpi.name == "mpich" else 1_000
    script = tmp_path / "deep.py"
    script.write_text(DEEP_SCRIPT)
    out = tmp_path / "out.json"
    farm_run(mpi, 2, ["run", "-q", str(script), str(out), str(depth)], timeout=120)
    r = json.loads(out.read_text())
    assert r["value"] == depth and r["done"] == depth and r["failed"] == 0


ADMISSION_SCRIPT = r"""
import json, os, sys, time
import taskfarm
from taskfarm import chain, signature as s

def boom(*args): raise ValueError("boom")
def inc(x): return x + 1
def wait_file(path):
    for _ in range(2000):
        if os.path.exists(path):
            return 1
        time.sleep(0.005)
    raise TimeoutError(path)

out = {}
with taskfarm.FarmExecutor() as ex:
    # an input failed before its dependents are submitted; both dependents reach the master
    # in one round (keep the GIL meanwhile): the first fails at admission, the second must too
    bad = ex.submit(boom)
    bad.exception(60)
    sys.setswitchinterval(1.0)
    first = ex.submit(inc, bad)
    second = ex.submit(inc, first)
    sys.setswitchinterval(0.005)
    out["first"] = type(first.exception(30)).__name__
    out["second"] = type(second.exception(30)).__name__

    # the same with a cancel: c fails as a dependent of cancelled b in the round d arrives
    gate = ex.submit(wait_file, sys.argv[3])
    b = ex.submit(inc, gate)
    c = ex.submit(inc, b)
    deadline = time.monotonic() + 30  # until the master has admitted them: waiting for inputs
    while {b.state.value, c.state.value} != {"SCHEDULED"} and time.monotonic() < deadline:
        time.sleep(0.002)
    out["admitted"] = [b.state.value, c.state.value]
    sys.setswitchinterval(1.0)
    out["cancelled"] = b.cancel()
    d = ex.submit(inc, c)
    sys.setswitchinterval(0.005)
    open(sys.argv[3], "w").close()
    out["c"] = type(c.exception(30)).__name__
    out["d"] = type(d.exception(30)).__name__

    # a deep chain whose head fails at once: every step fails, none runs, no hang
    last = chain(s(boom), *[s(inc) for _ in range(int(sys.argv[2]))]).submit(ex)
    out["deep"] = type(last.exception(60)).__name__
    out["still_works"] = ex.submit(inc, 1).result(30)
with open(sys.argv[1], "w") as f:
    json.dump(out, f)
"""


def _run_admission(mpi: MPI, tmp_path: Path) -> tuple[dict[str, Any], str]:
    script = tmp_path / "admission.py"
    script.write_text(ADMISSION_SCRIPT)
    out = tmp_path / "out.json"
    res = farm_run(mpi, 2, ["run", "-q", str(script), str(out), "10000", str(tmp_path / "gate")], timeout=60)
    return json.loads(out.read_text()), res.stderr


@pytest.mark.mpi
def test_dependents_of_inputs_failed_in_the_same_round_fail_too(mpich: MPI, tmp_path: Path) -> None:
    r, _ = _run_admission(mpich, tmp_path)
    assert r == {
        "first": "DependencyFailed",
        "second": "DependencyFailed",
        "admitted": ["SCHEDULED", "SCHEDULED"],
        "cancelled": True,
        "c": "DependencyFailed",
        "d": "DependencyFailed",
        "deep": "DependencyFailed",
        "still_works": 2,
    }


@pytest.mark.mpi
def test_no_dispatch_order_bug_after_a_cancel(mpich: MPI, tmp_path: Path) -> None:
    _, stderr = _run_admission(mpich, tmp_path)
    assert "dispatch-order bug" not in stderr
