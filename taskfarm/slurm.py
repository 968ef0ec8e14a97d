"""What a farm needs to know about the Slurm allocation it runs in.

`Allocation.from_environ` reads the ``SLURM_*`` variables that Slurm sets in a
batch job (or an ``salloc`` shell) and, unless told not to, asks Slurm when the
job's time limit runs out so that the farm can start draining before it is
killed.  `array_slice` splits a task list between the elements of a job array.

Nothing here needs Slurm to be installed: outside a job `from_environ` returns
``None``, and a missing or hanging ``squeue``/``scontrol`` only leaves
``end_time`` unknown.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

__all__ = [
    "QUERY_TIMEOUT_S",
    "Allocation",
    "array_slice",
    "parse_slice",
    "query_job_end_time",
]

#: seconds each ``squeue``/``scontrol`` call may take before it is killed
QUERY_TIMEOUT_S = 3.0

#: environment variables, newest name first; Slurm keeps the old ones as aliases
_JOB_ID_VARS = ("SLURM_JOB_ID", "SLURM_JOBID")
_NTASKS_VARS = ("SLURM_NTASKS", "SLURM_NPROCS")
_NNODES_VARS = ("SLURM_JOB_NUM_NODES", "SLURM_NNODES")
_NODELIST_VARS = ("SLURM_JOB_NODELIST", "SLURM_NODELIST")
_ARRAY_JOB_ID_VAR = "SLURM_ARRAY_JOB_ID"
_ARRAY_TASK_ID_VAR = "SLURM_ARRAY_TASK_ID"
_ARRAY_TASK_COUNT_VAR = "SLURM_ARRAY_TASK_COUNT"
_CPUS_PER_TASK_VAR = "SLURM_CPUS_PER_TASK"
#: set by Slurm 23.02 and later: the job's end time in epoch seconds
_END_TIME_VAR = "SLURM_JOB_END_TIME"

#: Slurm's words for "no such time" in date and time-limit fields
_NO_TIME_WORDS = frozenset({"", "unknown", "none", "n/a", "not_set", "(null)"})
_UNLIMITED_WORDS = frozenset({"unlimited", "infinite"})
#: the ISO-like format Slurm prints dates in when ``SLURM_TIME_FORMAT=standard``
_SLURM_DATE_FORMAT = "%Y-%m-%dT%H:%M:%S"
_SLURM_DATE_RE = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}$")
_SQUEUE_FIELD_SEP = "|"


@dataclass(frozen=True)
class Allocation:
    """The Slurm job this process runs in, as far as the environment and Slurm tell.

    Every field is ``None`` when unknown.  ``end_time`` is the epoch time at
    which the job's time limit runs out (``None`` for an unlimited job or when
    Slurm could not be asked).
    """

    job_id: str | None
    array_job_id: str | None
    array_task_id: int | None
    array_task_count: int | None
    ntasks: int | None
    nnodes: int | None
    nodelist: str | None
    cpus_per_task: int | None
    end_time: float | None

    @classmethod
    def from_environ(
        cls,
        environ: Mapping[str, str] | None = None,
        *,
        query_end_time: bool = True,
    ) -> Allocation | None:
        """Describe the current Slurm job, or return ``None`` outside of one.

        ``environ`` defaults to `os.environ`.  The end time comes from
        ``SLURM_JOB_END_TIME`` when Slurm sets it; otherwise, if
        ``query_end_time`` is true, from ``squeue`` and then ``scontrol``, each
        given `QUERY_TIMEOUT_S` seconds.  Those are looked up on the real
        ``PATH``; their failure leaves ``end_time`` as ``None`` and never raises.
        """
        env = os.environ if environ is None else environ
        job_id = _first(env, _JOB_ID_VARS)
        if job_id is None:
            return None
        end_time = _epoch(env.get(_END_TIME_VAR))
        if end_time is None and query_end_time:
            end_time = query_job_end_time(job_id)
        return cls(
            job_id=job_id,
            array_job_id=_text(env.get(_ARRAY_JOB_ID_VAR)),
            array_task_id=_int(env.get(_ARRAY_TASK_ID_VAR)),
            array_task_count=_int(env.get(_ARRAY_TASK_COUNT_VAR)),
            ntasks=_int(_first(env, _NTASKS_VARS)),
            nnodes=_int(_first(env, _NNODES_VARS)),
            nodelist=_first(env, _NODELIST_VARS),
            cpus_per_task=_int(env.get(_CPUS_PER_TASK_VAR)),
            end_time=end_time,
        )

    def seconds_left(self, now: float | None = None) -> float | None:
        """Seconds until the time limit (0.0 once it has passed), or ``None`` if unknown."""
        if self.end_time is None:
            return None
        current = time.time() if now is None else now
        return max(0.0, self.end_time - current)


def array_slice(n_items: int, task_id: int, task_count: int) -> range:
    """The indices of ``n_items`` tasks that element ``task_id`` of ``task_count`` takes.

    Slices are contiguous and in order, cover every index exactly once, and
    differ in length by at most one (the first ``n_items % task_count`` are one
    longer).  With more elements than items some slices are empty.
    """
    if n_items < 0:
        raise ValueError(f"n_items must be >= 0, got {n_items}")
    if task_count < 1:
        raise ValueError(f"task_count must be >= 1, got {task_count}")
    if not 0 <= task_id < task_count:
        raise ValueError(f"task_id must be in [0, {task_count}), got {task_id}")
    base, extra = divmod(n_items, task_count)
    start = task_id * base + min(task_id, extra)
    stop = start + base + (1 if task_id < extra else 0)
    return range(start, stop)


def parse_slice(spec: str) -> tuple[int, int]:
    """Parse ``"I/K"`` (slice I of K, 0-based) as in ``--slice``; raise `ValueError` if bad."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", spec)
    if match is None:
        raise ValueError(f"expected I/K with 0 <= I < K, got {spec!r}")
    index, count = int(match.group(1)), int(match.group(2))
    if count < 1 or index >= count:
        raise ValueError(f"expected I/K with 0 <= I < K, got {spec!r}")
    return index, count


def query_job_end_time(job_id: str) -> float | None:
    """Ask Slurm when job ``job_id`` hits its time limit; ``None`` if unlimited or unknown."""
    out = _run(["squeue", "-h", "-j", job_id, "-o", f"%e{_SQUEUE_FIELD_SEP}%l"])
    if out is not None:
        lines = [line for line in out.splitlines() if line.strip()]
        if len(lines) == 1 and lines[0].count(_SQUEUE_FIELD_SEP) == 1:
            end, limit = lines[0].split(_SQUEUE_FIELD_SEP)
            return _end_time_or_none(end, limit)
    out = _run(["scontrol", "-o", "show", "job", job_id])
    if out is not None:
        fields = _scontrol_fields(out)
        if "EndTime" in fields:
            return _end_time_or_none(fields["EndTime"], fields.get("TimeLimit", ""))
    return None


# ---- helpers ----------------------------------------------------------------------------------


def _run(argv: Sequence[str]) -> str | None:
    """Run a Slurm client; its stdout, or ``None`` if missing, failing or too slow."""
    exe = shutil.which(argv[0])
    if exe is None:
        return None
    env = dict(os.environ)
    env["SLURM_TIME_FORMAT"] = "standard"  # ISO dates whatever the user configured
    try:
        proc = subprocess.run(
            [exe, *argv[1:]],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=QUERY_TIMEOUT_S,
            env=env,
            check=False,
        )
    except (OSError, subprocess.SubprocessError, ValueError):
        return None
    if proc.returncode != 0:
        return None
    return proc.stdout


def _scontrol_fields(text: str) -> dict[str, str]:
    """``Key=Value`` pairs of the first record of ``scontrol -o show job``."""
    first = next((line for line in text.splitlines() if line.strip()), "")
    fields: dict[str, str] = {}
    for word in first.split():
        key, sep, value = word.partition("=")
        if sep and key not in fields:
            fields[key] = value
    return fields


def _end_time_or_none(end: str, limit: str) -> float | None:
    """The epoch end time, unless the limit says the job has none."""
    if limit.strip().lower() in _UNLIMITED_WORDS:
        return None
    return _parse_slurm_date(end)


def _parse_slurm_date(value: str) -> float | None:
    """Slurm's local ``YYYY-MM-DDTHH:MM:SS`` (or epoch seconds) as epoch seconds."""
    text = value.strip()
    if text.lower() in _NO_TIME_WORDS:
        return None
    if _SLURM_DATE_RE.match(text):
        try:
            return time.mktime(time.strptime(text, _SLURM_DATE_FORMAT))
        except (ValueError, OverflowError):
            return None
    return _epoch(text)


def _epoch(value: str | None) -> float | None:
    """A positive, finite epoch number, else ``None``."""
    if value is None:
        return None
    try:
        seconds = float(value.strip())
    except ValueError:
        return None
    if not math.isfinite(seconds) or seconds <= 0:
        return None
    return seconds


def _first(env: Mapping[str, str], names: Sequence[str]) -> str | None:
    for name in names:
        value = _text(env.get(name))
        if value is not None:
            return value
    return None


def _text(value: str | None) -> str | None:
    if value is None:
        return None
    stripped = value.strip()
    return stripped or None


def _int(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        return int(value.strip())
    except ValueError:
        return None
