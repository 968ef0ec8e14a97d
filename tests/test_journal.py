"""Unit tests of taskfarm._journal: format round trip, damage, locking, status."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import numpy as np
import pytest

from taskfarm import _journal as jr
from taskfarm import _journal_writer as jw
from taskfarm._errors import ExitCode, JournalError
from taskfarm._journal import (
    CANCELLED,
    FAILURE,
    PENDING,
    RETRY,
    RUNNING,
    SUCCESS,
    Frame,
    JournalCorruptError,
    JournalLockedError,
    JournalNotFoundError,
    JournalState,
    JournalVersionError,
    read_journal,
)
from taskfarm._journal_writer import JournalWriter
from taskfarm._status import format_status, status_exit_code, status_report

#: Repository root, put on PYTHONPATH of the subprocesses.
REPO = Path(__file__).resolve().parents[1]
#: Seconds a helper subprocess may take before the test fails.
SUBPROCESS_TIMEOUT = 60
#: Tasks in the bytes-per-task test.
NOOP_TASKS = 10_000


def frame_of(obj: object) -> Frame:
    """Serialize like a worker: pickle-5 header plus out-of-band buffers."""
    bufs: list[pickle.PickleBuffer] = []
    header = pickle.dumps(obj, protocol=5, buffer_callback=bufs.append)
    return (header, bufs)


def load(frame: Frame | None) -> object:
    assert frame is not None
    return pickle.loads(frame[0], buffers=frame[1])


def run_python(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run a helper script with the repo importable; never hang the test run."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        capture_output=True,
        check=False,
        text=True,
        timeout=SUBPROCESS_TIMEOUT,
        env=env,
    )


def explain(proc: subprocess.CompletedProcess[str]) -> str:
    return f"rc={proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"


def write_tasks(path: Path, n: int, *, start: int = 0) -> list[int]:
    """n complete tasks; returns the record boundaries (file offsets)."""
    bounds = []
    with JournalWriter(path) as w:
        bounds.append(w.bytes_written if start == 0 else -1)
        for i in range(start, start + n):
            w.submitted(f"k{i}", label=f"f({i})", t=float(i))
            bounds.append(w.bytes_written)
            w.dispatched(f"k{i}", rank=1 + i % 3, attempt=1, t=i + 0.5)
            bounds.append(w.bytes_written)
            w.succeeded(
                f"k{i}", rank=1 + i % 3, attempt=1, t_start=i + 0.5, t_end=i + 1.0,
                result=frame_of({"i": i, "a": np.full(3, i)}),
            )
            bounds.append(w.bytes_written)
    return bounds


# ---------------------------------------------------------------------------
# Round trip
# ---------------------------------------------------------------------------


def test_round_trip_every_record_type(tmp_path: Path) -> None:
    path = tmp_path / "a.journal"
    err = frame_of(ValueError("boom"))
    with JournalWriter(path) as w:
        w.run_started({"argv": ["run.py", "-n", "3"], "resume": False, "nworkers": 4})
        for key in ("ok", "bad", "retry", "cut", "gone", "wait", "busy"):
            w.submitted(key, label=f"f({key})", t=10.0)
        w.dispatched("ok", rank=1, attempt=1, t=11.0)
        w.succeeded("ok", rank=1, attempt=1, t_start=11.0, t_end=12.5, result=frame_of([1, "x"]))
        w.dispatched("bad", rank=2, attempt=1, t=11.0)
        w.failed("bad", rank=2, attempt=1, t=13.0, error=err,
                 error_text="Traceback ...\nValueError: boom", final=True)
        w.dispatched("retry", rank=3, attempt=1, t=11.0)
        w.failed("retry", rank=3, attempt=1, t=14.0, error=None, error_text="lost", final=False)
        w.dispatched("cut", rank=1, attempt=1, t=13.0)
        w.failed("cut", rank=1, attempt=1, t=15.0, error=None, error_text="drained",
                 final=False, counts_as_attempt=False)
        w.cancelled("gone", t=16.0)
        w.dispatched("busy", rank=2, attempt=1, t=16.0)
        w.run_ended({"status": "drained", "exit_code": 75})
    st = read_journal(path)
    assert list(st.tasks) == ["ok", "bad", "retry", "cut", "gone", "wait", "busy"]
    ok = st.tasks["ok"]
    assert (ok.state, ok.attempts, ok.rank, ok.label) == (SUCCESS, 1, 1, "f(ok)")
    assert (ok.t_submit, ok.t_start, ok.t_end, ok.successes) == (10.0, 11.0, 12.5, 1)
    assert load(ok.result) == [1, "x"]
    bad = st.tasks["bad"]
    assert (bad.state, bad.attempts, bad.rank, bad.t_end) == (FAILURE, 1, 2, 13.0)
    assert bad.error_text == "Traceback ...\nValueError: boom"
    exc = load(bad.error)
    assert isinstance(exc, ValueError) and exc.args == ("boom",)
    assert (st.tasks["retry"].state, st.tasks["retry"].attempts) == (RETRY, 1)
    assert st.tasks["retry"].error is None
    assert (st.tasks["cut"].state, st.tasks["cut"].attempts) == (RETRY, 0)
    assert (st.tasks["gone"].state, st.tasks["gone"].t_end) == (CANCELLED, 16.0)
    assert st.tasks["wait"].state == PENDING
    assert st.tasks["busy"].state == RUNNING
    assert st.runs == [{
        "argv": ["run.py", "-n", "3"], "resume": False, "nworkers": 4,
        "ended": True, "status": "drained", "exit_code": 75,
    }]
    assert st.format_version == jr.FORMAT_VERSION and st.host and st.created
    assert st.torn_tail_bytes == 0 and st.valid_bytes == path.stat().st_size
    assert st.counts() == {PENDING: 1, RUNNING: 1, RETRY: 2, SUCCESS: 1, FAILURE: 1, CANCELLED: 1}
    assert st.per_rank() == {
        1: {"done": 1, "failed": 0, "busy_s": 1.5 + 2.0},
        2: {"done": 0, "failed": 1, "busy_s": 2.0},
        3: {"done": 0, "failed": 1, "busy_s": 3.0},
    }
    assert not st.complete()


def test_numpy_result_frames_round_trip_raw(tmp_path: Path) -> None:
    path = tmp_path / "np.journal"
    arrays: dict[str, np.ndarray] = {
        "small": np.arange(10, dtype=np.int16),
        "big": np.random.default_rng(1).standard_normal((300, 400)),  # > INLINE_PARTS_MAX
        "fortran": np.asfortranarray(np.arange(12.0).reshape(3, 4)),
        "complex": np.arange(6, dtype=np.complex128) * 1j,
        "empty": np.zeros((0, 5)),
    }
    frames = {k: frame_of({"arr": a, "tag": k}) for k, a in arrays.items()}
    assert all(frames[k][1] for k in ("small", "big", "fortran")), "expected out-of-band buffers"
    with JournalWriter(path) as w:
        for k, fr in frames.items():
            w.submitted(k, label=k, t=0.0)
            w.succeeded(k, rank=1, attempt=1, t_start=0.0, t_end=1.0, result=fr)
    data = path.read_bytes()
    # the raw array bytes are in the file verbatim, not re-pickled
    assert arrays["big"].tobytes() in data
    st = read_journal(path)
    for k, a in arrays.items():
        got = load(st.tasks[k].result)
        assert isinstance(got, dict) and got["tag"] == k
        np.testing.assert_array_equal(got["arr"], a)
        assert got["arr"].dtype == a.dtype
        if a.size:
            assert got["arr"].flags.writeable and got["arr"].flags.aligned
    # header and each buffer come back as separate parts of the frame
    header, bufs = st.tasks["big"].result or (b"", [])
    assert header == frames["big"][0]
    assert [bytes(b) for b in bufs] == [bytes(b) for b in frames["big"][1]]


def test_many_buffers_beyond_iov_max(tmp_path: Path) -> None:
    path = tmp_path / "iov.journal"
    n = jw._IOV_MAX + 100
    parts = [bytes([i % 256]) * 100 for i in range(n)]  # 100 kB in total: the writev path
    with JournalWriter(path) as w:
        w.submitted("k", label="", t=0.0)
        w.succeeded("k", rank=0, attempt=1, t_start=0, t_end=0, result=(b"hdr", parts))
    res = read_journal(path).tasks["k"].result
    assert res is not None and res[0] == b"hdr" and [bytes(b) for b in res[1]] == parts


def test_results_false_skips_frames(tmp_path: Path) -> None:
    path = tmp_path / "a.journal"
    write_tasks(path, 3)
    st = read_journal(path, results=False)
    assert st.counts()[SUCCESS] == 3
    assert all(e.result is None for e in st.tasks.values())


# ---------------------------------------------------------------------------
# Replay rules
# ---------------------------------------------------------------------------


def test_first_success_wins(tmp_path: Path) -> None:
    path = tmp_path / "a.journal"
    with JournalWriter(path) as w:
        w.submitted("k", label="f()", t=0.0)
        w.succeeded("k", rank=1, attempt=1, t_start=1, t_end=2, result=frame_of("first"))
        w.succeeded("k", rank=2, attempt=2, t_start=3, t_end=4, result=frame_of("second"))
        w.failed("k", rank=3, attempt=3, t=5, error=None, error_text="late", final=True)
        w.cancelled("k", t=6)
        w.submitted("k", label="f()", t=7.0)  # resubmission does not reset a success
        w.dispatched("k", rank=4, attempt=4, t=8.0)
    e = read_journal(path).tasks["k"]
    assert load(e.result) == "first"
    assert (e.state, e.successes, e.attempts, e.rank, e.t_end) == (SUCCESS, 2, 1, 1, 2)
    assert e.error_text is None
    st = read_journal(path)
    assert status_report(st)["duplicate_successes"] == ["k"]
    assert "more than one success" in format_status(st)


def test_not_counted_failure_does_not_add_attempts(tmp_path: Path) -> None:
    path = tmp_path / "a.journal"
    with JournalWriter(path) as w:
        w.submitted("k", label="", t=0.0)
        for attempt in (1, 2, 3):
            w.dispatched("k", rank=1, attempt=attempt, t=attempt)
            w.failed("k", rank=1, attempt=attempt, t=attempt + 0.5, error=None,
                     error_text="cut", final=False, counts_as_attempt=False)
        w.dispatched("k", rank=1, attempt=4, t=5.0)
        w.failed("k", rank=1, attempt=4, t=6.0, error=None, error_text="real", final=False)
    e = read_journal(path).tasks["k"]
    assert (e.state, e.attempts, e.error_text) == (RETRY, 1, "real")
    assert read_journal(path).per_rank()[1]["failed"] == 1


def test_resume_keeps_history_and_ids(tmp_path: Path) -> None:
    path = tmp_path / "a.journal"
    with JournalWriter(path) as w:
        w.run_started({"run": 1})
        w.submitted("a", label="f(a)", t=0.0)
        w.submitted("b", label="f(b)", t=0.0)
        w.dispatched("a", rank=1, attempt=1, t=1.0)
        w.succeeded("a", rank=1, attempt=1, t_start=1, t_end=2, result=frame_of("A"))
        w.dispatched("b", rank=2, attempt=1, t=1.0)
        w.failed("b", rank=2, attempt=1, t=3, error=None, error_text="x", final=True)
    # run 1 was killed: no run_ended.  Run 2 resumes with a fresh writer.
    with JournalWriter(path) as w:
        w.run_started({"run": 2, "resume": True})
        w.submitted("a", label="f(a)", t=10.0)
        w.submitted("b", label="f(b)", t=10.0)
        w.submitted("c", label="f(c)", t=10.0)  # new key gets the next id
        w.dispatched("b", rank=1, attempt=2, t=11.0)
        w.succeeded("b", rank=1, attempt=2, t_start=11, t_end=12, result=frame_of("B"))
        w.dispatched("c", rank=2, attempt=1, t=11.0)  # ids must map to c, not a or b
        w.succeeded("c", rank=2, attempt=1, t_start=11, t_end=13, result=frame_of("C"))
        w.run_ended({"status": "complete"})
    st = read_journal(path)
    assert [(k, load(e.result), e.attempts) for k, e in st.tasks.items()] == [
        ("a", "A", 1), ("b", "B", 2), ("c", "C", 1)]
    assert st.tasks["a"].t_submit == 0.0  # history kept
    assert st.runs == [{"run": 1, "ended": False},
                       {"run": 2, "resume": True, "ended": True, "status": "complete"}]
    assert status_exit_code(st) == ExitCode.OK


def test_unsubmitted_key_is_defined_on_the_fly(tmp_path: Path) -> None:
    path = tmp_path / "a.journal"
    with JournalWriter(path) as w:
        w.dispatched("x", rank=1, attempt=1, t=5.0)
        w.succeeded("x", rank=1, attempt=1, t_start=5, t_end=6, result=frame_of(1))
    e = read_journal(path).tasks["x"]
    assert (e.state, e.label, e.t_submit) == (SUCCESS, "", 5.0)


def test_odd_keys_and_long_labels(tmp_path: Path) -> None:
    path = tmp_path / "a.journal"
    key = "clé-\udcff-" + "x" * 1000
    with JournalWriter(path) as w:
        w.submitted(key, label="L" * 1000, t=0.0)
        w.failed(key, rank=-1, attempt=0, t=1, error=None, error_text="é" * 10, final=True)
        with pytest.raises(ValueError):
            w.submitted("k" * 70_000, label="", t=0.0)
        with pytest.raises(ValueError):
            w.dispatched(key, rank=2**40, attempt=1, t=0.0)
    e = read_journal(path).tasks[key]
    assert len(e.label) == jr.MAX_LABEL_CHARS and e.rank is None and e.error_text == "é" * 10
    assert read_journal(path).per_rank() == {}


# ---------------------------------------------------------------------------
# Damage
# ---------------------------------------------------------------------------


def test_torn_last_record_at_many_cut_points(tmp_path: Path) -> None:
    src = tmp_path / "full.journal"
    bounds = write_tasks(src, 4)
    last_start, end = bounds[-2], bounds[-1]
    assert end == src.stat().st_size
    head = jr._HEAD_SIZE
    cuts = sorted({1, 2, 8, head - 1, head, head + 1, head + 20, (end - last_start) - 1})
    for cut in cuts:
        path = tmp_path / f"cut{cut}.journal"
        shutil.copyfile(src, path)
        os.truncate(path, last_start + cut)
        st = read_journal(path)
        assert (st.valid_bytes, st.torn_tail_bytes) == (last_start, cut), cut
        assert st.tasks["k3"].state == RUNNING and st.tasks["k2"].state == SUCCESS
        assert f"{cut} torn bytes" in format_status(st)
        assert status_report(st)["torn_tail_bytes"] == cut
        # the writer cuts the torn record away and appends after the last whole one
        with JournalWriter(path) as w:
            assert path.stat().st_size == last_start
            w.succeeded("k3", rank=1, attempt=1, t_start=0, t_end=1, result=frame_of("again"))
            w.submitted("k9", label="", t=0.0)
        st = read_journal(path)
        assert st.torn_tail_bytes == 0
        assert load(st.tasks["k3"].result) == "again" and "k9" in st.tasks


def test_torn_file_header_is_rewritten(tmp_path: Path) -> None:
    path = tmp_path / "a.journal"
    JournalWriter(path).close()
    size = path.stat().st_size
    os.truncate(path, size - 3)
    st = read_journal(path)
    assert (st.valid_bytes, st.torn_tail_bytes, st.format_version) == (0, size - 3, None)
    with JournalWriter(path) as w:
        w.submitted("k", label="", t=0.0)
    assert read_journal(path).format_version == jr.FORMAT_VERSION


def test_zero_filled_tail_is_torn(tmp_path: Path) -> None:
    path = tmp_path / "a.journal"
    bounds = write_tasks(path, 2)
    with open(path, "ab") as f:
        f.write(b"\0" * 100)
    st = read_journal(path)
    assert (st.valid_bytes, st.torn_tail_bytes) == (bounds[-1], 100)


@pytest.mark.parametrize("where", ["magic", "head", "body", "parts"])
def test_corrupt_middle_record_names_offset(tmp_path: Path, where: str) -> None:
    path = tmp_path / "a.journal"
    bounds = write_tasks(path, 5)
    # bounds[j]..bounds[j+1] is record j after the file header; record 8 is
    # the SUCCESS of k2 (head, body and frame parts), in the middle of the file
    start, stop = bounds[8], bounds[9]
    pos = {"magic": start, "head": start + 5, "body": start + jr._HEAD_SIZE + 2,
           "parts": stop - 3}[where]
    data = bytearray(path.read_bytes())
    data[pos] ^= 0x40
    path.write_bytes(bytes(data))
    with pytest.raises(JournalCorruptError) as info:
        read_journal(path)
    assert info.value.offset == start
    assert f"offset {start}" in str(info.value)
    assert isinstance(info.value, JournalError)
    # a writer refuses it too and leaves the file untouched
    with pytest.raises(JournalCorruptError):
        JournalWriter(path)
    assert path.read_bytes() == bytes(data)
    # the refused writer released its lock: a second try is refused the same way
    with pytest.raises(JournalCorruptError):
        JournalWriter(path)


def test_corrupt_last_whole_record_is_not_torn(tmp_path: Path) -> None:
    path = tmp_path / "a.journal"
    bounds = write_tasks(path, 2)
    data = bytearray(path.read_bytes())
    data[bounds[-2] + jr._HEAD_SIZE] ^= 1  # whole-length last record, bad body
    path.write_bytes(bytes(data))
    with pytest.raises(JournalCorruptError) as info:
        read_journal(path)
    assert info.value.offset == bounds[-2]


def test_foreign_file_is_refused_not_truncated(tmp_path: Path) -> None:
    for content in (b"hello", b"#!/bin/sh\necho this is not a journal\n"):
        path = tmp_path / "x.journal"
        path.write_bytes(content)
        with pytest.raises(JournalCorruptError) as info:
            read_journal(path)
        assert info.value.offset == 0 and "not a taskfarm journal" in str(info.value)
        with pytest.raises(JournalCorruptError):
            JournalWriter(path)
        assert path.read_bytes() == content


def test_newer_format_version_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "a.journal"
    monkeypatch.setattr(jw, "FORMAT_VERSION", jr.FORMAT_VERSION + 1)  # what the writer writes
    JournalWriter(path).close()
    monkeypatch.undo()
    with pytest.raises(JournalVersionError, match=f"version {jr.FORMAT_VERSION + 1}"):
        read_journal(path)


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.journal"
    with pytest.raises(JournalNotFoundError, match="no journal at") as info:
        read_journal(path)
    assert str(path) in str(info.value) and isinstance(info.value, JournalError)
    with pytest.raises(JournalError, match="directory"):
        read_journal(tmp_path)


def test_errors_pickle(tmp_path: Path) -> None:
    errs: list[JournalError] = [
        JournalCorruptError("p", 12, "bad"), JournalLockedError("p", ("h", 3)),
        JournalNotFoundError("p"), JournalVersionError("p", 9),
    ]
    for err in errs:
        copy = pickle.loads(pickle.dumps(err))
        assert type(copy) is type(err) and str(copy) == str(err)


# ---------------------------------------------------------------------------
# Writer behaviour
# ---------------------------------------------------------------------------


def test_second_writer_refused_same_process(tmp_path: Path) -> None:
    path = tmp_path / "a.journal"
    with JournalWriter(path):
        with pytest.raises(JournalLockedError) as info:
            JournalWriter(path)
        assert str(path) in str(info.value)
        assert info.value.holder is not None and info.value.holder[1] == os.getpid()
        assert f"pid {os.getpid()}" in str(info.value)
        # reading needs no lock
        assert read_journal(path).valid_bytes > 0
    JournalWriter(path).close()  # free again after close


def test_second_writer_refused_other_process(tmp_path: Path) -> None:
    path = tmp_path / "a.journal"
    code = """
        import sys
        from taskfarm._journal import JournalLockedError
        from taskfarm._journal_writer import JournalWriter
        try:
            JournalWriter(sys.argv[1])
        except JournalLockedError as exc:
            print("LOCKED", exc.holder[1])
        else:
            print("GOT THE LOCK")
    """
    with JournalWriter(path):
        proc = run_python(code, str(path))
    assert proc.returncode == 0 and proc.stdout.split() == ["LOCKED", str(os.getpid())], explain(proc)
    proc = run_python(code, str(path))
    assert "GOT THE LOCK" in proc.stdout, explain(proc)


def test_lock_released_after_sigkill(tmp_path: Path) -> None:
    path = tmp_path / "a.journal"
    code = """
        import os, sys
        from taskfarm._journal_writer import JournalWriter
        w = JournalWriter(sys.argv[1])
        w.submitted("k", label="", t=0.0)
        w.sync()
        w.submitted("unsynced", label="", t=0.0)  # dies in the buffer
        print("HOLDING", flush=True)
        os.kill(os.getpid(), 9)
    """
    proc = run_python(code, str(path))
    assert proc.returncode == -signal.SIGKILL and "HOLDING" in proc.stdout, explain(proc)
    with JournalWriter(path) as w:
        w.submitted("k2", label="", t=0.0)
    assert list(read_journal(path).tasks) == ["k", "k2"]


def test_forked_child_cannot_write(tmp_path: Path) -> None:
    path = tmp_path / "a.journal"
    with JournalWriter(path) as w:
        w.submitted("parent", label="", t=0.0)  # still buffered at fork time
        pid = os.fork()
        if pid == 0:  # child: must not write, must not flush the parent's buffer
            code = 0
            try:
                w.submitted("child", label="", t=0.0)
                code = 3
            except JournalError:
                pass
            w.close()
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    assert list(read_journal(path).tasks) == ["parent"]


def test_close_idempotent_and_closed_writer_refuses(tmp_path: Path) -> None:
    path = tmp_path / "a.journal"
    w = JournalWriter(path, fsync=False)
    w.submitted("k", label="", t=0.0)
    w.close()
    w.close()
    with pytest.raises(JournalError, match="closed"):
        w.submitted("k2", label="", t=0.0)
    with pytest.raises(JournalError, match="closed"):
        w.sync()
    assert list(read_journal(path).tasks) == ["k"]


def test_sync_makes_records_visible(tmp_path: Path) -> None:
    path = tmp_path / "a.journal"
    with JournalWriter(path) as w:
        w.submitted("k", label="", t=0.0)
        assert "k" not in read_journal(path).tasks  # still in the buffer
        w.sync()
        assert "k" in read_journal(path).tasks
        assert w.bytes_written == path.stat().st_size


def test_write_failure_truncates_and_breaks_writer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "a.journal"
    w = JournalWriter(path)
    w.submitted("k", label="", t=0.0)
    w.sync()
    good = path.stat().st_size
    real_writev = os.writev

    def half_then_enospc(fd: int, bufs: list[bytes]) -> int:
        os.write(fd, bytes(memoryview(bufs[0])[: max(1, len(bufs[0]) // 2)]))
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "writev", half_then_enospc)
    w.submitted("k2", label="", t=0.0)
    with pytest.raises(JournalError, match="No space left"):
        w.sync()
    monkeypatch.setattr(os, "writev", real_writev)
    assert path.stat().st_size == good  # the half record was cut away
    with pytest.raises(JournalError, match="cannot be written"):
        w.submitted("k3", label="", t=0.0)
    w.close()
    st = read_journal(path)
    assert list(st.tasks) == ["k"] and st.torn_tail_bytes == 0
    JournalWriter(path).close()  # lock released


# ---------------------------------------------------------------------------
# Status
# ---------------------------------------------------------------------------


def _journal(path: Path, outcome: str) -> JournalState:
    with JournalWriter(path) as w:
        w.run_started({"argv": ["x"]})
        for i in range(3):
            w.submitted(f"k{i}", label=f"f({i})", t=0.0)
            w.dispatched(f"k{i}", rank=1, attempt=1, t=1.0)
        w.succeeded("k0", rank=1, attempt=1, t_start=1, t_end=2, result=frame_of(0))
        w.succeeded("k1", rank=1, attempt=1, t_start=1, t_end=2, result=frame_of(1))
        if outcome == "complete":
            w.succeeded("k2", rank=1, attempt=1, t_start=1, t_end=2, result=frame_of(2))
            w.run_ended({"status": "complete", "exit_code": 0})
        elif outcome == "failed":
            w.failed("k2", rank=1, attempt=3, t=3, error=frame_of(KeyError("z")),
                     error_text="Traceback (most recent call last):\n  ...\nKeyError: 'z'",
                     final=True)
            w.run_ended({"status": "complete", "exit_code": 1})
    return read_journal(path)


def test_status_complete(tmp_path: Path) -> None:
    st = _journal(tmp_path / "a.journal", "complete")
    assert st.complete() and status_exit_code(st) == ExitCode.OK.value == 0
    rep = status_report(st)
    json.dumps(rep, allow_nan=False)
    assert rep["counts"] == {PENDING: 0, RUNNING: 0, RETRY: 0, SUCCESS: 3, FAILURE: 0, CANCELLED: 0}
    assert rep["failed"] == [] and rep["exit_code"] == 0 and rep["complete"] is True
    assert rep["per_rank"] == {"1": {"done": 3, "failed": 0, "busy_s": 3.0}}
    assert "complete (exit 0)" in format_status(st)


def test_status_failed(tmp_path: Path) -> None:
    st = _journal(tmp_path / "a.journal", "failed")
    assert status_exit_code(st) == ExitCode.FAILED.value == 1
    rep = status_report(st)
    json.dumps(rep, allow_nan=False)
    assert rep["failed"] == [{"key": "k2", "label": "f(2)", "attempts": 1, "rank": 1,
                              "error_text": "Traceback (most recent call last):\n  ...\nKeyError: 'z'"}]
    text = format_status(st)
    assert "failed tasks (1)" in text and "KeyError: 'z'" in text and "exit 1" in text


def test_status_unfinished(tmp_path: Path) -> None:
    st = _journal(tmp_path / "a.journal", "killed")
    assert not st.complete() and status_exit_code(st) == ExitCode.INCOMPLETE.value == 75
    rep = status_report(st)
    json.dumps(rep, allow_nan=False)
    assert rep["counts"] == {PENDING: 0, RUNNING: 1, RETRY: 0, SUCCESS: 2, FAILURE: 0, CANCELLED: 0}
    assert rep["runs"] == [{"argv": ["x"], "ended": False}]
    assert "did not end" in format_status(st) and "exit 75" in format_status(st)


def test_status_all_done_but_run_not_ended_is_incomplete(tmp_path: Path) -> None:
    path = tmp_path / "a.journal"
    with JournalWriter(path) as w:
        w.run_started({})
        w.submitted("k", label="", t=0.0)
        w.succeeded("k", rank=1, attempt=1, t_start=0, t_end=1, result=frame_of(0))
    st = read_journal(path)
    assert st.complete() and status_exit_code(st) == ExitCode.INCOMPLETE
    empty = tmp_path / "empty.journal"
    JournalWriter(empty).close()
    assert status_exit_code(read_journal(empty)) == ExitCode.INCOMPLETE


def test_status_many_ranks_is_summarised(tmp_path: Path) -> None:
    path = tmp_path / "a.journal"
    with JournalWriter(path, fsync=False) as w:
        for i in range(100):
            w.submitted(f"k{i}", label="", t=0.0)
            w.succeeded(f"k{i}", rank=i, attempt=1, t_start=0, t_end=i, result=frame_of(i))
        w.failed("k0", rank=1, attempt=1, t=0, error=None, error_text="ignored", final=True)
    text = format_status(read_journal(path))
    assert "ranks    100: done min/mean/max 1/1.0/1" in text
    assert len(text.splitlines()) < 10


# ---------------------------------------------------------------------------
# Size
# ---------------------------------------------------------------------------


def test_bytes_per_noop_task(tmp_path: Path) -> None:
    path = tmp_path / "noop.journal"
    tiny = frame_of(None)
    with JournalWriter(path, fsync=False) as w:
        base = w.bytes_written
        for i in range(NOOP_TASKS):
            key = uuid.UUID(int=i).hex  # 32 characters
            w.submitted(key, label=f"noop({i % 1000})", t=1e9 + i)
            w.dispatched(key, rank=1 + i % 64, attempt=1, t=1e9 + i)
            w.succeeded(key, rank=1 + i % 64, attempt=1, t_start=1e9 + i, t_end=1e9 + i,
                        result=tiny)
        per_task = (w.bytes_written - base) / NOOP_TASKS
    assert path.stat().st_size == w.bytes_written
    assert per_task < jr.BYTES_PER_TASK_BOUND, per_task
    st = read_journal(path)
    assert st.complete() and len(st.tasks) == NOOP_TASKS
