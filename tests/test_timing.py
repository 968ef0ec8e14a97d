"""Timing rules end to end: countdown, eta, expires, priority and task states.

The scheduler's own rules are unit-tested on a fake clock here (the contract's
view: what a user of ``Task(countdown=, eta=, expires=, priority=)`` may rely
on); then one script under mpiexec checks that the farm keeps them, by counts
and order of execution, never by how long something took (only lower bounds:
"not before").
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import MPI, farm_run

from taskfarm._scheduler import MAX_PREFETCH, Actions, Scheduler
from taskfarm._task import TaskPolicy, TaskState

POLICY = TaskPolicy()


def one_worker(slots: int = 1) -> Scheduler:
    s = Scheduler()
    assert s.add_worker(1, slots, 0.0)
    return s


def sent(actions: Actions) -> list[int]:
    return [t for ids in actions.dispatch.values() for t in ids]


def submit(s: Scheduler, task_id: int, now: float = 0.0, **kwargs: object) -> None:
    s.submit(task_id, now, policy=POLICY, **kwargs)  # type: ignore[arg-type]


def done(s: Scheduler, task_id: int, now: float) -> None:
    s.finished(task_id, 1, now, ok=True, duration=1.0)  # long: prefetch stays at 1


# -- countdown / eta (both become the scheduler's not_before) --------------------
def test_countdown_not_dispatched_before_its_time() -> None:
    s = one_worker()
    submit(s, 1, now=0.0, not_before=2.0)
    assert s.state(1) is TaskState.SCHEDULED
    for t in (0.0, 1.0, 1.999):
        assert sent(s.poll(t)) == []
    assert s.next_wakeup() == 2.0  # the master sleeps until then, not longer
    assert sent(s.poll(2.0)) == [1]
    assert s.state(1) is TaskState.RUNNING


def test_timed_tasks_go_in_time_order_whatever_the_submission_order() -> None:
    s = one_worker(slots=4)
    for task_id, when in ((1, 3.0), (2, 1.0), (3, 2.0)):
        submit(s, task_id, not_before=when)
    order = []
    for t in (1.0, 2.0, 3.0):
        order += sent(s.poll(t))
    assert order == [2, 3, 1]


def test_countdown_and_inputs_both_must_be_satisfied() -> None:
    s = one_worker(slots=4)
    submit(s, 1)
    submit(s, 2, not_before=5.0, inputs=[1])
    assert sent(s.poll(0.0)) == [1]
    done(s, 1, 1.0)
    assert sent(s.poll(1.0)) == []  # input ready, countdown not yet
    assert s.state(2) is TaskState.SCHEDULED
    assert sent(s.poll(5.0)) == [2]
    s2 = one_worker(slots=4)
    submit(s2, 1, not_before=0.0)
    submit(s2, 2, not_before=1.0, inputs=[1])
    assert sent(s2.poll(0.0)) == [1]
    assert sent(s2.poll(2.0)) == []  # countdown passed, input still running
    done(s2, 1, 3.0)
    assert sent(s2.poll(3.0)) == [2]


# -- expires -----------------------------------------------------------------------
def test_expired_before_start_is_failed_not_run() -> None:
    s = one_worker()
    submit(s, 1, not_before=5.0, expires=3.0)  # countdown past its expiry
    actions = s.poll(5.0)
    assert actions.expired == [1] and sent(actions) == []
    assert s.state(1) is None


def test_started_in_time_never_expires_later() -> None:
    s = one_worker()
    submit(s, 1, expires=1.0)
    assert sent(s.poll(0.5)) == [1]
    assert s.poll(100.0).expired == []


def test_a_task_with_an_expiry_is_not_queued_behind_a_running_task() -> None:
    # with prefetch, a plain task would be queued on the busy worker at once; one with
    # an expiry must wait for a free slot, or it might start after it expired
    s = one_worker()
    submit(s, 1)
    assert sent(s.poll(0.0)) == [1]
    submit(s, 2, now=0.1, expires=1.0)
    submit(s, 3, now=0.1)  # a plain task behind it is still prefetched
    assert sent(s.poll(0.1)) == [3]
    assert s.state(2) is TaskState.PENDING
    actions = s.poll(1.5)  # task 1 still running past task 2's expiry
    assert actions.expired == [2] and sent(actions) == []


def test_a_task_with_an_expiry_starts_when_a_slot_frees_in_time() -> None:
    s = one_worker()
    submit(s, 1)
    assert sent(s.poll(0.0)) == [1]
    submit(s, 2, now=0.1, expires=5.0)
    assert sent(s.poll(0.1)) == []
    done(s, 1, 0.5)
    assert sent(s.poll(0.5)) == [2]


def test_an_expiring_task_goes_to_an_idle_rank_and_does_not_hold_up_others() -> None:
    s = Scheduler()
    for rank in (1, 2):
        assert s.add_worker(rank, 1, 0.0)
    submit(s, 1)
    (busy,) = s.poll(0.0).dispatch
    submit(s, 2, now=0.1, expires=5.0, priority=5)
    submit(s, 3, now=0.1, expires=5.0, priority=5)
    submit(s, 4, now=0.1)
    actions = s.poll(0.1)
    # 2 takes the idle rank; 3 finds no free slot and waits; 4 (no expiry) is still prefetched
    assert busy not in actions.dispatch or actions.dispatch[busy] == [4]
    assert sorted(sent(actions)) == [2, 4]
    assert s.state(3) is TaskState.PENDING


# -- priority ----------------------------------------------------------------------
def test_higher_priority_first_among_ready_tasks_then_oldest_first() -> None:
    s = one_worker(slots=8)
    for task_id, priority in ((1, 0), (2, 5), (3, 0), (4, 9), (5, 5)):
        submit(s, task_id, priority=priority)
    assert sent(s.poll(0.0)) == [4, 2, 5, 1, 3]


def test_priority_orders_tasks_that_become_ready_together() -> None:
    s = one_worker(slots=8)
    submit(s, 1)
    for task_id, priority in ((2, 0), (3, 0), (4, 10)):
        submit(s, task_id, priority=priority, inputs=[1])
    assert sent(s.poll(0.0)) == [1]
    done(s, 1, 1.0)
    assert sent(s.poll(1.0)) == [4, 2, 3]


def test_priority_does_not_preempt_but_goes_first_at_the_next_free_slot() -> None:
    s = one_worker()  # 1 slot, prefetch 1: holds 2 tasks
    submit(s, 1)
    submit(s, 2)
    assert sent(s.poll(0.0)) == [1, 2]
    submit(s, 3, now=0.1)
    submit(s, 4, now=0.1, priority=10)
    assert sent(s.poll(0.1)) == []  # full
    done(s, 1, 0.5)
    assert sent(s.poll(0.5)) == [4]


# -- under mpiexec ---------------------------------------------------------------------
TIMING_SCRIPT = r"""
import datetime, json, os, sys, time
import taskfarm
from taskfarm import Task, TaskExpired, TaskState
from taskfarm._scheduler import MAX_PREFETCH

tmp = sys.argv[2]

def stamp(tag, *inputs):
    return (tag, time.time())

def wait_file(path):
    for _ in range(4000):
        if os.path.exists(path):
            return time.time()
        time.sleep(0.005)
    raise TimeoutError(path)

def flaky(path):
    if not os.path.exists(path):
        open(path, "w").close()
        raise ConnectionError("first attempt fails")
    return "ok"

def boom():
    raise ValueError("boom")

def gate(name):
    return os.path.join(tmp, name)

def watch(future, wanted, limit=20.0):
    seen = []
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        state = future.state.value
        if not seen or seen[-1] != state:
            seen.append(state)
        if state in wanted:
            return seen
        time.sleep(0.002)
    return seen

out = {}
with taskfarm.FarmExecutor() as ex:
    # submit returns at once: the task is still waiting for its gate when submit is back
    f = ex.submit(wait_file, gate("async"))
    out["async_not_done"] = not f.done()
    open(gate("async"), "w").close()
    f.result(60)

    # priority among tasks that become ready together (all wait for one input)
    g = ex.submit(wait_file, gate("prio"))
    lows = [ex.submit_task(Task(stamp, (f"low{i}", g), priority=0)) for i in range(3)]
    high = ex.submit_task(Task(stamp, ("high", g), priority=10))
    open(gate("prio"), "w").close()
    done = sorted((x.result(60) for x in lows + [high]), key=lambda r: r[1])
    out["priority_gate"] = [tag for tag, _ in done]

    # priority against tasks submitted earlier: blocker on the only worker, then many low
    # ones (more than the worker's pipeline holds), then a high one
    blocker = ex.submit(wait_file, gate("block"))
    nlow = 2 * (MAX_PREFETCH + 1) + 10
    lows = [ex.submit(stamp, f"low{i}") for i in range(nlow)]
    high = ex.submit_task(Task(stamp, ("high",), priority=10))
    open(gate("block"), "w").close()
    done = sorted((x.result(60) for x in lows + [high]), key=lambda r: r[1])
    out["priority_blocker"] = {"position": [tag for tag, _ in done].index("high"), "lows": nlow,
                               "max_prefetch": MAX_PREFETCH}

    # countdown: not before it; a later plain task runs first
    t0 = time.time()
    delayed = ex.submit_task(Task(stamp, ("countdown",), countdown=0.5))
    out["countdown_state"] = delayed.state.value
    plain = ex.submit(stamp, "plain")
    r_delayed, r_plain = delayed.result(60), plain.result(60)
    out["countdown"] = {"late_enough": r_delayed[1] >= t0 + 0.5, "after_plain": r_delayed[1] > r_plain[1]}

    # eta, as a Unix time and as a datetime
    eta = time.time() + 0.4
    a = ex.submit_task(Task(stamp, ("eta",), eta=eta))
    b = ex.submit_task(Task(stamp, ("eta_dt",), eta=datetime.datetime.fromtimestamp(eta)))
    out["eta"] = [a.result(60)[1] >= eta, b.result(60)[1] >= eta]

    # expires: a countdown past the expiry; a task stuck behind a running one; one in time
    c = ex.submit_task(Task(stamp, ("x",), countdown=0.6, expires=time.time() + 0.2))
    blocker = ex.submit(wait_file, gate("expire"))
    time.sleep(0.1)
    behind = ex.submit_task(Task(stamp, ("behind",), expires=time.time() + 0.3))
    time.sleep(0.6)
    open(gate("expire"), "w").close()
    in_time = ex.submit_task(Task(stamp, ("in_time",), expires=time.time() + 60))
    out["expires"] = {
        "countdown_past_expiry": type(c.exception(60)).__name__,
        "behind_running": type(behind.exception(60)).__name__,
        "in_time": in_time.result(60)[0],
        "state": c.state.value,
    }

    # states
    states = {}
    sched = ex.submit_task(Task(stamp, ("later",), countdown=60))
    states["scheduled"] = sched.state.value
    states["cancel"] = sched.cancel()
    states["cancelled"] = sched.state.value
    running = ex.submit(wait_file, gate("run"))
    states["running_seen"] = watch(running, {"RUNNING"})
    states["running_rank"] = running.rank
    behind_running = [ex.submit(stamp, i) for i in range(2 * (MAX_PREFETCH + 1) + 10)]
    # the worker is blocked: once the first is sent (RUNNING: queued there) the pipeline's
    # worth went with it, and nothing more goes until the gate opens
    states["first_queued"] = watch(behind_running[0], {"RUNNING"})[-1]
    states["pending"] = sum(1 for x in behind_running if x.state is TaskState.PENDING)
    states["queued_on_worker"] = sum(1 for x in behind_running if x.state is TaskState.RUNNING)
    open(gate("run"), "w").close()
    running.result(60)
    states["success"] = running.state.value
    for x in behind_running:
        x.result(60)
    retrying = ex.submit_task(Task(flaky, (gate("flaky"),), max_retries=1, retry_backoff=1.0, retry_jitter=False))
    states["retry_seen"] = watch(retrying, {"RETRY", "SUCCESS", "FAILURE"})
    states["retry_result"] = retrying.result(60)
    states["retry_final"] = retrying.state.value
    failing = ex.submit(boom)
    failing.exception(60)
    states["failure"] = failing.state.value
    out["states"] = states
with open(sys.argv[1], "w") as f:
    json.dump(out, f)
"""


@pytest.mark.mpi
def test_timing_and_states_under_mpiexec(mpi: MPI, tmp_path: Path) -> None:
    script = tmp_path / "timing.py"
    script.write_text(TIMING_SCRIPT)
    out = tmp_path / "out.json"
    # one worker: the order in which tasks ran is the order the farm chose
    farm_run(mpi, 2, ["run", "-q", str(script), str(out), str(tmp_path)], timeout=90)
    r = json.loads(out.read_text())
    assert r["async_not_done"]
    assert r["priority_gate"] == ["high", "low0", "low1", "low2"]
    pb = r["priority_blocker"]
    # the high task overtakes every low one still waiting at the master: only those already
    # in the worker's pipeline (at most MAX_PREFETCH + 1) run before it
    assert pb["position"] <= pb["max_prefetch"] + 1 < pb["lows"]
    assert r["countdown_state"] == "SCHEDULED"
    assert r["countdown"] == {"late_enough": True, "after_plain": True}
    assert r["eta"] == [True, True]
    assert r["expires"] == {
        "countdown_past_expiry": "TaskExpired",
        "behind_running": "TaskExpired",
        "in_time": "in_time",
        "state": "FAILURE",
    }
    st = r["states"]
    assert st["scheduled"] == "SCHEDULED" and st["cancel"] is True and st["cancelled"] == "CANCELLED"
    assert st["running_seen"][-1] == "RUNNING" and st["running_rank"] == 1
    # more than the worker's pipeline holds: some are sent there (RUNNING), the rest wait, PENDING
    assert st["first_queued"] == "RUNNING"
    assert st["pending"] > 0 and st["queued_on_worker"] > 0
    assert st["success"] == "SUCCESS"
    assert "RETRY" in st["retry_seen"] and st["retry_result"] == "ok" and st["retry_final"] == "SUCCESS"
    assert st["failure"] == "FAILURE"


def test_max_prefetch_is_what_the_script_assumes() -> None:
    # the MPI script sizes its queues from MAX_PREFETCH (so that the priority/pending
    # checks are not vacuous), about 2 x MAX_PREFETCH tasks each: a much deeper cap
    # would make it long
    assert 1 <= MAX_PREFETCH <= 512
