"""``python -m taskfarm``: run a script, a module or a task file on a farm.

Every rank parses the same command line; rank 0 runs the user's program and
ranks 1..N-1 serve as workers until it ends.  Bad usage is caught on every
rank before MPI does anything, so a typo never leaves ranks waiting.
"""

from __future__ import annotations

import argparse
import json
import os
import runpy
import sys
import traceback
from collections.abc import Sequence
from typing import Any, NoReturn

from ._errors import ExitCode, TaskfarmError

#: environment variables that give a process its rank before MPI starts
_RANK_VARIABLES = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "SLURM_PROCID")


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
            command = self.prog.split()[-1]
            sys.stderr.write(f"taskfarm: error: {message} (see python -m taskfarm {command} --help)\n")
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


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="taskfarm",
        description="An MPI task farm for Python: rank 0 runs your program, the other ranks run its tasks.",
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    run = sub.add_parser(
        "run",
        help="run a script, a module (-m) or a task file (--tasks) on the farm",
        description=(
            "Run SCRIPT (or -m MODULE, or --tasks FILE) on rank 0 with sys.argv set as usual; "
            "ranks 1..N-1 serve as workers for taskfarm.FarmExecutor() inside it. "
            "Options go before SCRIPT; everything after SCRIPT goes to the script. "
            f"Exit codes: {ExitCode.OK} all done, {ExitCode.FAILED} script raised or a task failed, "
            f"{ExitCode.USAGE} bad usage, {ExitCode.BROKEN} farm broken (no workers), "
            f"{ExitCode.INCOMPLETE} stopped early, resumable with --resume."
        ),
    )
    what = run.add_mutually_exclusive_group()
    what.add_argument("-m", dest="module", metavar="MODULE", help="run a module as __main__ (like python -m)")
    what.add_argument("--tasks", metavar="FILE", help="a file of shell commands, one task per line")
    run.add_argument("--stats-json", metavar="PATH", help="write the farm's statistics here at the end")
    run.add_argument(
        "--heartbeat-timeout",
        type=_positive_float,
        metavar="SECONDS",
        help="declare a worker lost after this long without a word while it holds tasks",
    )
    run.add_argument("-q", "--quiet", action="store_true", help="no summary at the end")
    run.add_argument("script", nargs="?", metavar="SCRIPT", help="the Python script to run on rank 0")
    run.add_argument("args", nargs=argparse.REMAINDER, metavar="ARGS", help="arguments for the script")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    if ns.command == "run":
        if ns.module is None and ns.tasks is None and ns.script is None:
            parser.error("run needs a SCRIPT, -m MODULE or --tasks FILE")
        if ns.module is not None and ns.script is not None:
            ns.args = [ns.script, *ns.args]
            ns.script = None
        if ns.script is not None and not os.path.isfile(ns.script):
            parser.error(f"no such script: {ns.script}")
        return _run(ns)
    parser.error(f"unknown command {ns.command}")


def _run(ns: argparse.Namespace) -> int:
    from . import _executor, _transport
    from ._worker import serve

    if _transport.world_size() > 1 and _transport.world_rank() != 0:
        serve(_transport.world())
        return ExitCode.OK
    if ns.heartbeat_timeout is not None:
        _executor.configure_world(heartbeat_timeout=ns.heartbeat_timeout)
    code: int = ExitCode.OK
    try:
        code = _run_program(ns)
    finally:
        farm_ = _executor.close_world_farm() if _transport.world_size() > 1 else _executor.last_farm()
        stats = farm_.statistics().as_dict() if farm_ is not None else None
        if stats is not None:
            stats["exit_code"] = int(code)
            if ns.stats_json:
                with open(ns.stats_json, "w") as out:
                    json.dump(stats, out, indent=1)
            if not ns.quiet:
                from ._report import format_summary

                sys.stderr.write(format_summary(stats))
    return code


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
    except TaskfarmError as exc:
        traceback.print_exc()
        from ._errors import BrokenFarmError

        return ExitCode.BROKEN if isinstance(exc, BrokenFarmError) else ExitCode.FAILED
    except BaseException:  # noqa: BLE001 - any failure of the script is reported, then the farm ends
        traceback.print_exc()
        return ExitCode.FAILED
    finally:
        sys.argv = saved_argv
        sys.path[:] = saved_path


def _exit_status(code: object) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    sys.stderr.write(f"{code}\n")
    return 1
