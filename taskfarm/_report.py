"""Human-readable views of a farm: the end-of-run summary, logging, and ``taskfarm report``.

* `summary_rows` turns a statistics dict (what ``--stats-json`` writes) into
  sections of plain values; `format_summary` only lays them out, so tests
  check the numbers on the structure, not on the wording.
* `SlowestTasks` keeps the N slowest tasks of a run (a farm listener with a
  small heap); the CLI stores them in the statistics under ``slowest``.
* `RunReporting` is what ``taskfarm run`` attaches to each farm: the event
  log, the progress display and `SlowestTasks`.
* `Timeline` reads a journal or an event log for ``taskfarm report``, which
  prints a summary of it or draws it (`plot_timeline`, needs matplotlib).
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
import json
import logging
import os
import sys
import time
from collections.abc import Iterable, Mapping
from typing import IO, Any, NamedTuple

from ._events import EventLog, EventsFormatError, is_event_log, read_events
from ._progress import DEFAULT_INTERVAL, Progress, write_line

#: slowest tasks kept in the statistics (``slowest``) and shown in the summary
SLOWEST_KEPT = 10
SLOWEST_SHOWN = 5
#: slowest tasks outlined in the timeline
SLOWEST_OUTLINED = 5
#: ``TASKFARM_LOG_LEVEL``: the ``taskfarm`` loggers' level unless -v/-q say otherwise
LOG_LEVEL_VARIABLE = "TASKFARM_LOG_LEVEL"
#: default size of ``report --plot`` in pixels
DEFAULT_PLOT_SIZE = (1000, 620)
PLOT_DPI = 100


# -- the summary ---------------------------------------------------------------------
class Section(NamedTuple):
    """One part of the summary: named columns and rows of plain values.

    ``table`` sections print as a table under a header; the others as one
    line of ``column value`` pairs per row.
    """

    name: str
    columns: tuple[str, ...]
    rows: tuple[tuple[Any, ...], ...]
    table: bool = False

    def dicts(self) -> list[dict[str, Any]]:
        return [dict(zip(self.columns, row)) for row in self.rows]


def summary_rows(stats: Mapping[str, Any], *, slowest: int = SLOWEST_SHOWN) -> list[Section]:
    """The summary's numbers, from a statistics dict (`FarmStatistics.as_dict` + ``slowest``).

    Sections: ``tasks`` (counts by state), ``time`` (wall seconds, tasks per
    second, workers alive, mean busy fraction, tasks that went in bundles), ``recovery`` (retries,
    resubmissions, steals, lost ranks), ``ranks`` (per worker rank: tasks,
    failed attempts, busy seconds and fraction of the wall time, alive) and
    ``slowest`` (the slowest tasks, longest first).
    """
    wall = float(stats.get("wall_time") or 0.0)
    submitted = int(stats.get("submitted") or 0)
    done = int(stats.get("done") or 0)
    failed = int(stats.get("failed") or 0)
    cancelled = int(stats.get("cancelled") or 0)
    unfinished = max(0, submitted - done - failed - cancelled)
    ranks: Mapping[str, Mapping[str, Any]] = stats.get("ranks") or {}
    rank_rows = []
    busy_total = 0.0
    for rank, r in sorted(ranks.items(), key=lambda item: int(item[0])):
        busy = float(r.get("busy_time") or 0.0)
        busy_total += busy
        rank_rows.append(
            (
                int(rank),
                str(r.get("host", "?")),
                int(r.get("tasks") or 0),
                int(r.get("failed") or 0),
                busy,
                busy / wall if wall > 0 else 0.0,
                bool(r.get("alive", True)),
            )
        )
    mean_busy = busy_total / (wall * len(rank_rows)) if wall > 0 and rank_rows else 0.0
    sections = [
        Section(
            "tasks",
            ("submitted", "done", "failed", "cancelled", "unfinished"),
            ((submitted, done, failed, cancelled, unfinished),),
        ),
        Section(
            "time",
            ("wall_s", "tasks_per_s", "workers", "mean_busy", "bundled"),
            (
                (
                    wall,
                    done / wall if wall > 0 else 0.0,
                    int(stats.get("workers") or 0),
                    mean_busy,
                    int(stats.get("bundled") or 0),
                ),
            ),
        ),
        Section(
            "recovery",
            ("retried", "resubmitted", "stolen", "lost_ranks"),
            (
                (
                    int(stats.get("retried") or 0),
                    int(stats.get("resubmitted") or 0),
                    int(stats.get("stolen") or 0),
                    tuple(int(r) for r in stats.get("lost_ranks") or ()),
                ),
            ),
        ),
        Section("ranks", ("rank", "host", "tasks", "failed", "busy_s", "busy", "alive"), tuple(rank_rows), True),
    ]
    slow = [
        (float(s.get("seconds") or 0.0), s.get("rank"), s.get("task"), str(s.get("label") or ""))
        for s in (stats.get("slowest") or ())[:slowest]
    ]
    if slow:
        sections.append(Section("slowest", ("seconds", "rank", "task", "label"), tuple(slow), True))
    return sections


def format_summary(stats: Mapping[str, Any]) -> str:
    """The end-of-run summary: `summary_rows` laid out as a few short lines and tables."""
    sections = {s.name: s for s in summary_rows(stats)}
    t = sections["tasks"].dicts()[0]
    tm = sections["time"].dicts()[0]
    rc = sections["recovery"].dicts()[0]
    head = f"taskfarm summary: {t['done']} of {t['submitted']} tasks done in {tm['wall_s']:.2f} s"
    if stats.get("exit_code") is not None:
        head += f", exit {stats['exit_code']}"
    if stats.get("drained"):
        head += " (stopped early)"
    lines = [
        head,
        f"  tasks     submitted {t['submitted']}  done {t['done']}  failed {t['failed']}  "
        f"cancelled {t['cancelled']}  unfinished {t['unfinished']}",
        f"  time      wall {tm['wall_s']:.2f} s  throughput {_rate(tm['tasks_per_s'])} tasks/s  "
        f"workers {tm['workers']}  mean busy {tm['mean_busy']:.0%}"
        + (f"  bundled {tm['bundled']}" if tm["bundled"] else ""),
        f"  recovery  retried {rc['retried']}  resubmitted {rc['resubmitted']}  stolen {rc['stolen']}  "
        f"lost ranks {','.join(map(str, rc['lost_ranks'])) or '-'}",
    ]
    ranks = sections["ranks"]
    if ranks.rows:
        lines.append("  rank  host              tasks  failed    busy_s  busy  state")
        for r in ranks.dicts():
            lines.append(
                f"  {r['rank']:>4}  {r['host'][:16]:<16}  {r['tasks']:>5}  {r['failed']:>6}  "
                f"{r['busy_s']:>8.2f}  {r['busy']:>4.0%}  {'ok' if r['alive'] else 'LOST'}"
            )
    if "slowest" in sections:
        lines.append("  slowest   seconds  rank    task  label")
        for s in sections["slowest"].dicts():
            rank = "?" if s["rank"] is None else s["rank"]
            lines.append(f"          {s['seconds']:>9.3f}  {rank:>4}  {str(s['task'])[:12]:>6}  {s['label'][:40]}")
    return "\n".join(lines) + "\n"


def _rate(value: float) -> str:
    return f"{value:.1f}" if value < 100 else f"{value:.0f}"


# -- listeners -------------------------------------------------------------------------
class SlowestTasks:
    """A farm listener keeping the ``n`` slowest successful tasks (a min-heap, O(log n) each)."""

    def __init__(self, n: int = SLOWEST_KEPT) -> None:
        self.n = n
        self._heap: list[tuple[float, int, Mapping[str, Any]]] = []
        self._seq = itertools.count()

    def __call__(self, event: str, fields: dict[str, Any]) -> None:
        if event != "succeeded":
            return
        seconds = float(fields["end"]) - float(fields["start"])
        heap = self._heap
        if len(heap) < self.n:
            heapq.heappush(heap, (seconds, next(self._seq), fields))
        elif seconds > heap[0][0]:
            heapq.heapreplace(heap, (seconds, next(self._seq), fields))

    def rows(self) -> list[dict[str, Any]]:
        """Longest first: ``seconds``, ``task``, ``key``, ``label``, ``rank``, ``attempt``, ``start``, ``end``."""
        out = []
        for seconds, _, f in sorted(self._heap, key=lambda item: (-item[0], item[1])):
            out.append(
                {
                    "seconds": round(seconds, 6),
                    "task": f.get("task"),
                    "key": f.get("key"),
                    "label": f.get("label"),
                    "rank": f.get("rank"),
                    "attempt": f.get("attempt"),
                    "start": f.get("start"),
                    "end": f.get("end"),
                }
            )
        return out


class RunReporting:
    """What ``taskfarm run`` attaches to every farm: event log, progress, slowest tasks."""

    def __init__(
        self,
        *,
        events: str | None = None,
        progress: bool = False,
        interval: float = DEFAULT_INTERVAL,
        stream: IO[str] | None = None,
        meta: Mapping[str, Any] | None = None,
    ) -> None:
        self.slowest = SlowestTasks()
        self.events = EventLog(events, meta=meta) if events else None
        self._progress_on = progress
        self._interval = interval
        self._stream = stream
        self.progress: Progress | None = None
        self._total: int | None = None
        self._farms = 0
        self._finished = False

    def attach(self, farm: Any) -> None:
        """The `on_new_farm` hook: listen to ``farm`` from its start."""
        self._farms += 1
        if self.progress is not None:
            self.progress.close()
            self.progress = None
        farm.add_listener(self.slowest)
        if self.events is not None:
            farm.add_listener(self.events)
            self.events(
                "farm_started",
                {"farm": self._farms, "workers": len(farm.transport.peers()), "t": time.time()},
            )
        if self._progress_on:
            self.progress = Progress(self._stream, interval=self._interval, total=self._total)
            farm.add_listener(self.progress)
        if self.events is not None or self.progress is not None:
            # workers that said Hello before the listeners were added
            ranks = farm.statistics().ranks
            if self.events is not None:
                self.events.catch_up(ranks)
            if self.progress is not None:
                self.progress.catch_up(ranks)
        if self.progress is not None:
            self.progress.start(farm)

    def set_total(self, total: int | None) -> None:
        """The number of tasks the run will have, when known up front (a task file)."""
        self._total = total
        if self.progress is not None:
            self.progress.total = total

    def finish(self, stats: dict[str, Any] | None) -> None:
        """Stop the progress display; add ``slowest`` to ``stats``; close the event log with them."""
        if self._finished:
            return
        self._finished = True
        if self.progress is not None:
            self.progress.close()
        if stats is not None:
            stats["slowest"] = self.slowest.rows()
        if self.events is not None:
            self.events.close({"stats": stats} if stats is not None else {})


# -- logging ---------------------------------------------------------------------------
class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Log lines to stderr that leave a live progress bar intact."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            write_line(self.stream, self.format(record))
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


def log_level(verbosity: int = 0, environ: Mapping[str, str] | None = None) -> int:
    """The ``taskfarm`` loggers' level: -v debug, -q errors only, else ``TASKFARM_LOG_LEVEL`` or WARNING."""
    if verbosity > 0:
        return logging.DEBUG
    if verbosity < 0:
        return logging.ERROR
    text = (environ if environ is not None else os.environ).get(LOG_LEVEL_VARIABLE, "").strip()
    if not text:
        return logging.WARNING
    if text.lstrip("-").isdigit():
        return int(text)
    level = logging.getLevelName(text.upper())
    return level if isinstance(level, int) else logging.WARNING


def setup_logging(verbosity: int = 0, *, rank0: bool = True, stream: IO[str] | None = None) -> int:
    """Configure the ``taskfarm`` loggers for a CLI run; returns the level.

    On every rank the level is set (workers forward their records to rank 0,
    which shows them with their rank).  On rank 0 a handler prints them to
    stderr; they do not propagate to the root logger, so a script's own
    ``logging.basicConfig`` neither doubles nor hides them.
    """
    level = log_level(verbosity)
    logger = logging.getLogger("taskfarm")
    logger.setLevel(level)
    if rank0:
        for handler in list(logger.handlers):
            if isinstance(handler, _StderrHandler):
                logger.removeHandler(handler)
        handler = _StderrHandler(stream if stream is not None else sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s taskfarm %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
        logger.propagate = False
    return level


# -- reading a run back: taskfarm report ---------------------------------------------
@dataclasses.dataclass(frozen=True)
class Bar:
    """One attempt of a task on a rank, as the timeline draws it."""

    rank: int
    start: float
    end: float
    #: "succeeded", "failed", "retried", "lost" (its rank died) or "running" (never finished)
    outcome: str
    task: str
    label: str


#: final states, as the journal names them
_FINAL_BY_EVENT = {
    "submitted": "PENDING",
    "dispatched": "RUNNING",
    "succeeded": "SUCCESS",
    "failed": "FAILURE",
    "retried": "RETRY",
    "cancelled": "CANCELLED",
}


@dataclasses.dataclass
class Timeline:
    """What a journal or an event log says about who ran what, when."""

    source: str  # "events" or "journal"
    bars: list[Bar] = dataclasses.field(default_factory=list)
    #: task -> final state (PENDING, RUNNING, RETRY, SUCCESS, FAILURE, CANCELLED)
    states: dict[str, str] = dataclasses.field(default_factory=dict)
    labels: dict[str, str] = dataclasses.field(default_factory=dict)
    hosts: dict[int, str] = dataclasses.field(default_factory=dict)
    #: rank -> time it was declared lost
    lost: dict[int, float] = dataclasses.field(default_factory=dict)
    resubmitted: int = 0
    t0: float = 0.0
    t1: float = 0.0

    @classmethod
    def from_events(cls, records: Iterable[Mapping[str, Any]]) -> Timeline:
        """Every attempt of every task; lost ranks and the tasks they held."""
        tl = cls("events")
        farm = 0
        running: dict[str, tuple[int, float]] = {}  # task -> (rank, dispatch time) of its attempt
        times = []
        for rec in records:
            event = rec.get("event")
            t = rec.get("t")
            if isinstance(t, (int, float)):
                times.append(float(t))
            if event == "farm_started":
                farm = int(rec.get("farm") or farm + 1)
                continue
            if event == "worker_joined":
                tl.hosts[int(rec["rank"])] = str(rec.get("host") or "?")
                continue
            if event == "rank_lost":
                rank = int(rec["rank"])
                tl.lost.setdefault(rank, float(rec["t"]))
                resubmitted = rec.get("resubmitted") or []
                tl.resubmitted += len(resubmitted)
                for task_id in resubmitted:
                    task = _task_name(farm, task_id)
                    held = running.pop(task, None)
                    if held is not None and held[0] == rank:
                        tl.bars.append(Bar(rank, held[1], float(rec["t"]), "lost", task, tl.labels.get(task, "")))
                continue
            if event not in _FINAL_BY_EVENT or rec.get("task") is None:
                continue
            task = _task_name(farm, rec["task"])
            if rec.get("label"):
                tl.labels[task] = str(rec["label"])
            if tl.states.get(task) in ("SUCCESS", "FAILURE", "CANCELLED") and event != "submitted":
                continue
            tl.states[task] = _FINAL_BY_EVENT[event]
            if event == "dispatched":
                running[task] = (int(rec["rank"]), float(rec["t"]))
            elif event in ("succeeded", "failed", "retried"):
                running.pop(task, None)
                if rec.get("rank") is not None and rec.get("start") is not None:
                    tl.bars.append(
                        Bar(
                            int(rec["rank"]),
                            float(rec["start"]),
                            float(rec["end"]),
                            str(event),
                            task,
                            tl.labels.get(task, ""),
                        )
                    )
        if times:
            tl.t0, tl.t1 = min(times), max(times)
        for task, (rank, start) in running.items():
            tl.bars.append(Bar(rank, start, max(tl.t1, start), "running", task, tl.labels.get(task, "")))
        return tl

    @classmethod
    def from_journal(cls, state: Any) -> Timeline:
        """The latest attempt of each task (a journal keeps no history of attempts or lost ranks)."""
        tl = cls("journal")
        times: list[float] = []
        for run in state.runs:
            if isinstance(run.get("time"), (int, float)):
                times.append(float(run["time"]))
        outcome = {"SUCCESS": "succeeded", "FAILURE": "failed", "RETRY": "retried", "RUNNING": "running"}
        for key, entry in state.tasks.items():
            tl.states[key] = entry.state
            tl.labels[key] = entry.label
            times += [t for t in (entry.t_submit, entry.t_start, entry.t_end) if t is not None]
        if times:
            tl.t0, tl.t1 = min(times), max(times)
        for key, entry in state.tasks.items():
            kind = outcome.get(entry.state)
            if kind is None or entry.rank is None or entry.t_start is None:
                continue
            end = entry.t_end if entry.t_end is not None else tl.t1
            tl.bars.append(Bar(entry.rank, entry.t_start, max(end, entry.t_start), kind, key, entry.label))
        return tl

    def ranks(self) -> list[int]:
        return sorted({b.rank for b in self.bars} | set(self.hosts) | set(self.lost))

    def stats(self) -> dict[str, Any]:
        """A statistics dict of the same shape as ``--stats-json`` (the fields a file can tell)."""
        counts = dict.fromkeys(("PENDING", "RUNNING", "RETRY", "SUCCESS", "FAILURE", "CANCELLED"), 0)
        for state in self.states.values():
            counts[state] = counts.get(state, 0) + 1
        wall = max(0.0, self.t1 - self.t0)
        ranks: dict[str, dict[str, Any]] = {}
        for rank in self.ranks():
            mine = [b for b in self.bars if b.rank == rank and b.outcome in ("succeeded", "failed", "retried")]
            ranks[str(rank)] = {
                "host": self.hosts.get(rank, "?"),
                "tasks": sum(1 for b in mine if b.outcome == "succeeded"),
                "failed": sum(1 for b in mine if b.outcome != "succeeded"),
                "busy_time": sum(b.end - b.start for b in mine),
                "alive": rank not in self.lost,
            }
        done = sorted((b for b in self.bars if b.outcome == "succeeded"), key=lambda b: b.start - b.end)
        return {
            "source": self.source,
            "submitted": len(self.states),
            "done": counts["SUCCESS"],
            "failed": counts["FAILURE"],
            "cancelled": counts["CANCELLED"],
            "states": counts,
            "retried": sum(1 for b in self.bars if b.outcome == "retried"),
            "resubmitted": self.resubmitted,
            "stolen": 0,
            "workers": sum(1 for r in ranks.values() if r["alive"]),
            "lost_ranks": sorted(self.lost),
            "wall_time": wall,
            "ranks": ranks,
            "slowest": [
                {"seconds": round(b.end - b.start, 6), "task": b.task, "label": b.label, "rank": b.rank}
                for b in done[:SLOWEST_KEPT]
            ],
        }


def _task_name(farm: int, task_id: Any) -> str:
    return str(task_id) if farm <= 1 else f"{farm}:{task_id}"


def load_timeline(path: str | os.PathLike[str]) -> Timeline:
    """A journal or an event log (told apart by their first bytes) as a `Timeline`."""
    if is_event_log(path):
        return Timeline.from_events(read_events(path))
    from ._journal import read_journal

    return Timeline.from_journal(read_journal(path, results=False))


# -- the picture ---------------------------------------------------------------------
class PlotUnavailable(RuntimeError):
    """matplotlib is not installed."""


_COLOURS = {
    "succeeded": ("#3b6ea8", "#8db3dd"),  # alternate, so neighbouring tasks stay apart
    "failed": ("#d62728",),
    "retried": ("#ff9f1c",),
    "lost": ("#7f7f7f",),
    "running": ("#c7c7c7",),
}


def plot_timeline(tl: Timeline, path: str | os.PathLike[str], *, size: tuple[int, int] = DEFAULT_PLOT_SIZE) -> None:
    """Draw a per-rank Gantt chart and a histogram of task durations into a PNG of ``size`` pixels."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import Patch
    except ImportError:
        raise PlotUnavailable(
            "taskfarm report --plot needs matplotlib: pip install 'taskfarm[plot]' (or pip install matplotlib)"
        ) from None
    stats = tl.stats()
    width, height = size
    fig = plt.figure(figsize=(width / PLOT_DPI, height / PLOT_DPI), dpi=PLOT_DPI)
    grid = fig.add_gridspec(2, 1, height_ratios=(3, 1.15), hspace=0.35, left=0.13, right=0.97, top=0.86, bottom=0.09)
    gantt = fig.add_subplot(grid[0])
    hist = fig.add_subplot(grid[1])
    t0 = tl.t0
    ranks = tl.ranks()
    end = max(tl.t1 - t0, 1e-6)

    # the Gantt chart: one row per rank, one bar per attempt
    by_rank: dict[int, list[Bar]] = {r: [] for r in ranks}
    for b in tl.bars:
        by_rank.setdefault(b.rank, []).append(b)
    for rank, bars in by_rank.items():
        bars.sort(key=lambda b: b.start)
        groups: dict[str, list[tuple[float, float]]] = {}
        n_ok = 0
        for b in bars:
            colours = _COLOURS.get(b.outcome, ("#000000",))
            colour = colours[n_ok % len(colours)]
            if b.outcome == "succeeded":
                n_ok += 1
            groups.setdefault(colour, []).append((b.start - t0, max(b.end - b.start, end * 1e-4)))
        for colour, spans in groups.items():
            gantt.broken_barh(spans, (rank - 0.38, 0.76), facecolors=colour, linewidth=0)
        failed = [b.end - t0 for b in bars if b.outcome in ("failed", "retried")]
        if failed:
            gantt.plot(failed, [rank - 0.47] * len(failed), "v", color="#d62728", markersize=4, linestyle="none")
    # stragglers: the slowest successful tasks, outlined
    finished = [b for b in tl.bars if b.outcome == "succeeded"]
    stragglers = sorted(finished, key=lambda b: b.start - b.end)[:SLOWEST_OUTLINED]
    for b in stragglers:
        gantt.broken_barh(
            [(b.start - t0, b.end - b.start)], (b.rank - 0.38, 0.76), facecolors="none", edgecolors="black", linewidth=1
        )
    for rank, t_lost in tl.lost.items():
        gantt.broken_barh([(t_lost - t0, max(end - (t_lost - t0), 0))], (rank - 0.45, 0.9), facecolors="#f6c6c6")
        gantt.plot([t_lost - t0], [rank], "X", color="#a00000", markersize=9)
        gantt.annotate(
            "rank lost",
            (t_lost - t0, rank),
            xytext=(6, 0),
            textcoords="offset points",
            va="center",
            fontsize=8,
            color="#a00000",
        )
    busy_total = sum(float(r["busy_time"]) for r in stats["ranks"].values())
    if ranks and busy_total > 0:
        first = min((b.start for b in tl.bars), default=t0) - t0
        ideal = first + busy_total / max(1, len(ranks) - len(tl.lost))
        gantt.axvline(ideal, color="#2ca02c", linestyle="--", linewidth=1)
        gantt.annotate(
            "perfect balance",
            (ideal, 1.0),
            xycoords=("data", "axes fraction"),
            xytext=(-3, -10),
            ha="right",
            textcoords="offset points",
            fontsize=8,
            color="#2ca02c",
        )
    gantt.set_xlim(0, end * 1.02)
    gantt.set_ylim((min(ranks) if ranks else 0) - 0.7, (max(ranks) if ranks else 0) + 0.7)
    gantt.invert_yaxis()
    if ranks and len(ranks) <= 40:
        gantt.set_yticks(ranks)
        labels = []
        for rank in ranks:
            r = stats["ranks"][str(rank)]
            busy = float(r["busy_time"]) / end if end > 0 else 0.0
            labels.append(f"rank {rank}\n{r['tasks']} tasks, {busy:.0%}")
        gantt.set_yticklabels(labels, fontsize=8)
    gantt.set_xlabel("seconds since the start", fontsize=9)
    gantt.tick_params(axis="x", labelsize=8)
    fig.suptitle(
        f"{stats['submitted']} tasks on {len(ranks)} ranks: {stats['done']} done, {stats['failed']} failed, "
        f"{stats['retried']} retried, {len(tl.lost)} rank(s) lost; makespan {end:.1f} s",
        fontsize=10,
        y=0.975,
    )
    present = {b.outcome for b in tl.bars}
    names = {
        "succeeded": "done",
        "failed": "failed (\u25bc)",
        "retried": "failed, retried (\u25bc)",
        "lost": "lost with its rank",
        "running": "unfinished",
    }
    legend = [Patch(color=_COLOURS[o][0], label=label) for o, label in names.items() if o in present]
    if stragglers:
        legend.append(Patch(facecolor="none", edgecolor="black", label=f"{len(stragglers)} slowest"))
    if tl.lost:
        legend.append(Patch(color="#f6c6c6", label="rank lost (\u2716)"))
    gantt.legend(
        handles=legend, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=len(legend), fontsize=8, frameon=False
    )

    # the histogram of durations: stragglers stand out on the right
    ok = [b.end - b.start for b in tl.bars if b.outcome == "succeeded"]
    bad = [b.end - b.start for b in tl.bars if b.outcome in ("failed", "retried")]
    every = ok + bad
    if every:
        low, high = max(min(every), 1e-6), max(max(every), 1e-6)
        import numpy as np

        if high / low > 50:
            bins = np.geomspace(low, high * 1.0001, 40).tolist()
            hist.set_xscale("log")
        else:
            bins = np.linspace(0, high * 1.0001, 40).tolist()
        hist.hist([ok, bad], bins=bins, stacked=True, color=[_COLOURS["succeeded"][0], _COLOURS["failed"][0]])
        median = float(np.median(every))
        hist.axvline(median, color="#333333", linestyle=":", linewidth=1)
        hist.annotate(
            f"median {median:.3g} s",
            (median, 0.95),
            xycoords=("data", "axes fraction"),
            xytext=(3, -8),
            textcoords="offset points",
            fontsize=8,
        )
        slowest = max(tl.bars, key=lambda b: b.end - b.start if b.outcome != "lost" else -1.0)
        hist.annotate(
            f"slowest {slowest.end - slowest.start:.3g} s (rank {slowest.rank})",
            (slowest.end - slowest.start, 0.6),
            xycoords=("data", "axes fraction"),
            xytext=(-4, 0),
            textcoords="offset points",
            ha="right",
            fontsize=8,
            color="#a00000",
        )
    hist.set_xlabel("task duration (s)", fontsize=9)
    hist.set_ylabel("tasks", fontsize=9)
    hist.tick_params(labelsize=8)
    fig.savefig(os.fspath(path), dpi=PLOT_DPI, format="png")
    plt.close(fig)


def parse_size(text: str) -> tuple[int, int]:
    """``WIDTHxHEIGHT`` in pixels (each 200..8000)."""
    try:
        w, h = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"not WIDTHxHEIGHT: {text!r}") from None
    if not (200 <= w <= 8000 and 200 <= h <= 8000):
        raise ValueError(f"each side must be 200..8000 pixels: {text!r}")
    return w, h


def report_command(
    path: str,
    *,
    plot: str | None = None,
    size: tuple[int, int] = DEFAULT_PLOT_SIZE,
    as_json: bool = False,
    out: IO[str] | None = None,
    err: IO[str] | None = None,
) -> int:
    """``taskfarm report FILE``: a summary of a journal or event log; ``plot``: draw it too."""
    from ._errors import ExitCode, JournalError

    out = out if out is not None else sys.stdout
    err = err if err is not None else sys.stderr
    try:
        timeline = load_timeline(path)
    except (OSError, JournalError, EventsFormatError) as exc:
        err.write(f"taskfarm report: {exc}\n")
        return ExitCode.USAGE
    stats = timeline.stats()
    if as_json:
        json.dump(stats, out, indent=1)
        out.write("\n")
    else:
        out.write(f"{path}: {timeline.source}, {len(timeline.bars)} attempts on {len(timeline.ranks())} ranks\n")
        out.write(format_summary(stats))
    if plot:
        try:
            plot_timeline(timeline, plot, size=size)
        except PlotUnavailable as exc:
            err.write(f"taskfarm report: {exc}\n")
            return ExitCode.USAGE
        except OSError as exc:
            err.write(f"taskfarm report: cannot write {plot}: {exc}\n")
            return ExitCode.USAGE
        if not as_json:
            out.write(f"timeline written to {plot}\n")
    return ExitCode.OK
