"""Tests for taskfarm._commands: the task-file parser and run_command (no MPI)."""

from __future__ import annotations

import os
import pickle
import signal
import threading
import time
from pathlib import Path

import pytest
from conftest import alive

from taskfarm import _commands
from taskfarm._commands import (
    CommandFailed,
    CommandResult,
    CommandSpec,
    FrozenEnv,
    TaskFileError,
    log_paths,
    parse_task_file,
    parse_task_text,
    run_command,
    write_run_manifest,
)
from taskfarm._errors import TaskfarmError, TimeLimitExceeded
from taskfarm._signals import MAIN_THREAD_SIGNALS, start_thread

#: generous bound on any command a test starts, so a regression hangs no CI job
CMD_TIMEOUT = 60.0
#: the time limit used to test time limits: short, but above process start-up
SHORT_LIMIT = 1.0
#: a TERM-ignoring command must be gone this soon after the limit + grace
STOP_SLACK = 10.0


def commands(text: str) -> list[str]:
    return [spec.command for spec in parse_task_text(text)]


def parse_error(text: str) -> TaskFileError:
    with pytest.raises(TaskFileError) as info:
        parse_task_text(text, source="tasks.txt")
    return info.value


# --------------------------------------------------------------------------
# Lines, comments, continuation
# --------------------------------------------------------------------------


def test_comments_and_blank_lines_are_skipped_and_lines_counted() -> None:
    text = "# header\n\n   \necho a\n    # indented comment\necho b # not a comment\n"
    specs = parse_task_text(text)
    assert [(s.index, s.line, s.command) for s in specs] == [
        (0, 4, "echo a"),
        (1, 6, "echo b # not a comment"),
    ]


def test_continuation_joins_lines_like_the_shell() -> None:
    text = "echo start\n./sim --a 1 \\\n      --b 2 \\\n      --c 3\necho end\n"
    specs = parse_task_text(text)
    assert [s.command for s in specs] == [
        "echo start",
        "./sim --a 1       --b 2       --c 3",
        "echo end",
    ]
    assert [s.line for s in specs] == [1, 2, 5]


def test_escaped_backslash_and_comment_backslash_do_not_continue() -> None:
    text = "echo a\\\\\necho b\n# comment \\\necho c\n"
    assert commands(text) == ["echo a\\\\", "echo b", "echo c"]


def test_continuation_at_end_of_file_is_an_error_with_its_line() -> None:
    error = parse_error("echo ok\n./sim \\\n  --x \\\n")
    assert error.line == 3
    assert str(error).startswith("tasks.txt:3: ")
    assert "line 2" in str(error)  # where the command started


def test_crlf_line_endings_and_byte_order_mark() -> None:
    specs = parse_task_text("\ufeffecho a\r\necho b \\\r\n  c\r\n")
    assert [s.command for s in specs] == ["echo a", "echo b   c"]


def test_empty_file_is_an_error() -> None:
    for text in ("", "\n\n", "# only comments\n#TASKFARM env A=1\n"):
        error = parse_error(text)
        assert error.line is None
        assert str(error).startswith("tasks.txt: no commands")


def test_nul_character_is_an_error() -> None:
    assert parse_error("echo ok\necho a\0b\n").line == 2


# --------------------------------------------------------------------------
# Directives
# --------------------------------------------------------------------------


def test_directives_apply_to_following_commands_until_changed() -> None:
    text = """\
echo plain
#TASKFARM cwd /data/a
#TASKFARM env OMP_NUM_THREADS=4
#TASKFARM env JAVA_OPTS=-Xmx1g -Xss2m
echo one
#TASKFARM env OMP_NUM_THREADS=8
#taskfarm   CWD   /data/b
echo two
#TASKFARM env -JAVA_OPTS
echo three
#TASKFARM reset cwd
echo four
#TASKFARM cwd /data/c
#TASKFARM reset env
echo five
#TASKFARM reset
echo six
"""
    got = [(s.command, s.cwd, dict(s.env)) for s in parse_task_text(text)]
    assert got == [
        ("echo plain", None, {}),
        ("echo one", "/data/a", {"OMP_NUM_THREADS": "4", "JAVA_OPTS": "-Xmx1g -Xss2m"}),
        ("echo two", "/data/b", {"OMP_NUM_THREADS": "8", "JAVA_OPTS": "-Xmx1g -Xss2m"}),
        ("echo three", "/data/b", {"OMP_NUM_THREADS": "8"}),
        ("echo four", None, {"OMP_NUM_THREADS": "8"}),
        ("echo five", "/data/c", {}),
        ("echo six", None, {}),
    ]


def test_env_value_may_be_empty_or_contain_equals_and_spaces() -> None:
    (spec,) = parse_task_text("#TASKFARM env A=\n#TASKFARM env B=x=y z\necho\n")
    assert dict(spec.env) == {"A": "", "B": "x=y z"}


def test_marker_must_be_a_whole_word() -> None:
    # NERSC TaskFarmer-style or commented-out lines stay comments
    assert commands("#TASKFARMER cwd x\n# TASKFARM foo\necho a\n") == ["echo a"]


@pytest.mark.parametrize(
    ("text", "line", "needle"),
    [
        ("echo a\n./x \\\n  y\n#TASKFARM chdir /tmp\n", 4, "unknown directive 'chdir'"),
        ("echo a\n#TASKFARM\n", 2, "empty #TASKFARM directive"),
        ("#TASKFARM cwd\necho a\n", 1, "needs a directory"),
        ("\n#TASKFARM env FOO\necho a\n", 2, "NAME=VALUE"),
        ("#TASKFARM env 1X=2\n", 1, "bad environment variable name"),
        ("#TASKFARM env A =2\n", 1, "bad environment variable name"),
        ("#TASKFARM env -NOPE\n", 1, "was not set by an earlier directive"),
        ("#TASKFARM env TASKFARM_RUN_DIR=x\n", 1, "set by the farm"),
        ("#TASKFARM env A=$HOME/x\n", 1, "not expanded by a shell"),
        ("#TASKFARM cwd ~/runs\n", 1, "not expanded by a shell"),
        ('#TASKFARM cwd "my runs"\n', 1, "remove the quotes"),
        ("#TASKFARM env A=1 \\\necho\n", 1, "cannot be continued"),
        ("#TASKFARM reset everything\n", 1, "'#TASKFARM reset' takes"),
        ("#TASKFARM cwd run{n:zz}\necho\n", 1, "bad format"),
        ("echo a\n#DISBATCH PREFIX cd dir ;\necho b\n", 2, "#DISBATCH directives are not"),
        ("echo a\n[# 1 #] ./step2\n", 2, "dependency prefixes"),
    ],
)
def test_bad_directives_are_errors_with_their_line(text: str, line: int, needle: str) -> None:
    error = parse_error(text)
    assert error.line == line
    assert str(error).startswith(f"tasks.txt:{line}: ")
    assert needle in str(error)
    assert "\n" not in str(error)  # the CLI prints it as one line


# --------------------------------------------------------------------------
# Placeholders
# --------------------------------------------------------------------------


def test_every_placeholder_is_substituted() -> None:
    text = "# c\necho {i} {n} {line} {ntasks}\n\necho {i} {n} {line} {ntasks}\n"
    assert commands(text) == ["echo 0 1 2 2", "echo 1 2 4 2"]


def test_placeholder_format_spec() -> None:
    text = "".join("out_{n:04d}.txt {i:>3}|\n" for _ in range(11))
    assert commands(text)[10] == "out_0011.txt  10|"


def test_double_braces_give_literal_placeholders() -> None:
    assert commands("python -c \"i=5; print(f'{{i}} {{n:03d}}')\" {i}\n") == [
        "python -c \"i=5; print(f'{i} {n:03d}')\" 0"
    ]


@pytest.mark.parametrize(
    "command",
    [
        "echo ${HOME} ${i} ${n} ${line} ${ntasks}",
        "awk '{print $1}' data.txt",
        "awk '{if ($1 > 0) {print $2}}' f",  # '}}' must survive
        "awk 'BEGIN{i=0} {i++} END{print i}' f",
        "sed -n '/start/{p;q}' f",
        "echo {a,b,c} {1..10} {{x}}",
        r"find . -name '*.dat' -exec gzip {} \;",
        "echo {I} {index} {nt} {i",
        "echo '{\"i\": 1}'",
    ],
)
def test_shell_braces_are_left_alone(command: str) -> None:
    assert commands(command + "\n") == [command]


def test_placeholders_apply_to_cwd_and_env_per_command() -> None:
    text = "#TASKFARM cwd run{n:03d}\n#TASKFARM env SEED={i}\n#TASKFARM env TAG={line}/{ntasks}\na\nb\n"
    got = [(s.cwd, dict(s.env)) for s in parse_task_text(text)]
    assert got == [
        ("run001", {"SEED": "0", "TAG": "4/2"}),
        ("run002", {"SEED": "1", "TAG": "5/2"}),
    ]


@pytest.mark.parametrize(
    ("text", "line", "needle"),
    [
        ("echo a\necho {i:05d\n", 2, "not closed"),
        ("echo a\necho {n:q}\n", 2, "bad format"),
        ("echo a\necho x \\\n  {ntasks:\n", 2, "not closed"),
    ],
)
def test_malformed_placeholders_are_errors(text: str, line: int, needle: str) -> None:
    error = parse_error(text)
    assert (error.line, needle in str(error)) == (line, True)


# --------------------------------------------------------------------------
# Specs, keys, labels
# --------------------------------------------------------------------------


def test_keys_survive_inserting_a_line_above() -> None:
    before = parse_task_text("./sim a\n./sim b\n./sim c\n")
    after = parse_task_text("./sim new\n# a comment\n./sim a\n./sim b\n./sim c\n")
    keys_before = {s.command: s.key() for s in before}
    keys_after = {s.command: s.key() for s in after}
    for command, key in keys_before.items():
        assert keys_after[command] == key
    assert [s.index for s in after if s.command == "./sim a"] == [1]  # index did move
    assert len(set(keys_after.values())) == 4


def test_keys_depend_on_cwd_env_and_repetition() -> None:
    specs = parse_task_text("./mc\n./mc\n#TASKFARM cwd d\n./mc\n#TASKFARM reset\n#TASKFARM env A=1\n./mc\n")
    assert [s.occurrence for s in specs] == [0, 1, 0, 0]
    assert len({s.key() for s in specs}) == 4
    assert all(len(s.key()) == 20 and int(s.key(), 16) >= 0 for s in specs)


def test_key_ignores_env_order_and_index() -> None:
    one = CommandSpec(0, 1, "x", env={"A": "1", "B": "2"})
    two = CommandSpec(7, 9, "x", env={"B": "2", "A": "1"})
    assert one.key() == two.key()


def test_spec_pickles_hashes_and_freezes_env() -> None:
    (spec,) = parse_task_text("#TASKFARM cwd /w\n#TASKFARM env A=1\necho {n}\n")
    clone = pickle.loads(pickle.dumps(spec))
    assert clone == spec and hash(clone) == hash(spec) and clone.key() == spec.key()
    assert isinstance(clone.env, FrozenEnv)
    with pytest.raises(TypeError):
        spec.env["B"] = "2"  # type: ignore[index]
    assert isinstance(CommandSpec(0, 1, "x", env={"A": "1"}).env, FrozenEnv)


def test_label_is_short_and_names_the_line() -> None:
    spec = CommandSpec(3, 12, "./sim   --seed 3 " + "--flag " * 30)
    label = spec.label()
    assert label.startswith("line 12: ./sim --seed 3 --flag")
    assert label.endswith("...") and len(label) <= len("line 12: ") + 60


def test_parse_task_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "tasks.txt"
    path.write_text("echo a\n#TASKFARM bogus\n")
    with pytest.raises(TaskFileError) as info:
        parse_task_file(path)
    assert str(info.value).startswith(f"{path}:2: unknown directive")
    assert info.value.path == str(path)
    clone = pickle.loads(pickle.dumps(info.value))
    assert (str(clone), clone.line) == (str(info.value), 2)
    assert isinstance(info.value, TaskfarmError)

    path.write_bytes(b"echo caf\xe9\n")  # Latin-1 bytes pass through
    (spec,) = parse_task_file(path)
    assert os.fsencode(spec.command) == b"echo caf\xe9"


def test_missing_task_file_is_a_task_file_error(tmp_path: Path) -> None:
    with pytest.raises(TaskFileError) as info:
        parse_task_file(tmp_path / "nope.txt")
    assert info.value.line is None and "cannot read" in str(info.value)


# --------------------------------------------------------------------------
# run_command
# --------------------------------------------------------------------------


def run(spec: CommandSpec, run_dir: Path, attempt: int = 0) -> CommandResult:
    return run_command(spec, str(run_dir), attempt, timeout=CMD_TIMEOUT)


def test_success_captures_output_to_log_files(tmp_path: Path) -> None:
    spec = CommandSpec(1234, 7, "echo to-out; echo to-err >&2; cat")  # cat: stdin is empty
    result = run(spec, tmp_path)
    assert (result.index, result.line, result.returncode, result.attempt) == (1234, 7, 0, 0)
    assert result.stdout_path == str(tmp_path / "logs" / "001" / "001234.out")
    assert result.stderr_path == str(tmp_path / "logs" / "001" / "001234.err")
    assert Path(result.stdout_path).read_text() == "to-out\n"
    assert Path(result.stderr_path).read_text() == "to-err\n"
    assert 0 <= result.duration < CMD_TIMEOUT and result.host
    assert pickle.loads(pickle.dumps(result)) == result


def test_failure_raises_with_returncode_and_stderr_tail(tmp_path: Path) -> None:
    command = "echo partial; for k in $(seq 0 29); do printf 'e%02d\\n' $k >&2; done; exit 3"
    spec = CommandSpec(5, 9, command)
    with pytest.raises(CommandFailed) as info:
        run(spec, tmp_path)
    error = info.value
    assert (error.returncode, error.index, error.line, error.attempt) == (3, 5, 9, 0)
    assert "exit status 3" in str(error) and "line 9" in str(error)
    assert "e29" in str(error) and "e10" in str(error) and "e09" not in str(error)
    assert error.stderr_tail.splitlines() == [f"e{k:02d}" for k in range(10, 30)]
    assert Path(error.stdout_path).read_text() == "partial\n"
    assert Path(error.stderr_path).read_text().count("\n") == 30

    clone = pickle.loads(pickle.dumps(error))
    assert type(clone) is CommandFailed and str(clone) == str(error)
    for name in ("returncode", "index", "line", "stdout_path", "stderr_path", "stderr_tail"):
        assert getattr(clone, name) == getattr(error, name)


def test_exit_128_plus_signal_is_explained(tmp_path: Path) -> None:
    with pytest.raises(CommandFailed) as info:
        run(CommandSpec(0, 1, "exit 137"), tmp_path)
    assert info.value.returncode == 137
    assert "SIGKILL" in str(info.value) and "stderr was empty" in str(info.value)


def test_command_killed_by_signal_has_negative_returncode(tmp_path: Path) -> None:
    with pytest.raises(CommandFailed) as info:
        run(CommandSpec(0, 1, "kill -9 $$"), tmp_path)
    assert info.value.returncode == -signal.SIGKILL
    assert "killed by signal 9 (SIGKILL)" in str(info.value)


def test_env_and_cwd_are_applied(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    start = tmp_path / "start"
    (start / "work" / "sub").mkdir(parents=True)
    monkeypatch.chdir(start)  # relative cwd resolves against the start directory
    monkeypatch.setenv("INHERITED", "yes")
    monkeypatch.setenv("OVERRIDDEN", "old")
    monkeypatch.setenv("PMI_RANK", "3")  # MPI wire-up must not leak into tasks
    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "3")
    monkeypatch.setenv("OMPI_MCA_btl", "self")  # user tuning stays
    (spec,) = parse_task_text(
        "#TASKFARM cwd work/sub\n#TASKFARM env OVERRIDDEN=new value\n"
        'pwd -P; echo "$INHERITED|$OVERRIDDEN|${PMI_RANK-unset}|'
        '${OMPI_COMM_WORLD_RANK-unset}|$OMPI_MCA_btl"; '
        'echo "$TASKFARM_TASK_INDEX $TASKFARM_TASK_LINE $TASKFARM_ATTEMPT $TASKFARM_RUN_DIR"\n'
    )
    run_dir = tmp_path / "run"
    result = run(spec, run_dir, attempt=2)
    lines = Path(result.stdout_path).read_text().splitlines()
    assert lines == [
        str((start / "work" / "sub").resolve()),
        "yes|new value|unset|unset|self",
        f"0 3 2 {run_dir}",
    ]


def test_missing_cwd_fails_without_starting(tmp_path: Path) -> None:
    spec = CommandSpec(0, 4, "echo never", cwd=str(tmp_path / "absent"))
    with pytest.raises(CommandFailed) as info:
        run(spec, tmp_path)
    assert info.value.returncode is None
    assert "did not start" in str(info.value) and "absent" in str(info.value)
    assert "did not start" in Path(info.value.stderr_path).read_text()


def test_retried_attempts_keep_earlier_logs(tmp_path: Path) -> None:
    first = run(CommandSpec(3, 1, "echo first"), tmp_path, attempt=0)
    second = run(CommandSpec(3, 1, "echo second"), tmp_path, attempt=1)
    assert first.stdout_path != second.stdout_path
    assert second.stdout_path.endswith("000003.1.out") and second.attempt == 1
    assert Path(first.stdout_path).read_text() == "first\n"
    assert Path(second.stdout_path).read_text() == "second\n"
    assert log_paths(str(tmp_path), 3, 2)[1].endswith("000003.2.err")


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs Linux /proc")
def test_stdin_is_dev_null_not_the_launchers(tmp_path: Path) -> None:
    # give this process a pipe as stdin, as mpiexec may: a task must not inherit it
    read_end, write_end = os.pipe()
    saved = os.dup(0)
    try:
        os.dup2(read_end, 0)
        result = run(CommandSpec(0, 1, "readlink /proc/self/fd/0"), tmp_path)
    finally:
        os.dup2(saved, 0)
        for fd in (saved, read_end, write_end):
            os.close(fd)
    assert Path(result.stdout_path).read_text() == "/dev/null\n"


@pytest.mark.skipif(not os.access("/bin/bash", os.X_OK), reason="needs /bin/bash")
def test_commands_run_under_bash(tmp_path: Path) -> None:
    result = run(CommandSpec(0, 1, "[[ 1 == 1 ]] && echo {1..3}"), tmp_path)
    assert Path(result.stdout_path).read_text() == "1 2 3\n"


def _wait_dead(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not alive(pid):
            return True
        time.sleep(0.05)
    return not alive(pid)


def test_time_limit_stops_the_whole_process_group(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_commands, "_KILL_GRACE_SECONDS", 0.5)
    pid_file = tmp_path / "bg.pid"
    # ignores SIGTERM, and leaves a background child: both need SIGKILL
    command = f"trap '' TERM; sleep 300 & echo $! > {pid_file}; sleep 300"
    started = time.monotonic()
    with pytest.raises(TimeLimitExceeded) as info:
        run_command(CommandSpec(0, 1, command), str(tmp_path), timeout=SHORT_LIMIT)
    assert time.monotonic() - started < SHORT_LIMIT + STOP_SLACK
    assert "longer than 1 s" in str(info.value)
    assert _wait_dead(int(pid_file.read_text()), STOP_SLACK)


def _signal_masks(status: str) -> dict[str, int]:
    """SigIgn and SigBlk of a /proc/<pid>/status text, as masks."""
    fields = dict(line.split(":", 1) for line in status.splitlines() if line.startswith(("SigIgn", "SigBlk")))
    return {name: int(value, 16) for name, value in fields.items()}


def test_a_command_starts_with_the_farms_signals_unblocked_and_still_ignored(tmp_path: Path) -> None:
    """taskfarm's threads block the drain's signals, and a command started by
    one (the threads pool) inherited that mask: a signal it set a handler for
    stayed pending for good.  Their disposition stays as the worker's: the
    launcher sends a drain's signal to every process of the job step, and a
    command that took it would die at once, not finish in the grace (a
    Slurm test caught that).  Here SIGUSR1 is ignored as a worker ignores it."""
    spec = CommandSpec(3, 1, "cat /proc/self/status")
    after: list[set[signal.Signals]] = []

    def run_from_a_taskfarm_thread() -> None:
        run(spec, tmp_path)
        after.append(signal.pthread_sigmask(signal.SIG_BLOCK, []))

    previous = signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    try:
        start_thread(threading.Thread(target=run_from_a_taskfarm_thread)).join(CMD_TIMEOUT)
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert after and after[0] >= MAIN_THREAD_SIGNALS  # the thread's own mask is back as it was
    masks = _signal_masks(Path(log_paths(str(tmp_path), 3)[0]).read_text())
    assert masks["SigBlk"] & sum(1 << (int(sig) - 1) for sig in MAIN_THREAD_SIGNALS) == 0
    assert masks["SigIgn"] & (1 << (signal.SIGUSR1 - 1))  # the drain's signal does not kill it


class _Interrupted(Exception):
    """Raised by a test signal handler, as the farm's SIGTERM handler might."""


def _interrupted_run(command: str, tmp_path: Path) -> tuple[float, float]:
    """Run ``command``; a signal handler raises in the wait after `SHORT_LIMIT`.
    Returns when the handler raised and when `run_command` returned."""
    raised: list[float] = []

    def interrupt(signum: int, frame: object) -> None:
        raised.append(time.monotonic())
        raise _Interrupted

    previous = signal.signal(signal.SIGALRM, interrupt)
    try:
        signal.setitimer(signal.ITIMER_REAL, SHORT_LIMIT)
        with pytest.raises(_Interrupted):
            run(CommandSpec(0, 1, command), tmp_path)
        return raised[0], time.monotonic()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def test_a_command_the_farm_stops_gets_a_short_grace(tmp_path: Path) -> None:
    """Stopped by the farm (a drain's grace ran out, the program ends), a
    command that ignores SIGTERM, as a command on a worker rank does, gets
    SIGKILL after `_INTERRUPT_GRACE_SECONDS`, not after a time limit's 5 s:
    its rank must say Bye within the 2 s the master waits."""
    pid_file = tmp_path / "pid"
    command = f"trap '' TERM; echo $$ > {pid_file}.tmp; mv {pid_file}.tmp {pid_file}; sleep 300"
    raised, returned = _interrupted_run(command, tmp_path)
    assert returned - raised < _commands._KILL_GRACE_SECONDS - 2  # well under a time limit's grace
    assert not alive(int(pid_file.read_text()))


def test_interrupted_wait_stops_the_command(tmp_path: Path) -> None:
    pid_file = tmp_path / "bg.pid"
    _interrupted_run(f"sleep 300 & echo $! > {pid_file}; sleep 300", tmp_path)
    assert _wait_dead(int(pid_file.read_text()), STOP_SLACK)


# --------------------------------------------------------------------------
# Manifest
# --------------------------------------------------------------------------


def test_run_manifest_lists_every_task(tmp_path: Path) -> None:
    specs = parse_task_text("#TASKFARM cwd d\n#TASKFARM env A=1\necho a\tb\necho c\n")
    write_run_manifest(str(tmp_path / "run"), specs, "tasks.txt")
    lines = (tmp_path / "run" / "tasks.tsv").read_text().splitlines()
    assert lines[0] == "# tasks from tasks.txt"
    assert lines[1].split("\t") == ["index", "line", "key", "cwd", "env", "command"]
    rows = [line.split("\t") for line in lines[2:]]
    assert rows == [
        ["0", "3", specs[0].key(), "d", '{"A":"1"}', "echo a\\tb"],
        ["1", "4", specs[1].key(), "d", '{"A":"1"}', "echo c"],
    ]
    assert sorted(os.listdir(tmp_path / "run")) == ["tasks.tsv"]  # no temp file left
