"""taskfarm.slurm with fake environments and fake Slurm clients: no Slurm needed."""

from __future__ import annotations

import os
import stat
import sys
import time
from pathlib import Path

import pytest

from taskfarm import slurm
from taskfarm.slurm import Allocation, array_slice, parse_slice

JOB_ENV = {
    "SLURM_JOB_ID": "4242",
    "SLURM_NTASKS": "8",
    "SLURM_JOB_NUM_NODES": "2",
    "SLURM_JOB_NODELIST": "node[01-02]",
    "SLURM_CPUS_PER_TASK": "2",
}
END_EPOCH = 1_900_000_000
LOCAL_END = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(END_EPOCH))
FAKE_TOOL_TIMEOUT_S = 0.5


def fake_tool(bin_dir: Path, name: str, body: str) -> None:
    """Write a Python script called ``name`` into ``bin_dir`` that runs ``body``."""
    path = bin_dir / name
    path.write_text(f"#!{sys.executable}\nimport sys, time\n{body}\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


@pytest.fixture
def fake_bin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A PATH holding only the fake Slurm clients a test writes."""
    if sys.platform == "win32":
        pytest.skip("fake clients are shebang scripts")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", str(bin_dir))
    monkeypatch.setattr(slurm, "QUERY_TIMEOUT_S", FAKE_TOOL_TIMEOUT_S)
    return bin_dir


# ---- from_environ: the variables -----------------------------------------------------------------


def test_outside_slurm_is_none() -> None:
    assert Allocation.from_environ({}) is None
    assert Allocation.from_environ({"SLURM_NTASKS": "4", "PATH": "/bin"}) is None
    assert Allocation.from_environ({"SLURM_JOB_ID": "  "}) is None


def test_reads_job_variables() -> None:
    alloc = Allocation.from_environ(JOB_ENV, query_end_time=False)
    assert alloc == Allocation(
        job_id="4242",
        array_job_id=None,
        array_task_id=None,
        array_task_count=None,
        ntasks=8,
        nnodes=2,
        nodelist="node[01-02]",
        cpus_per_task=2,
        end_time=None,
    )


def test_old_variable_names() -> None:
    env = {"SLURM_JOBID": "7", "SLURM_NPROCS": "3", "SLURM_NNODES": "1", "SLURM_NODELIST": "n1"}
    alloc = Allocation.from_environ(env, query_end_time=False)
    assert alloc is not None
    assert (alloc.job_id, alloc.ntasks, alloc.nnodes, alloc.nodelist) == ("7", 3, 1, "n1")


def test_array_variables() -> None:
    env = {
        "SLURM_JOB_ID": "101",
        "SLURM_ARRAY_JOB_ID": "100",
        "SLURM_ARRAY_TASK_ID": "1",
        "SLURM_ARRAY_TASK_COUNT": "4",
    }
    alloc = Allocation.from_environ(env, query_end_time=False)
    assert alloc is not None
    assert (alloc.array_job_id, alloc.array_task_id, alloc.array_task_count) == ("100", 1, 4)


def test_garbage_numbers_are_none() -> None:
    env = {"SLURM_JOB_ID": "5", "SLURM_NTASKS": "lots", "SLURM_CPUS_PER_TASK": ""}
    alloc = Allocation.from_environ(env, query_end_time=False)
    assert alloc is not None
    assert alloc.ntasks is None
    assert alloc.cpus_per_task is None


def test_defaults_to_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("SLURM_"):
            monkeypatch.delenv(name)
    assert Allocation.from_environ() is None
    monkeypatch.setenv("SLURM_JOB_ID", "99")
    monkeypatch.setenv("SLURM_JOB_END_TIME", str(END_EPOCH))
    alloc = Allocation.from_environ()
    assert alloc is not None
    assert alloc.job_id == "99"
    assert alloc.end_time == END_EPOCH


# ---- end time --------------------------------------------------------------------------------------


def test_end_time_from_variable_asks_nobody(fake_bin: Path) -> None:
    fake_tool(fake_bin, "squeue", "sys.exit('must not be called')")
    alloc = Allocation.from_environ({**JOB_ENV, "SLURM_JOB_END_TIME": str(END_EPOCH)})
    assert alloc is not None
    assert alloc.end_time == END_EPOCH


@pytest.mark.parametrize("value", ["0", "-5", "soon", "nan", "inf", ""])
def test_bad_end_time_variable_is_ignored(value: str) -> None:
    alloc = Allocation.from_environ({**JOB_ENV, "SLURM_JOB_END_TIME": value}, query_end_time=False)
    assert alloc is not None
    assert alloc.end_time is None


def test_end_time_from_squeue(fake_bin: Path, tmp_path: Path) -> None:
    argv_log = tmp_path / "argv"
    fake_tool(
        fake_bin,
        "squeue",
        f"open({str(argv_log)!r}, 'w').write(' '.join(sys.argv[1:]))\n"
        "import os; assert os.environ['SLURM_TIME_FORMAT'] == 'standard'\n"
        f"print({LOCAL_END + '|1:00:00'!r})",
    )
    alloc = Allocation.from_environ(JOB_ENV)
    assert alloc is not None
    assert alloc.end_time == END_EPOCH
    assert "-j 4242" in argv_log.read_text()


def test_end_time_from_scontrol_when_squeue_fails(fake_bin: Path) -> None:
    fake_tool(fake_bin, "squeue", "sys.exit(1)")
    record = (
        f"JobId=4242 JobName=x UserId=me(1) JobState=RUNNING TimeLimit=00:10:00 "
        f"SubmitTime=2026-01-01T00:00:00 StartTime=2026-01-01T00:00:01 EndTime={LOCAL_END} "
        "Deadline=N/A Command=/a/b.sh"
    )
    fake_tool(fake_bin, "scontrol", f"print({record!r})")
    alloc = Allocation.from_environ(JOB_ENV)
    assert alloc is not None
    assert alloc.end_time == END_EPOCH


@pytest.mark.parametrize(
    "squeue_out",
    ["Unknown|1:00:00", "N/A|1:00:00", "NONE|30:00", f"{LOCAL_END}|UNLIMITED", "", "garbage"],
)
def test_unknown_end_time_is_none(fake_bin: Path, squeue_out: str) -> None:
    fake_tool(fake_bin, "squeue", f"print({squeue_out!r})")
    fake_tool(fake_bin, "scontrol", "print('JobId=4242 EndTime=Unknown TimeLimit=UNLIMITED')")
    alloc = Allocation.from_environ(JOB_ENV)
    assert alloc is not None
    assert alloc.end_time is None


def test_unlimited_job_in_scontrol_is_none(fake_bin: Path) -> None:
    fake_tool(fake_bin, "scontrol", f"print('JobId=4242 TimeLimit=UNLIMITED EndTime={LOCAL_END}')")
    alloc = Allocation.from_environ(JOB_ENV)
    assert alloc is not None
    assert alloc.end_time is None


def test_no_slurm_clients_is_none(fake_bin: Path) -> None:
    alloc = Allocation.from_environ(JOB_ENV)
    assert alloc is not None
    assert alloc.end_time is None


def test_hanging_clients_time_out(fake_bin: Path) -> None:
    fake_tool(fake_bin, "squeue", "time.sleep(60)")
    fake_tool(fake_bin, "scontrol", "time.sleep(60)")
    started = time.monotonic()
    alloc = Allocation.from_environ(JOB_ENV)
    took = time.monotonic() - started
    assert alloc is not None
    assert alloc.end_time is None
    assert took < 2 * FAKE_TOOL_TIMEOUT_S + 5


def test_query_end_time_false_runs_nothing(fake_bin: Path, tmp_path: Path) -> None:
    marker = tmp_path / "called"
    fake_tool(fake_bin, "squeue", f"open({str(marker)!r}, 'w').close()")
    alloc = Allocation.from_environ(JOB_ENV, query_end_time=False)
    assert alloc is not None
    assert alloc.end_time is None
    assert not marker.exists()


def test_seconds_left() -> None:
    alloc = Allocation.from_environ({**JOB_ENV, "SLURM_JOB_END_TIME": "1000"})
    assert alloc is not None
    assert alloc.seconds_left(now=400.0) == 600.0
    assert alloc.seconds_left(now=1500.0) == 0.0
    unknown = Allocation.from_environ(JOB_ENV, query_end_time=False)
    assert unknown is not None
    assert unknown.seconds_left(now=0.0) is None
    future = Allocation.from_environ({**JOB_ENV, "SLURM_JOB_END_TIME": str(time.time() + 100)})
    assert future is not None
    left = future.seconds_left()
    assert left is not None
    assert 90 < left <= 100


# ---- array_slice and parse_slice ---------------------------------------------------------------------


ITEM_COUNTS = [*range(40), 97, 100, 1000, 1001]
TASK_COUNTS = [1, 2, 3, 4, 5, 7, 8, 10, 16, 33, 100]


def test_array_slice_covers_each_item_once() -> None:
    for n_items in ITEM_COUNTS:
        for task_count in TASK_COUNTS:
            slices = [array_slice(n_items, i, task_count) for i in range(task_count)]
            flat = [item for piece in slices for item in piece]
            # contiguous, ordered, no gap, no overlap
            assert flat == list(range(n_items)), (n_items, task_count)
            lengths = [len(piece) for piece in slices]
            assert max(lengths) - min(lengths) <= 1, (n_items, task_count)
            assert all(piece.step == 1 for piece in slices)


def test_array_slice_examples() -> None:
    assert array_slice(10, 0, 3) == range(4)
    assert array_slice(10, 1, 3) == range(4, 7)
    assert array_slice(10, 2, 3) == range(7, 10)
    assert array_slice(2, 3, 5) == range(2, 2)


@pytest.mark.parametrize(("n", "i", "k"), [(-1, 0, 1), (5, 0, 0), (5, -1, 2), (5, 2, 2)])
def test_array_slice_rejects_bad_arguments(n: int, i: int, k: int) -> None:
    with pytest.raises(ValueError):
        array_slice(n, i, k)


def test_parse_slice() -> None:
    assert parse_slice("0/4") == (0, 4)
    assert parse_slice(" 3 / 4 ") == (3, 4)
    for bad in ["4/4", "1/0", "-1/3", "a/b", "1", "1/2/3", ""]:
        with pytest.raises(ValueError):
            parse_slice(bad)
