"""Every example job in jobs/ under mpiexec, checked on its structured output; task files end to end."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
from conftest import MPI, ROOT, farm_run, read_json, run

JOBS = ROOT / "jobs"


def test_every_job_is_tested_here() -> None:
    """A new job in jobs/ needs a test in this file."""
    tested = {"pi.py", "skewed.py", "sweep.py", "dag.py", "monitor.py", "flaky.py", "commands.txt", "primes.sh"}
    present = {p.name for p in JOBS.iterdir() if p.suffix in (".py", ".txt", ".sh") and p.name != "__init__.py"}
    assert present == tested


@pytest.mark.mpi
def test_pi(mpi: MPI, tmp_path: Path) -> None:
    out = tmp_path / "pi.json"
    farm_run(mpi, 3, ["run", "-q", str(JOBS / "pi.py"), "--tasks", "40", "--darts", "200000", "--json", str(out)])
    r = read_json(out)
    assert r["darts"] == 40 * 200_000
    assert r["estimate"] == pytest.approx(4 * r["hits"] / r["darts"])
    assert abs(r["estimate"] - math.pi) < 0.005  # ~9 standard errors


@pytest.mark.mpi
def test_pi_is_the_same_on_any_number_of_ranks(mpich: MPI, tmp_path: Path) -> None:
    hits = []
    for n in (2, 4):
        out = tmp_path / f"pi{n}.json"
        farm_run(mpich, n, ["run", "-q", str(JOBS / "pi.py"), "--tasks", "12", "--darts", "10000", "--json", str(out)])
        hits.append(read_json(out)["hits"])
    assert hits[0] == hits[1]


@pytest.mark.mpi
def test_skewed(mpich: MPI, tmp_path: Path) -> None:
    out = tmp_path / "skewed.json"
    farm_run(mpich, 4, ["run", "-q", str(JOBS / "skewed.py"), "--tasks", "60", "--scale", "0.002", "--json", str(out)])
    r = read_json(out)
    assert r["workers"] == 3
    assert r["work"] > 0 and r["bound"] >= r["work"] / 3
    assert r["makespan"] >= 0.95 * r["bound"]  # nobody beats the lower bound (sleep may wake early by a hair)


@pytest.mark.mpi
def test_sweep_writes_one_result_file(mpich: MPI, tmp_path: Path) -> None:
    result = tmp_path / "sweep.csv"
    summary = tmp_path / "sweep.json"
    args = ["--out", str(result), "--trajectories", "64", "--steps", "2000", "--json", str(summary)]
    farm_run(mpich, 4, ["run", "-q", str(JOBS / "sweep.py"), *args])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sweep.csv", "sweep.json"]  # no leftovers
    with open(result) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 61
    r = [float(row["r"]) for row in rows]
    assert r == sorted(r) and r[0] == 2.5 and r[-1] == 4.0
    lam = {round(float(row["r"]), 4): float(row["lyapunov"]) for row in rows}
    assert lam[2.5] == pytest.approx(math.log(0.5), abs=1e-6)  # stable fixed point
    assert lam[3.2] == pytest.approx(0.5 * math.log(0.16), abs=1e-6)  # period-2 orbit
    assert lam[4.0] == pytest.approx(math.log(2), abs=0.01)  # fully chaotic
    assert read_json(summary)["chaos_onset"] == 3.575  # first grid point past r = 3.5699...
    assert all(lam[x] < 0 for x in lam if x < 3.56)


@pytest.mark.mpi
def test_commands_task_file(mpich: MPI, tmp_path: Path) -> None:
    run_dir, stats, journal = tmp_path / "run", tmp_path / "stats.json", tmp_path / "journal"
    farm_run(
        mpich,
        4,
        ["run", "-q", "--tasks", str(JOBS / "commands.txt"), "--run-dir", str(run_dir),
         "--stats-json", str(stats), "--journal", str(journal)],
    )
    lines = [(run_dir / "logs" / "000" / f"{i:06d}.out").read_text().strip() for i in range(10)]
    counts = [int(line.split(": ")[1].split()[0]) for line in lines]
    assert sum(counts) == 9592  # primes below 100,000
    assert counts[0] == 1229 and lines[3].startswith("slice 3 [30000, 39999]")
    s = read_json(stats)
    assert (s["done"], s["failed"], s["submitted"]) == (10, 0, 10)


@pytest.mark.mpi
def test_dag(mpi: MPI, tmp_path: Path) -> None:
    out = tmp_path / "dag.json"
    farm_run(mpi, 3, ["run", "-q", str(JOBS / "dag.py"), "--chunks", "8", "--size", "50000", "--check",
                      "--json", str(out)])
    r = read_json(out)
    assert r["count"] == 8 * 50_000
    assert r["mean"] == pytest.approx(r["serial_mean"], rel=1e-12)  # the chord's merge is exact
    assert r["std"] == pytest.approx(r["serial_std"], rel=1e-9)
    assert r["mean"] == pytest.approx(3.0, abs=0.02) and r["std"] == pytest.approx(2.0, abs=0.02)
    assert r["q50"] == pytest.approx(3.0, abs=0.05)
    assert r["q5"] == pytest.approx(3.0 - 1.6449 * 2, abs=0.06)
    assert r["q95"] == pytest.approx(3.0 + 1.6449 * 2, abs=0.06)


@pytest.mark.mpi
def test_monitor(mpich: MPI, tmp_path: Path) -> None:
    out = tmp_path / "monitor.json"
    res = farm_run(mpich, 4, ["run", "-q", str(JOBS / "monitor.py"), "--tasks", "30", "--seconds", "0.1",
                              "--interval", "0.3", "--json", str(out)], timeout=60)
    r = read_json(out)
    assert r["final"] == r["tasks"] == 30 and r["batch_failed"] == 0
    reports = r["reports"]
    assert len(reports) >= 1 and reports == sorted(reports) and reports[-1] <= 30
    assert r["runs"] - 1 <= len(reports) <= r["runs"]  # the last run may have been cancelled unsent
    assert r["report_times"] == sorted(r["report_times"])
    assert "parts written" in res.stdout


@pytest.mark.mpi
def test_flaky(mpich: MPI, tmp_path: Path) -> None:
    out = tmp_path / "flaky.json"
    farm_run(mpich, 3, ["run", "-q", str(JOBS / "flaky.py"), "--tasks", "12", "--every", "3",
                        "--workdir", str(tmp_path / "markers"), "--json", str(out)])
    r = read_json(out)
    assert r["retried_tasks"] == [0, 3, 6, 9] and r["retried"] == 4 and r["failed"] == 0
    assert [x["value"] for x in r["results"]] == [i * i for i in range(12)]
    assert [x["attempts"] for x in r["results"]] == [2 if i % 3 == 0 else 1 for i in range(12)]


# -- task files end to end -------------------------------------------------------------
def status(mpi: MPI, journal: Path) -> dict[str, object]:
    res = run([mpi.python, "-m", "taskfarm", "status", "--json", str(journal)], timeout=30, env=mpi.env())
    report: dict[str, object] = json.loads(res.stdout)
    report["exit_code_cli"] = res.returncode
    return report


@pytest.mark.mpi
def test_task_file_with_a_failing_command(mpi: MPI, tmp_path: Path) -> None:
    tasks = tmp_path / "tasks.txt"
    tasks.write_text(
        "echo first {i}\n"
        "echo about to fail >&2; echo partial; exit 3\n"
        "# a comment\n"
        "echo third {i}\n"
        "echo fourth {n} of {ntasks}\n"
    )
    run_dir, stats, journal = tmp_path / "run", tmp_path / "stats.json", tmp_path / "journal"
    res = farm_run(
        mpi,
        3,
        ["run", "--tasks", str(tasks), "--run-dir", str(run_dir), "--stats-json", str(stats),
         "--journal", str(journal)],
        check=1,
    )
    assert "line 2" in res.stderr and "failed" in res.stderr  # the failed command is named
    logs = run_dir / "logs" / "000"
    assert (logs / "000000.out").read_text() == "first 0\n"
    assert (logs / "000001.out").read_text() == "partial\n"
    assert "about to fail" in (logs / "000001.err").read_text()
    assert (logs / "000002.out").read_text() == "third 2\n"
    assert (logs / "000003.out").read_text() == "fourth 4 of 4\n"
    s = read_json(stats)
    assert (s["submitted"], s["done"], s["failed"], s["exit_code"]) == (4, 3, 1, 1)
    st = status(mpi, journal)
    assert st["counts"]["SUCCESS"] == 3 and st["counts"]["FAILURE"] == 1  # type: ignore[index]
    assert st["exit_code_cli"] == 1
    (failed,) = st["failed"]  # type: ignore[misc]
    assert "line 2" in failed["label"] and "3" in failed["error_text"]


@pytest.mark.mpi
def test_malformed_task_file_exits_2_before_anything_runs(mpich: MPI, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    tasks = tmp_path / "bad.txt"
    tasks.write_text(f"touch {marker}\n#TASKFARM env OMP_NUM_THREADS=2\ntouch {marker}2\n\n#TASKFARM chdir /tmp\n")
    run_dir = tmp_path / "run"
    res = farm_run(mpich, 3, ["run", "--tasks", str(tasks), "--run-dir", str(run_dir)], check=2, timeout=60)
    assert f"{tasks}:5:" in res.stderr and "chdir" in res.stderr
    assert not marker.exists() and not (tmp_path / "ran2").exists()
    assert not run_dir.exists()  # not even the run directory was made


@pytest.mark.mpi
def test_task_file_placeholders_cwd_and_env(mpich: MPI, tmp_path: Path) -> None:
    work = tmp_path / "work"
    for n in (1, 2, 3):
        (work / f"d{n}").mkdir(parents=True)
    tasks = tmp_path / "tasks.txt"
    tasks.write_text(
        f"#TASKFARM cwd {work}/d{{n}}\n"
        "#TASKFARM env TAG=t{i:02d}\n"
        "#TASKFARM env GREETING=hello world\n"
        'echo "$TAG|{i}|{n}|{line}|{ntasks}|$TASKFARM_TASK_INDEX|$GREETING|$(pwd)" > out.txt\n'
        'echo "$TAG|{i}|{n}|{line}|{ntasks}|$TASKFARM_TASK_INDEX|$GREETING|$(pwd)" > out.txt\n'
        "#TASKFARM reset\n"
        f'echo "${{TAG:-unset}}|$(pwd)|{{{{i}}}}" > {tmp_path}/after.txt\n'
    )
    farm_run(mpich, 3, ["run", "-q", "--tasks", str(tasks), "--run-dir", str(tmp_path / "run")])
    assert (work / "d1" / "out.txt").read_text() == f"t00|0|1|4|3|0|hello world|{work}/d1\n"
    assert (work / "d2" / "out.txt").read_text() == f"t01|1|2|5|3|1|hello world|{work}/d2\n"
    assert (tmp_path / "after.txt").read_text() == f"unset|{ROOT}|{{i}}\n"  # start directory, no env
