"""Shell-command tasks: the task-file format, and the function workers run.

``python -m taskfarm run --tasks FILE`` reads a *task file* (one shell command
per line, the format disBatch, GREASY, the TACC launcher and NERSC TaskFarmer
users already have) with `parse_task_file` before anything runs, so a typo on
line 90,000 aborts the job at once instead of after hours.  Each command
becomes a `CommandSpec`; a worker rank runs it with `run_command`, which
writes its output to per-task log files under the run directory and raises
`CommandFailed` on a non-zero exit so that the farm's retry policy applies.

The format, in short (docs/taskfiles.md is the user documentation)::

    # comment                      lines whose first non-blank char is '#'
    #TASKFARM cwd runs/{n}         following commands run in runs/1, runs/2, ...
    #TASKFARM env OMP_NUM_THREADS=4
    ./sim --seed {i} > out.txt     placeholders {i} {n} {line} {ntasks}
    ./sim --long \\
          --args                   backslash-newline joins lines

Placeholders are only ever the four names above, in single braces, not
preceded by ``$``: every other brace (``${HOME}``, ``awk '{print $1}'``,
``{a,b}``, ``find -exec {} \\;``) reaches the shell untouched, so that real
task files never need escaping.  ``{{i}}`` writes a literal ``{i}``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

from taskfarm._errors import TaskfarmError, TimeLimitExceeded
from taskfarm._signals import MAIN_THREAD_SIGNALS

__all__ = [
    "DIRECTIVE_MARKER",
    "PLACEHOLDERS",
    "CommandFailed",
    "CommandResult",
    "CommandSpec",
    "FrozenEnv",
    "TaskFileError",
    "describe_returncode",
    "log_paths",
    "parse_task_file",
    "parse_task_text",
    "run_command",
    "shell_argv",
    "write_run_manifest",
]

# --------------------------------------------------------------------------
# Constants
# --------------------------------------------------------------------------

#: a line whose first non-blank text is this word (any case) is a directive
DIRECTIVE_MARKER: Final = "#TASKFARM"
#: the placeholder names, in the order the documentation lists them
PLACEHOLDERS: Final = ("i", "n", "line", "ntasks")
#: shells tried in order: bash is what task-file authors write (``[[ ]]``,
#: ``{1..9}``, ``source``); plain sh only where bash is missing.  Never
#: ``$SHELL``: a login shell of csh/tcsh/fish would break POSIX syntax, and
#: the same file would mean different things for different users.
SHELL_CANDIDATES: Final = ("/bin/bash", "/bin/sh")
#: environment variables the farm sets for every command (and forbids in
#: ``#TASKFARM env`` so that they always mean what the docs say)
RESERVED_ENV_PREFIX: Final = "TASKFARM_"
#: names of the MPI launcher's wire-up variables a worker rank inherits.
#: Passed on, they make an MPI-linked program started by a task take itself
#: for that rank: with MPICH/Hydra its MPI_Init fails ("PMI_Init returned
#: -1"), with Open MPI 5 it joins the farm's own world (size N, not 1).
#: Removing them makes it a singleton, as in an ordinary shell; user tuning
#: such as OMPI_MCA_btl or HYDRA_* stays.
MPI_WIREUP_PREFIXES: Final = (
    "PMI_",  # MPICH/Hydra, Intel MPI, Slurm PMI-1/2, Cray PMI
    "PMIX_",  # PMIx (Open MPI 4/5, Slurm --mpi=pmix)
    "HYDI_",  # Hydra's control channel (HYDI_CONTROL_FD)
    "OMPI_COMM_WORLD_",  # Open MPI rank identity
    "OMPI_MCA_ess_",  # Open MPI run-time wire-up parameters set by mpirun
    "OMPI_MCA_orte_",
    "OMPI_MCA_pmix",
)
MPI_WIREUP_NAMES: Final = frozenset(
    {
        "MPI_LOCALRANKID",  # MPICH/Hydra
        "MPI_LOCALNRANKS",
        "OMPI_UNIVERSE_SIZE",  # Open MPI job layout
        "OMPI_WORLD_SIZE",
        "OMPI_WORLD_LOCAL_SIZE",
        "OMPI_FIRST_RANKS",
        "OMPI_APP_CTX_NUM_PROCS",
        "OMPI_NUM_APP_CTX",
        "OMPI_FILE_LOCATION",
    }
)

#: hex digits of the SHA-256 kept in a task key: 80 bits make a collision
#: among 10^6 tasks about 4e-13 likely, and keep journal lines short
_KEY_HEX_DIGITS: Final = 20
#: a label longer than this is cut (it heads log lines and error messages)
_LABEL_MAX_CHARS: Final = 60
#: digits of the zero-padded task index in log file names (10^6 tasks line up)
_LOG_INDEX_DIGITS: Final = 6
#: log files are spread over subdirectories of this many tasks: a million
#: tasks in one directory is slow for ``ls`` and for Lustre/GPFS metadata
_LOGS_PER_DIR: Final = 1000
#: lines of stderr quoted in a `CommandFailed` message
_STDERR_TAIL_LINES: Final = 20
#: at most this many bytes are read from the end of stderr to find them
_STDERR_TAIL_BYTES: Final = 8192
#: seconds between SIGTERM and SIGKILL when a command has to be stopped
_KILL_GRACE_SECONDS: Final = 5.0
#: a shell reports "a program I ran died of signal N" as exit status 128+N
_SHELL_SIGNAL_BASE: Final = 128
#: the same when the farm itself stops the command (a drain's grace ran out):
#: that grace was the command's, and the master waits 2 s for its rank
#: (`_master.DRAIN_BYE_TIMEOUT`) before it ends the job with MPI_Abort
_INTERRUPT_GRACE_SECONDS: Final = 0.5

_ENV_NAME_RE: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_NAMES_ALT: Final = "ntasks|line|i|n"
#: one regex finds every placeholder-like thing; ``(?<!\$)`` leaves shell
#: parameter expansions (``${i}``) alone.  Alternatives, tried in order:
#: ``{{name}}`` (escape), ``{name}``/``{name:spec}``, and ``{name:`` never
#: closed (an error).  Anything else in braces is not matched at all.
_PLACEHOLDER_RE: Final = re.compile(
    r"(?<!\$)(?:"
    rf"\{{\{{(?P<esc>(?:{_NAMES_ALT})(?::[^{{}}]*)?)\}}\}}"
    rf"|\{{(?P<name>{_NAMES_ALT})(?::(?P<spec>[^{{}}]*))?\}}"
    rf"|\{{(?P<open>(?:{_NAMES_ALT}):[^{{}}]*)"
    r")"
)
_QUOTES: Final = ("'", '"')
#: task files written for disBatch or GREASY may carry their directives; read
#: as a comment or a command they would silently change what runs, so they are
#: rejected.  A command cannot sensibly start with "[#" ("[#" is no program).
_DISBATCH_MARKER: Final = "#DISBATCH"
_GREASY_DEPENDENCY_OPENER: Final = "[#"
#: format specs already known to be valid for an int (checking costs a try)
_GOOD_SPECS: set[str] = {""}


# --------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------


class TaskFileError(TaskfarmError):
    """A task file cannot be used; the message is one line, ``FILE:LINE: reason``.

    ``line`` is 1-based, or None when the problem is not on one line (the
    file is unreadable, or holds no command).  The CLI prints the message and
    exits with `ExitCode.USAGE` before any task has run.
    """

    def __init__(self, path: str, line: int | None, reason: str) -> None:
        where = f"{path}:{line}" if line is not None else path
        super().__init__(f"{where}: {reason}")
        self.path = path
        self.line = line
        self.reason = reason

    def __reduce__(self) -> tuple[object, ...]:
        return (TaskFileError, (self.path, self.line, self.reason))


class CommandFailed(TaskfarmError):
    """A shell command exited non-zero, was killed by a signal, or did not start.

    ``returncode`` follows `subprocess`: negative ``-N`` means the shell
    itself died of signal N (e.g. ``kill -9 $$``); None means the command
    never started (missing working directory, no shell).  The message quotes
    the last lines of stderr so a failure can be understood from the farm's
    own report; the full output is in ``stdout_path``/``stderr_path``.
    It crosses MPI from worker to master, hence `__reduce__`.
    """

    def __init__(
        self,
        *,
        index: int,
        line: int,
        command: str,
        returncode: int | None,
        stdout_path: str,
        stderr_path: str,
        stderr_tail: str = "",
        host: str = "",
        attempt: int = 0,
        reason: str = "",
    ) -> None:
        self.index = index
        self.line = line
        self.command = command
        self.returncode = returncode
        self.stdout_path = stdout_path
        self.stderr_path = stderr_path
        self.stderr_tail = stderr_tail
        self.host = host
        self.attempt = attempt
        self.reason = reason or describe_returncode(returncode)
        super().__init__(self._format())

    def _format(self) -> str:
        where = f" on {self.host}" if self.host else ""
        head = (
            f"task {self.index} (line {self.line}, attempt {self.attempt}){where}: "
            f"{self.reason}: {_shorten(self.command)}"
        )
        if self.stderr_tail:
            tail = "\n".join("    " + text for text in self.stderr_tail.splitlines())
            return f"{head}\n  last lines of {self.stderr_path}:\n{tail}"
        return f"{head}\n  stderr was empty; stdout is in {self.stdout_path}"

    def __reduce__(self) -> tuple[object, ...]:
        state = (
            self.index,
            self.line,
            self.command,
            self.returncode,
            self.stdout_path,
            self.stderr_path,
            self.stderr_tail,
            self.host,
            self.attempt,
            self.reason,
        )
        return (_rebuild_command_failed, state)


def _rebuild_command_failed(
    index: int,
    line: int,
    command: str,
    returncode: int | None,
    stdout_path: str,
    stderr_path: str,
    stderr_tail: str,
    host: str,
    attempt: int,
    reason: str,
) -> CommandFailed:
    return CommandFailed(
        index=index,
        line=line,
        command=command,
        returncode=returncode,
        stdout_path=stdout_path,
        stderr_path=stderr_path,
        stderr_tail=stderr_tail,
        host=host,
        attempt=attempt,
        reason=reason,
    )


def describe_returncode(returncode: int | None) -> str:
    """Say in words what an exit status means, naming signals where it can."""
    if returncode is None:
        return "did not start"
    if returncode < 0:
        return f"killed by signal {-returncode} ({_signal_name(-returncode)})"
    text = f"exit status {returncode}"
    signum = returncode - _SHELL_SIGNAL_BASE
    if 0 < signum < signal.NSIG:
        hint = " - out of memory?" if signum == signal.SIGKILL else ""
        text += f" (128+{signum}: a program was probably killed by {_signal_name(signum)}{hint})"
    return text


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


# --------------------------------------------------------------------------
# Task specs
# --------------------------------------------------------------------------


class FrozenEnv(Mapping[str, str]):
    """An immutable, hashable, picklable ``{name: value}`` mapping.

    `CommandSpec` is frozen and crosses MPI, so its environment cannot be a
    dict (mutable, unhashable) nor a MappingProxyType (does not pickle).
    """

    __slots__ = ("_data", "_hash")

    def __init__(self, items: Mapping[str, str] | Iterable[tuple[str, str]] = ()) -> None:
        data = dict(items)
        for name, value in data.items():
            if not isinstance(name, str) or not isinstance(value, str):
                raise TypeError(f"environment entries must be str=str, got {name!r}={value!r}")
        self._data = data
        self._hash: int | None = None

    def __getitem__(self, name: str) -> str:
        return self._data[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __hash__(self) -> int:
        if self._hash is None:  # cached: the parser hashes each env per command
            self._hash = hash(frozenset(self._data.items()))
        return self._hash

    def __repr__(self) -> str:
        return f"FrozenEnv({self._data!r})"

    def __reduce__(self) -> tuple[object, ...]:
        return (FrozenEnv, (tuple(self._data.items()),))


@dataclass(frozen=True)
class CommandSpec:
    """One shell command from a task file, ready to run on any rank.

    ``index`` is the 0-based position among the file's commands, ``line`` the
    1-based line where the command starts.  ``command``, ``cwd`` and ``env``
    have their placeholders substituted.  ``cwd`` None means the directory the
    farm was started in; a relative ``cwd`` is resolved against it too.
    ``env`` holds only what the task file adds or overrides.  ``occurrence``
    counts earlier commands with the same (command, cwd, env), so that a file
    listing ``./mc_sample`` 100 times gives 100 distinct journal keys.
    """

    index: int
    line: int
    command: str
    cwd: str | None = None
    env: Mapping[str, str] = field(default_factory=FrozenEnv)
    occurrence: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.env, FrozenEnv):
            object.__setattr__(self, "env", FrozenEnv(self.env))

    def key(self) -> str:
        """A stable identity for the journal: a digest of what runs, and where.

        Built from (command, cwd, env, occurrence) and not from the index or
        line, so inserting or deleting a line leaves every other task's key
        alone and ``--resume`` still finds them (unless their commands use
        ``{i}``, ``{n}``, ``{line}`` or ``{ntasks}``, which change with them).
        """
        payload = json.dumps(
            [self.command, self.cwd, sorted(self.env.items()), self.occurrence],
            ensure_ascii=True,
            separators=(",", ":"),
        )
        return hashlib.sha256(payload.encode("ascii")).hexdigest()[:_KEY_HEX_DIGITS]

    def label(self) -> str:
        """A short human label such as ``line 12: ./sim --seed 3``."""
        return f"line {self.line}: {_shorten(self.command)}"


@dataclass(frozen=True)
class CommandResult:
    """What a successful `run_command` reports back to the master.

    ``duration`` is wall-clock seconds; ``host`` the node it ran on.
    ``attempt`` (0 = first run) is an addition to the brief's fields: it tells
    which of the attempt's log files hold the successful run.
    """

    index: int
    line: int
    returncode: int
    duration: float
    host: str
    stdout_path: str
    stderr_path: str
    attempt: int = 0


def _shorten(command: str) -> str:
    """Whitespace collapsed, and cut to `_LABEL_MAX_CHARS` with ``...``."""
    text = " ".join(command.split())
    if len(text) <= _LABEL_MAX_CHARS:
        return text
    return text[: _LABEL_MAX_CHARS - 3] + "..."


# --------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------


#: text with its placeholders located: a plain str when it has none, else a
#: tuple of literal pieces and (name, format spec) pairs to fill in
_Template = str | tuple[str | tuple[str, str], ...]


@dataclass(frozen=True)
class _Scope:
    """The directive state a command is parsed under (values as templates)."""

    cwd: _Template | None = None
    env: tuple[tuple[str, _Template], ...] = ()


@dataclass(frozen=True)
class _RawCommand:
    line: int
    template: _Template
    scope: _Scope


def parse_task_file(path: str | os.PathLike[str]) -> list[CommandSpec]:
    """Parse a task file; raise `TaskFileError` (``FILE:LINE: reason``) if malformed.

    Bytes that are not UTF-8 pass through to the shell unchanged
    (surrogateescape), so Latin-1 file names in old task files still work.
    """
    source = os.fspath(path)
    try:
        with open(source, "rb") as handle:
            data = handle.read()
    except OSError as exc:
        raise TaskFileError(source, None, f"cannot read: {exc.strerror or exc}") from None
    return parse_task_text(data.decode("utf-8", errors="surrogateescape"), source=source)


def parse_task_text(text: str, *, source: str = "<string>") -> list[CommandSpec]:
    """Parse task-file text (see the module docstring and docs/taskfiles.md).

    Two passes: the first checks every line and collects commands with the
    directive state they fall under; the second substitutes placeholders,
    which needs ``{ntasks}``, known only at the end.
    """
    text = text.removeprefix("\ufeff")  # a byte-order mark some editors write
    lines = text.split("\n")  # not splitlines(): \f or \x1c must not end a line
    if lines and lines[-1] == "":
        lines.pop()  # the final newline does not start another line
    lines = [raw.removesuffix("\r") for raw in lines]  # files edited on Windows

    raw_commands: list[_RawCommand] = []
    scope = _Scope()
    pos = 0
    while pos < len(lines):
        lineno = pos + 1
        stripped = lines[pos].strip()
        pos += 1
        if not stripped:
            continue
        if stripped.startswith("#"):
            if _is_marked(stripped, DIRECTIVE_MARKER):
                scope = _apply_directive(stripped, scope, source, lineno)
            elif _is_marked(stripped, _DISBATCH_MARKER):
                raise TaskFileError(
                    source,
                    lineno,
                    f"{_DISBATCH_MARKER} directives are not supported (as a comment it would"
                    " be silently ignored); use #TASKFARM cwd/env or put it in each command",
                )
            # an ordinary comment never continues, as in the shell
            continue
        if stripped.startswith(_GREASY_DEPENDENCY_OPENER):
            raise TaskFileError(
                source,
                lineno,
                f"dependency prefixes ('{_GREASY_DEPENDENCY_OPENER} ... #]') are not supported:"
                " every command may run at any time, in any order",
            )
        parts = [lines[pos - 1]]
        while _continues(parts[-1]):
            if pos >= len(lines):
                raise TaskFileError(
                    source,
                    pos,
                    "the last line ends with '\\' (line continuation) but the file ends"
                    + (f"; the command starts on line {lineno}" if pos != lineno else ""),
                )
            parts[-1] = parts[-1][:-1]  # backslash-newline vanishes, as in sh
            parts.append(lines[pos])
            pos += 1
        command = "".join(parts).strip()
        if not command:
            continue  # a lone backslash followed by a blank line
        template = _compile(command, "command", source, lineno)
        raw_commands.append(_RawCommand(lineno, template, scope))

    if not raw_commands:
        raise TaskFileError(
            source,
            None,
            f"no commands ({len(lines)} lines, all blank, comments or directives)",
        )
    return _expand(raw_commands)


def _is_marked(stripped: str, marker: str) -> bool:
    """True if the line starts with the marker word (any case) followed by a blank or nothing."""
    head = stripped[: len(marker)]
    rest = stripped[len(marker) :]
    return head.upper() == marker and (not rest or rest[0].isspace())


def _continues(line: str) -> bool:
    """True if the line ends in an odd number of backslashes (an unescaped one)."""
    trailing = len(line) - len(line.rstrip("\\"))
    return trailing % 2 == 1


def _apply_directive(stripped: str, scope: _Scope, source: str, lineno: int) -> _Scope:
    """The scope after one ``#TASKFARM`` directive line."""

    def fail(reason: str) -> TaskFileError:
        return TaskFileError(source, lineno, reason)

    if _continues(stripped):
        raise fail("a #TASKFARM directive cannot be continued with '\\'")
    words = stripped[len(DIRECTIVE_MARKER) :].split(None, 1)
    if not words:
        raise fail("empty #TASKFARM directive (expected cwd, env or reset)")
    keyword = words[0].lower()
    arg = words[1].strip() if len(words) > 1 else ""

    if keyword == "cwd":
        if not arg:
            raise fail("'#TASKFARM cwd' needs a directory (use '#TASKFARM reset cwd' to undo)")
        return _Scope(_check_value(arg, "directory", source, lineno), scope.env)

    if keyword == "env":
        env = dict(scope.env)
        if arg.startswith("-"):
            name = arg[1:]
            _check_env_name(name, source, lineno)
            if name not in env:
                raise fail(f"'#TASKFARM env -{name}': {name} was not set by an earlier directive")
            del env[name]
            return _Scope(scope.cwd, tuple(env.items()))
        name, sep, value = arg.partition("=")
        if not sep:
            raise fail(f"'#TASKFARM env' needs NAME=VALUE or -NAME, got {arg!r}")
        _check_env_name(name, source, lineno)
        env[name] = _check_value(value, f"value of {name}", source, lineno, allow_empty=True)
        return _Scope(scope.cwd, tuple(env.items()))

    if keyword == "reset":
        if arg == "":
            return _Scope()
        if arg.lower() == "cwd":
            return _Scope(None, scope.env)
        if arg.lower() == "env":
            return _Scope(scope.cwd, ())
        raise fail(f"'#TASKFARM reset' takes nothing, 'cwd' or 'env', not {arg!r}")

    raise fail(f"unknown directive {words[0]!r} (known: cwd, env, reset)")


def _check_env_name(name: str, source: str, lineno: int) -> None:
    if not _ENV_NAME_RE.match(name):
        raise TaskFileError(
            source,
            lineno,
            f"bad environment variable name {name!r} (letters, digits and _, no spaces around '=')",
        )
    if name.upper().startswith(RESERVED_ENV_PREFIX):
        raise TaskFileError(
            source, lineno, f"{name}: names starting {RESERVED_ENV_PREFIX} are set by the farm"
        )


def _check_value(value: str, what: str, source: str, lineno: int, *, allow_empty: bool = False) -> _Template:
    """Check a directive value and compile it.

    Values are literal text: reject what would silently mean something else.
    """

    def fail(reason: str) -> TaskFileError:
        return TaskFileError(source, lineno, f"{what} {value!r}: {reason}")

    if not value and not allow_empty:
        raise fail("is empty")
    if len(value) >= 2 and value[0] in _QUOTES and value[-1] == value[0]:
        raise fail("values are taken literally, remove the quotes (spaces are allowed)")
    if "$" in value or value.startswith("~"):
        raise fail(
            "directive values are not expanded by a shell; write the path out, or do it in"
            ' the command (cd "$SCRATCH/run{n}" && ..., export PATH="$HOME/bin:$PATH"; ...)'
        )
    return _compile(value, what, source, lineno)


def _compile(text: str, what: str, source: str, lineno: int) -> _Template:
    """Check a command or value (NUL, malformed placeholders) and locate its placeholders.

    Done once per line in the first pass, so that errors come in line order
    and the second pass only fills in numbers.
    """
    if "\0" in text:
        raise TaskFileError(source, lineno, f"{what} contains a NUL character")
    if "{" not in text:
        return text
    parts: list[str | tuple[str, str]] = []
    done = 0
    for match in _PLACEHOLDER_RE.finditer(text):
        if match.group("open") is not None:
            raise TaskFileError(
                source, lineno, f"placeholder '{{{match.group('open')}' is not closed with '}}'"
            )
        start, end = match.span()
        if start > done:
            parts.append(text[done:start])
        done = end
        escaped, name, spec = match.group("esc", "name", "spec")
        if escaped is not None:
            parts.append("{" + escaped + "}")
            continue
        spec = spec or ""
        if spec not in _GOOD_SPECS:
            try:
                format(0, spec)
            except ValueError as exc:
                raise TaskFileError(
                    source,
                    lineno,
                    f"bad format in '{match.group(0)}': {exc} (e.g. {{i:05d}} pads with zeros)",
                ) from None
            _GOOD_SPECS.add(spec)
        parts.append((name, spec))
    if done == 0:
        return text  # braces, but none of them ours
    if done < len(text):
        parts.append(text[done:])
    return tuple(parts)


def _render(template: _Template, values: Mapping[str, int]) -> str:
    """The text of a compiled template with the placeholders filled in."""
    if isinstance(template, str):
        return template
    return "".join([part if isinstance(part, str) else format(values[part[0]], part[1]) for part in template])


def _expand(raw_commands: list[_RawCommand]) -> list[CommandSpec]:
    """Second pass: substitute placeholders and number duplicate commands."""
    ntasks = len(raw_commands)
    specs: list[CommandSpec] = []
    seen: dict[tuple[str, str | None, FrozenEnv], int] = {}
    # scopes without placeholders share one FrozenEnv: a million specs, few scopes
    shared_env: dict[_Scope, FrozenEnv] = {}
    for index, raw in enumerate(raw_commands):
        values = {"i": index, "n": index + 1, "line": raw.line, "ntasks": ntasks}
        scope = raw.scope
        cwd = _render(scope.cwd, values) if scope.cwd is not None else None
        env = shared_env.get(scope)
        if env is None:
            env = FrozenEnv((name, _render(value, values)) for name, value in scope.env)
            if all(isinstance(value, str) for _, value in scope.env):
                shared_env[scope] = env
        command = _render(raw.template, values)
        identity = (command, cwd, env)
        occurrence = seen.get(identity, 0)
        seen[identity] = occurrence + 1
        specs.append(CommandSpec(index, raw.line, command, cwd, env, occurrence))
    return specs


# --------------------------------------------------------------------------
# Running (on a worker rank)
# --------------------------------------------------------------------------


def shell_argv(command: str) -> list[str]:
    """The argv that runs ``command``: ``[/bin/bash, -c, command]`` (or sh)."""
    for shell in SHELL_CANDIDATES:
        if os.access(shell, os.X_OK):
            return [shell, "-c", command]
    return [SHELL_CANDIDATES[-1], "-c", command]  # fails to start, and says so


def log_paths(run_dir: str, index: int, attempt: int = 0) -> tuple[str, str]:
    """Where a task's stdout and stderr go: ``RUN_DIR/logs/000/000123.out|.err``.

    Retries keep earlier output: attempt 1 writes ``000123.1.out``, and so on.
    Subdirectories hold `_LOGS_PER_DIR` tasks each.
    """
    stem = f"{index:0{_LOG_INDEX_DIGITS}d}" + (f".{attempt}" if attempt else "")
    subdir = os.path.join(run_dir, "logs", f"{index // _LOGS_PER_DIR:03d}")
    return os.path.join(subdir, stem + ".out"), os.path.join(subdir, stem + ".err")


def _is_mpi_wireup(name: str) -> bool:
    return name in MPI_WIREUP_NAMES or name.startswith(MPI_WIREUP_PREFIXES)


def _child_environment(spec: CommandSpec, run_dir: str, attempt: int) -> dict[str, str]:
    """The worker's environment minus MPI wire-up, plus the task's, plus ours."""
    env = {name: value for name, value in os.environ.items() if not _is_mpi_wireup(name)}
    env.update(spec.env)
    env[RESERVED_ENV_PREFIX + "TASK_INDEX"] = str(spec.index)
    env[RESERVED_ENV_PREFIX + "TASK_LINE"] = str(spec.line)
    env[RESERVED_ENV_PREFIX + "ATTEMPT"] = str(attempt)
    env[RESERVED_ENV_PREFIX + "RUN_DIR"] = run_dir
    return env


def _stderr_tail(path: str) -> str:
    """The last `_STDERR_TAIL_LINES` lines of a log file ("" if unreadable)."""
    try:
        with open(path, "rb") as handle:
            size = handle.seek(0, os.SEEK_END)
            start = max(0, size - _STDERR_TAIL_BYTES)
            handle.seek(start)
            data = handle.read()
    except OSError:
        return ""
    lines = data.decode("utf-8", errors="replace").splitlines()
    if start > 0 and lines:
        lines = lines[1:]  # the first one is probably cut
    return "\n".join(lines[-_STDERR_TAIL_LINES:])


@contextlib.contextmanager
def _farm_signals_unblocked() -> Iterator[None]:
    """In this thread, while a command starts: a command inherits its parent
    thread's signal mask, and taskfarm's threads block `MAIN_THREAD_SIGNALS`
    (`taskfarm._signals`), so a command started by one (the threads pool)
    held them pending for good, even one that set handlers of its own.  Only
    this thread's mask changes, and only for the start.

    Their disposition is left as it is: a worker rank ignores them, and so
    does the command, on purpose.  ``srun`` can deliver a drain's signal to
    every process of the job step, commands included (tests/test_slurm.py
    saw it); a command that took it would die at once instead of finishing
    in the grace."""
    previous = signal.pthread_sigmask(signal.SIG_UNBLOCK, MAIN_THREAD_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _stop_process_group(proc: subprocess.Popen[bytes], grace_seconds: float = _KILL_GRACE_SECONDS) -> None:
    """SIGTERM the command's process group, then SIGKILL what is left."""
    for signum, grace in ((signal.SIGTERM, grace_seconds), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, signum)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            continue


def run_command(
    spec: CommandSpec, run_dir: str, attempt: int = 0, *, timeout: float | None = None
) -> CommandResult:
    """Run one command on this (worker) rank and return how it went.

    stdout and stderr go to `log_paths` files; stdin is /dev/null (a task
    must not read the launcher's stdin).  The environment is the worker's,
    without MPI wire-up variables, plus ``spec.env``, plus TASKFARM_TASK_INDEX,
    TASKFARM_TASK_LINE, TASKFARM_ATTEMPT and TASKFARM_RUN_DIR.  A relative
    ``spec.cwd`` is resolved against this process's working directory, which
    for ``mpiexec ... python -m taskfarm`` is where the farm was started.

    Raises `CommandFailed` if the exit status is not 0 (or the command could
    not start), and `TimeLimitExceeded` if ``timeout`` seconds pass first; in
    that case, and if this call is interrupted (KeyboardInterrupt, SystemExit
    from a signal handler), the command's whole process group is stopped.
    """
    run_dir = os.path.abspath(run_dir)
    out_path, err_path = log_paths(run_dir, spec.index, attempt)
    os.makedirs(os.path.dirname(out_path), exist_ok=True)  # races between ranks are fine
    host = socket.gethostname()
    cwd = os.path.abspath(spec.cwd) if spec.cwd is not None else None

    def failed(returncode: int | None, reason: str = "") -> CommandFailed:
        return CommandFailed(
            index=spec.index,
            line=spec.line,
            command=spec.command,
            returncode=returncode,
            stdout_path=out_path,
            stderr_path=err_path,
            stderr_tail=_stderr_tail(err_path),
            host=host,
            attempt=attempt,
            reason=reason,
        )

    started = time.monotonic()
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        try:
            # subprocess on Linux starts the child with vfork()+exec (or
            # posix_spawn), never a plain fork(): forking an MPI process
            # copies its InfiniBand-registered memory copy-on-write, which
            # corrupts transfers or crashes.  No preexec_fn, which would force
            # fork().  start_new_session puts the command in its own process
            # group (pgid = its pid), so that a time limit stops its children
            # too; it does not prevent vfork (only uid/gid changes would).
            with _farm_signals_unblocked():
                proc = subprocess.Popen(
                    shell_argv(spec.command),
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=err,
                    cwd=cwd,
                    env=_child_environment(spec, run_dir, attempt),
                    close_fds=True,
                    start_new_session=True,
                )
        except OSError as exc:
            what = f"working directory {cwd!r}" if cwd is not None else "shell"
            reason = f"did not start ({what}: {exc.strerror or exc})"
            err.write(f"taskfarm: {reason}\n".encode("utf-8", errors="replace"))
            err.flush()
            raise failed(None, reason) from None
        try:
            returncode = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _stop_process_group(proc)
            raise TimeLimitExceeded(
                f"task {spec.index} ({spec.label()}, attempt {attempt}) on {host} ran"
                f" longer than {timeout:g} s and was stopped; logs: {out_path}, {err_path}"
            ) from None
        except BaseException:  # the farm stops it (a drain), or the program ends
            _stop_process_group(proc, _INTERRUPT_GRACE_SECONDS)
            raise
    duration = time.monotonic() - started
    if returncode != 0:
        raise failed(returncode)
    return CommandResult(
        index=spec.index,
        line=spec.line,
        returncode=returncode,
        duration=duration,
        host=host,
        stdout_path=out_path,
        stderr_path=err_path,
        attempt=attempt,
    )


# --------------------------------------------------------------------------
# Manifest
# --------------------------------------------------------------------------


def _tsv_field(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")


def write_run_manifest(run_dir: str, specs: Sequence[CommandSpec], source: str) -> None:
    """Write ``RUN_DIR/tasks.tsv``: what each task index and log file stands for.

    The first line is ``# tasks from SOURCE``, then a header row and one row
    per task: index, line, key, cwd, env (JSON), command, with backslash,
    tab and newline escaped.  Written to a temporary file and renamed, so a
    reader never sees half of it.
    """
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, "tasks.tsv")
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8", errors="surrogateescape", newline="\n") as handle:
        handle.write(f"# tasks from {_tsv_field(source)}\n")
        handle.write("index\tline\tkey\tcwd\tenv\tcommand\n")
        for spec in specs:
            env = json.dumps(dict(spec.env), ensure_ascii=False, separators=(",", ":"))
            fields = (
                str(spec.index),
                str(spec.line),
                spec.key(),
                _tsv_field(spec.cwd or ""),
                _tsv_field(env),
                _tsv_field(spec.command),
            )
            handle.write("\t".join(fields) + "\n")
    os.replace(tmp, path)
