"""``python -m taskfarm``: run a script, a module or a task file on a farm; read a journal.

Every rank parses the same command line; rank 0 runs the user's program and
ranks 1..N-1 serve as workers until it ends.  Bad usage is caught on every
rank before MPI starts, so a typo never leaves ranks waiting; bad input found
later (a malformed task file) ends the workers cleanly before exiting 2.

Exit codes are `ExitCode`: 0 all done, 1 script raised or a task failed,
2 bad usage or input, 3 farm broken, 75 stopped early and resumable.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import queue
import runpy
import signal
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NoReturn

from ._errors import BrokenFarmError, ExitCode, FarmStopped, JournalError, TaskfarmError
from ._pages import huge_pages_wanted

#: environment variables that give a process its rank before MPI starts
_RANK_VARIABLES = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "SLURM_PROCID")
#: signals that make rank 0 drain the farm (Slurm sends USR1 early with --signal=B:USR1@T)
DRAIN_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
#: seconds running tasks get to finish when the farm drains; with the teardown it
#: fits inside Slurm's default KillWait (30 s between SIGTERM and SIGKILL)
DEFAULT_GRACE = 20.0
#: seconds kept between the end of a drain and a deadline, to save the journal and stop ranks
TEARDOWN_MARGIN = 10.0
#: task-file tasks in flight at once per worker (the rest wait unread in the list)
TASKS_WINDOW_PER_WORKER = 64
#: failed commands listed by name at the end of a task-file run
FAILURES_SHOWN = 10


def _env_rank() -> int:
    for name in _RANK_VARIABLES:
        value = os.environ.get(name)
        if value and value.isdigit():
            return int(value)
    return 0


class _Parser(argparse.ArgumentParser):
    """An argparse parser whose usage errors are one line, from rank 0 only."""

    def error(self, message: str) -> NoReturn:
        if _env_rank() == 0:
            words = self.prog.split()  # "taskfarm" or "taskfarm run"
            command = f" {words[-1]}" if len(words) > 1 else ""
            sys.stderr.write(f"taskfarm: error: {message} (see python -m taskfarm{command} --help)\n")
        raise SystemExit(ExitCode.USAGE)

    def print_help(self, file: Any = None) -> None:
        if _env_rank() == 0:
            super().print_help(file)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0: {text!r}")
    return value


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0: {text!r}")
    return value


def _size(text: str) -> int:
    from ._pools import parse_size

    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _slice(text: str) -> tuple[int, int]:
    from .slurm import parse_slice

    try:
        return parse_slice(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="taskfarm",
        description="An MPI task farm for Python: rank 0 runs your program, the other ranks run its tasks.",
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    codes = (
        f"Exit codes: {ExitCode.OK} all done, {ExitCode.FAILED} script raised or a task failed, "
        f"{ExitCode.USAGE} bad usage or input, {ExitCode.BROKEN} farm broken (no workers), "
        f"{ExitCode.INCOMPLETE} stopped early (signal or deadline), resumable with --resume."
    )
    run = sub.add_parser(
        "run",
        help="run a script, a module (-m) or a task file (--tasks) on the farm",
        description=(
            "Run SCRIPT (or -m MODULE, or --tasks FILE) on rank 0 with sys.argv set as usual; "
            "ranks 1..N-1 serve as workers for taskfarm.FarmExecutor() inside it. "
            "Options go before SCRIPT; everything after SCRIPT goes to the script. " + codes
        ),
    )
    what = run.add_mutually_exclusive_group()
    what.add_argument("-m", dest="module", metavar="MODULE", help="run a module as __main__ (like python -m)")
    what.add_argument("--tasks", metavar="FILE", help="a file of shell commands, one task per line")
    run.add_argument("--stats-json", metavar="PATH", help="write the farm's statistics here at the end")
    journal = run.add_argument_group("journal (resume after the job dies)")
    journal.add_argument("--journal", metavar="PATH", help="record every task and result here")
    journal.add_argument("--resume", action="store_true", help="reuse the journal's results, run the rest")
    journal.add_argument("--retry-failed", action="store_true", help="with --resume: rerun failed tasks too")
    journal.add_argument(
        "--force-resume", action="store_true", help="resume even if the journal seems to hold other work"
    )
    stop = run.add_argument_group("stopping in time")
    stop.add_argument(
        "--deadline",
        type=_positive_float,
        metavar="T",
        help="the job must end by T (seconds from now, or a Unix time); default: the Slurm job's end",
    )
    stop.add_argument(
        "--grace",
        type=_positive_float,
        default=DEFAULT_GRACE,
        metavar="SECONDS",
        help=f"on SIGTERM/SIGINT/SIGUSR1 or near the deadline, running tasks get this long (default {DEFAULT_GRACE:g})",
    )
    tasks = run.add_argument_group("task files (--tasks) and per-task defaults")
    tasks.add_argument("--run-dir", metavar="DIR", help="per-task logs go under DIR/logs (default ./taskfarm-run)")
    tasks.add_argument("--slice", type=_slice, metavar="I/K", help="run only slice I of K of the task file")
    tasks.add_argument("--max-retries", type=_count, default=0, metavar="N", help="retries of a failed command")
    tasks.add_argument(
        "--retry-backoff", type=float, default=0.0, metavar="SECONDS", help="first retry delay, doubling"
    )
    tasks.add_argument("--time-limit", type=_positive_float, metavar="SECONDS", help="limit per command")
    tasks.add_argument(
        "-n", "--workers", type=int, metavar="K", help="without mpiexec: spawn K workers (default: CPU count)"
    )
    run.add_argument(
        "--heartbeat-timeout",
        type=_positive_float,
        metavar="SECONDS",
        help="declare a worker lost after this long without a word while it holds tasks",
    )
    pools = run.add_argument_group("how workers run tasks (docs/pools.md, docs/faults.md)")
    pools.add_argument(
        "--pool",
        choices=("solo", "threads", "processes"),
        help="solo: one task at a time on the rank's main thread (default); threads: K at once in threads; "
        "processes: K child processes per rank (a task that crashes fails alone)",
    )
    pools.add_argument(
        "--concurrency", type=_count, metavar="K", help="task slots per worker rank (default 1; >1 implies threads)"
    )
    pools.add_argument(
        "--master-works", action="store_true", default=None, help="rank 0 runs tasks too, in one slot"
    )
    pools.add_argument(
        "--max-tasks-per-child", type=_count, metavar="N", help="start a fresh child process after N tasks"
    )
    pools.add_argument(
        "--max-memory-per-child",
        type=_size,
        metavar="SIZE",
        help="start a fresh child process once one uses more than SIZE resident memory (2G, 500M, bytes)",
    )
    shown = run.add_argument_group("progress, summary, event log and logging (docs/events.md)")
    shown.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="show progress on stderr: a bar on a terminal (with tqdm), else a line every "
        "--progress-interval seconds (default: on, off with -q)",
    )
    shown.add_argument(
        "--progress-interval",
        type=_positive_float,
        default=30.0,
        metavar="SECONDS",
        help="seconds between progress lines when stderr is not a terminal (default 30)",
    )
    shown.add_argument("--events", metavar="PATH", help="write every task state change here, one JSON per line")
    shown.add_argument(
        "-v", "--verbose", action="count", default=0, help="debug logging (default: $TASKFARM_LOG_LEVEL or WARNING)"
    )
    shown.add_argument("-q", "--quiet", action="store_true", help="errors only: no summary, no progress, no warnings")
    run.add_argument("script", nargs="?", metavar="SCRIPT", help="the Python script to run on rank 0")
    run.add_argument("args", nargs=argparse.REMAINDER, metavar="ARGS", help="arguments for the script")

    status = sub.add_parser(
        "status",
        help="counts by state, failed tasks and per-rank figures of a journal",
        description="Read a journal (also while its farm runs). Exit 0: all done; 1: some failed; 75: unfinished.",
    )
    status.add_argument("journal", metavar="JOURNAL")
    status.add_argument("--json", action="store_true", help="machine-readable output")

    report = sub.add_parser(
        "report",
        help="summary of a journal or event log (--events); --plot draws a per-rank timeline",
        description="Summarise a journal or an event log; with --plot, draw a per-rank timeline "
        "(failures marked, lost ranks shaded) and a histogram of task durations (needs taskfarm[plot]).",
    )
    report.add_argument("file", metavar="JOURNAL|EVENTS")
    report.add_argument("--plot", metavar="PNG", help="draw the timeline into this PNG file")
    report.add_argument("--plot-size", type=_plot_size, default=None, metavar="WxH", help="pixels (default 1000x620)")
    report.add_argument("--json", action="store_true", help="machine-readable summary")
    return parser


def _plot_size(text: str) -> tuple[int, int]:
    from ._report import parse_size

    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    if ns.command == "status":
        return _status(ns)
    if ns.command == "report":
        from ._report import DEFAULT_PLOT_SIZE, report_command

        return report_command(ns.file, plot=ns.plot, size=ns.plot_size or DEFAULT_PLOT_SIZE, as_json=ns.json)
    if ns.module is None and ns.tasks is None and ns.script is None:
        parser.error("run needs a SCRIPT, -m MODULE or --tasks FILE")
    if ns.module is not None and ns.script is not None:
        ns.args = [ns.script, *ns.args]
        ns.script = None
    if ns.tasks is not None and ns.script is not None:
        parser.error("--tasks takes no SCRIPT")
    for flag, path in (("script", ns.script), ("--tasks", ns.tasks)):
        if path is not None and not os.path.isfile(path):
            parser.error(f"{flag}: no such file: {path}")
    if (ns.resume or ns.retry_failed or ns.force_resume) and not ns.journal:
        parser.error("--resume, --retry-failed and --force-resume need --journal")
    if ns.resume and not os.path.exists(ns.journal):
        parser.error(f"--resume: no journal at {ns.journal}")
    # whether the journal exists NOW is rank 0's question only: rank 0 creates it
    # while slower ranks may still be parsing (see _setup_farms / open_journal)
    if ns.events and not os.path.isdir(os.path.dirname(os.path.abspath(ns.events))):
        parser.error(f"--events: no such directory: {os.path.dirname(os.path.abspath(ns.events))}")
    try:
        huge_pages_wanted()  # a setting read where buffers arrive, mid-run: checked here first
    except ValueError as exc:
        parser.error(str(exc))
    return _run(ns)


def _status(ns: argparse.Namespace) -> int:
    from ._journal import read_journal
    from ._status import format_status, status_exit_code, status_report

    try:
        state = read_journal(ns.journal, results=False)
    except JournalError as exc:
        sys.stderr.write(f"taskfarm: {exc}\n")
        return ExitCode.USAGE
    if ns.json:
        json.dump(status_report(state), sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(format_status(state) + "\n")
    return status_exit_code(state)


# -- run ------------------------------------------------------------------------
def _run(ns: argparse.Namespace) -> int:
    from . import _executor, _transport
    from ._report import RunReporting, setup_logging
    from ._worker import serve

    worker = _transport.world_size() > 1 and _transport.world_rank() != 0
    setup_logging(-1 if ns.quiet else ns.verbose, rank0=not worker)
    if worker:
        # the launcher forwards Slurm's signals to every rank: rank 0 decides
        for sig in DRAIN_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        serve(_transport.world())
        return ExitCode.OK
    try:
        _setup_farms(ns)
        try:
            ns.reporting = RunReporting(
                events=ns.events,
                progress=ns.progress if ns.progress is not None else not ns.quiet,
                interval=ns.progress_interval,
                meta={"argv": sys.argv},
            )
        except OSError as exc:
            sys.stderr.write(f"taskfarm: --events: {exc}\n")
            raise SystemExit(ExitCode.USAGE) from None
    except SystemExit as exc:
        # bad input found on rank 0 after MPI started: the workers are waiting for
        # rank 0 in a collective call; let them in and stop them, then leave
        if _transport.world_size() > 1:
            _executor.world_farm()
            _executor.close_world_farm()
        return _exit_status(exc.code)
    if _transport.world_size() > 1:
        _fault_tolerance_hint()
    _executor.on_new_farm(ns.reporting.attach)
    if _transport.world_size() > 1:
        # now, not at the first executor: the workers wait in a collective call
        # for it, and must hear Stop even if the script never uses the farm
        _executor.world_farm()
    code: int = ExitCode.OK
    try:
        code = _run_tasks(ns) if ns.tasks else _run_program(ns)
    finally:
        farm_ = _executor.last_farm()
        if farm_ is not None and code not in (ExitCode.OK, ExitCode.INCOMPLETE):
            farm_.abandon()  # the program failed: do not wait for its leftover tasks
        if _transport.world_size() > 1:
            _executor.close_world_farm()
        if farm_ is not None and farm_.drained:
            code = ExitCode.INCOMPLETE
        stats = None
        if farm_ is not None:
            stats = farm_.statistics().as_dict()
            stats["exit_code"] = int(code)
            # worker ranks that never said Bye (stuck in C code, stopped): the job ends with MPI_Abort
            stats["did_not_stop"] = list(farm_.unanswered)
        ns.reporting.finish(stats)  # progress ends; slowest tasks go into stats; event log closes
        if stats is not None:
            if ns.stats_json:
                with open(ns.stats_json, "w") as out:
                    json.dump(stats, out, indent=1)
            if not ns.quiet:
                from ._report import format_summary

                sys.stderr.write(format_summary(stats))
        if farm_ is not None and farm_.resume is not None and not ns.quiet:
            sys.stderr.write(f"taskfarm: {farm_.resume.describe()}\n")
        _executor.abort_if_stuck(farm_)
        _transport.set_exit_code(int(code))  # if MPI_Finalize hangs under ULFM, leave with it
    return code


def _fault_tolerance_hint() -> None:
    """Say, once on rank 0, when a dead rank would end the job though it need not."""
    from ._transport import library, ulfm_enabled

    info = library()
    if "Open MPI" in str(info["library"]) and not ulfm_enabled():
        logging.getLogger("taskfarm").warning(
            "taskfarm: Open MPI without ULFM: if one rank dies the whole job ends; start with "
            "'mpiexec --with-ft ulfm ...' so the farm resubmits its tasks and carries on (docs/faults.md)"
        )


def _setup_farms(ns: argparse.Namespace) -> None:
    """Options, journal, deadline and signal handling for every farm this run starts."""
    from . import _executor
    from .slurm import Allocation

    options: dict[str, Any] = {}
    if ns.heartbeat_timeout is not None:
        options["heartbeat_timeout"] = ns.heartbeat_timeout
    if ns.journal:
        try:
            options["journal"], options["resume"] = _executor.open_journal(
                ns.journal, resume=ns.resume, retry_failed=ns.retry_failed, force_resume=ns.force_resume
            )
        except JournalError as exc:
            sys.stderr.write(f"taskfarm: {exc}\n")
            raise SystemExit(ExitCode.USAGE) from None
        options["run_meta"] = {"argv": sys.argv, "resume": ns.resume}
    pool_args = (ns.pool, ns.concurrency, ns.max_tasks_per_child, ns.max_memory_per_child)
    if pool_args != (None, None, None, None):
        from ._pools import PoolSpec

        try:
            options["pool"] = PoolSpec.make(*pool_args)
        except ValueError as exc:
            sys.stderr.write(f"taskfarm: error: {exc}\n")
            raise SystemExit(ExitCode.USAGE) from None
    if ns.master_works:
        options["master_works"] = True
    _executor.configure_world(**options)

    deadline = ns.deadline
    if deadline is not None and deadline < 1e9:  # seconds from now, not a Unix time
        deadline = time.time() + deadline
    if deadline is None:
        allocation = Allocation.from_environ()
        deadline = allocation.end_time if allocation is not None else None
    drain_requested: list[float] = []

    def on_farm(farm_: Any) -> None:
        if deadline is not None:
            start = time.monotonic() + (deadline - time.time()) - ns.grace - TEARDOWN_MARGIN
            farm_.drain_at(start, ns.grace)
        if drain_requested:
            farm_.drain(ns.grace)

    _executor.on_new_farm(on_farm)

    def on_signal(signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        farm_ = _executor.last_farm()
        if drain_requested and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        drain_requested.append(time.monotonic())
        sys.stderr.write(f"taskfarm: {name}: draining (running tasks get {ns.grace:g} s)\n")
        if farm_ is not None:
            farm_.drain(ns.grace)

    for sig in DRAIN_SIGNALS:
        signal.signal(sig, on_signal)


def _run_program(ns: argparse.Namespace) -> int:
    saved_argv = sys.argv[:]
    saved_path = sys.path[:]
    try:
        if ns.module is not None:
            sys.argv = [ns.module, *ns.args]
            sys.path.insert(0, os.getcwd())
            runpy.run_module(ns.module, run_name="__main__", alter_sys=True)
        else:
            sys.argv = [ns.script, *ns.args]
            sys.path.insert(0, os.path.dirname(os.path.abspath(ns.script)))
            runpy.run_path(ns.script, run_name="__main__")
        return ExitCode.OK
    except SystemExit as exc:
        return _exit_status(exc.code)
    except FarmStopped:
        return ExitCode.INCOMPLETE
    except JournalError as exc:  # other work's journal, or a damaged one: one line says it all
        sys.stderr.write(f"taskfarm: {exc}\n")
        return ExitCode.USAGE
    except TaskfarmError as exc:
        _print_user_traceback(exc)
        return ExitCode.BROKEN if isinstance(exc, BrokenFarmError) else ExitCode.FAILED
    except BaseException as exc:  # noqa: BLE001 - any failure of the script is reported, then the farm ends
        _print_user_traceback(exc)
        return ExitCode.FAILED
    finally:
        sys.argv = saved_argv
        sys.path[:] = saved_path


def _print_user_traceback(exc: BaseException) -> None:
    """The script's traceback, without the frames of taskfarm's launcher and runpy."""
    tb = exc.__traceback__
    while tb is not None and (
        tb.tb_frame.f_code.co_filename in (__file__, runpy.__file__)
        or tb.tb_frame.f_code.co_filename.startswith("<frozen")
    ):
        tb = tb.tb_next
    traceback.print_exception(type(exc), exc, tb or exc.__traceback__)


def _exit_status(code: object) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    sys.stderr.write(f"{code}\n")
    return 1


def _run_tasks(ns: argparse.Namespace) -> int:
    """Run a task file: one farm task per command line."""
    from ._commands import TaskFileError, parse_task_file, run_command, write_run_manifest
    from ._executor import FarmExecutor
    from ._task import Task
    from .slurm import array_slice

    try:
        specs = parse_task_file(ns.tasks)
    except TaskFileError as exc:
        sys.stderr.write(f"taskfarm: {exc}\n")
        return ExitCode.USAGE
    if ns.slice is not None:
        index, count = ns.slice
        specs = [specs[i] for i in array_slice(len(specs), index, count)]
    run_dir = os.path.abspath(ns.run_dir or "taskfarm-run")
    os.makedirs(run_dir, exist_ok=True)
    write_run_manifest(run_dir, specs, ns.tasks)
    if getattr(ns, "reporting", None) is not None:
        ns.reporting.set_total(len(specs))  # the progress display's total
    tasks = (
        Task(
            run_command,
            (spec, run_dir),
            key=spec.key(),
            label=spec.label(),
            max_retries=ns.max_retries,
            retry_backoff=ns.retry_backoff,
            time_limit=ns.time_limit,
        )
        for spec in specs
    )
    with FarmExecutor(ns.workers) as executor:
        window = TASKS_WINDOW_PER_WORKER * max(1, executor.workers)
        try:
            failures = _submit_bounded(executor.submit_task, tasks, window)
        except FarmStopped:
            return ExitCode.INCOMPLETE
        except JournalError as exc:  # the journal holds other work (see _resume)
            executor.shutdown(wait=False, cancel_futures=True)
            sys.stderr.write(f"taskfarm: {exc}\n")
            return ExitCode.USAGE
    for future in failures[:FAILURES_SHOWN]:
        sys.stderr.write(f"taskfarm: failed: {future.label}: {future.exception()}\n")
    if len(failures) > FAILURES_SHOWN:
        sys.stderr.write(f"taskfarm: ... and {len(failures) - FAILURES_SHOWN} more failed (see the journal)\n")
    if any(isinstance(f.exception(), FarmStopped) for f in failures):
        return ExitCode.INCOMPLETE
    return ExitCode.FAILED if failures else ExitCode.OK


def _submit_bounded(submit: Callable[[Any], Any], items: Iterable[Any], window: int) -> list[Any]:
    """Submit ``items`` keeping at most ``window`` in flight; returns the failed futures.

    Completions arrive through a queue fed by done-callbacks, so each task
    costs O(1) however large the window.
    """
    done: queue.SimpleQueue[Any] = queue.SimpleQueue()
    failures: list[Any] = []
    in_flight = 0

    def collect() -> None:
        nonlocal in_flight
        future = done.get()
        in_flight -= 1
        if future.cancelled() or future.exception() is not None:
            failures.append(future)

    for item in items:
        while in_flight >= window:
            collect()
        future = submit(item)
        in_flight += 1
        future.add_done_callback(done.put)
    while in_flight:
        collect()
    return failures
