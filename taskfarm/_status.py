"""A journal's status, for people (`format_status`) and for tools
(`status_report`), and the exit code ``taskfarm status`` gives batch scripts."""

from __future__ import annotations

import math
from collections.abc import Mapping

from ._errors import ExitCode
from ._journal import FAILURE, JournalState

__all__ = ["format_status", "status_exit_code", "status_report"]

#: format_status shows a per-rank table up to this many ranks, else a summary.
MAX_RANK_ROWS = 16
#: format_status lists at most this many failed tasks.
MAX_FAILED_ROWS = 20
#: format_status cuts keys, labels and error lines to this many characters.
MAX_CELL_CHARS = 60



def _last_run_finished(state: JournalState) -> bool:
    """The last run recorded an end and did not say it stopped early."""
    if not state.runs:
        return bool(state.tasks)  # tasks without run records: judge by tasks
    last = state.runs[-1]
    status = last.get("status")
    return last.get("ended") is True and (status is None or status == "complete")


def status_exit_code(state: JournalState) -> int:
    """0 if everything succeeded, 1 if any task failed for good, else 75.

    75 (incomplete) also covers "every recorded task succeeded but the last
    run did not end, or ended with a status other than "complete"", since
    the script may not have submitted everything yet.
    """
    if any(entry.state == FAILURE for entry in state.tasks.values()):
        return int(ExitCode.FAILED)
    if state.complete() and _last_run_finished(state):
        return int(ExitCode.OK)
    return int(ExitCode.INCOMPLETE)


def _jsonable(value: object) -> object:
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return repr(value)


def status_report(state: JournalState) -> dict[str, object]:
    """The journal's status as a JSON-able dict (for ``taskfarm status --json``)."""
    counts = state.counts()
    ntasks = len(state.tasks)
    failed = [
        {
            "key": e.key,
            "label": e.label,
            "error_text": e.error_text,
            "attempts": e.attempts,
            "rank": e.rank,
        }
        for e in state.tasks.values()
        if e.state == FAILURE
    ]
    duplicates = [e.key for e in state.tasks.values() if e.successes > 1]
    return {
        "path": state.path,
        "format_version": state.format_version,
        "created": state.created,
        "host": state.host,
        "tasks": ntasks,
        "counts": counts,
        "complete": state.complete(),
        "exit_code": status_exit_code(state),
        "failed": failed,
        "duplicate_successes": duplicates,
        "per_rank": {str(r): s for r, s in state.per_rank().items()},
        "runs": _jsonable(state.runs),
        "valid_bytes": state.valid_bytes,
        "torn_tail_bytes": state.torn_tail_bytes,
        "bytes_per_task": state.valid_bytes / ntasks if ntasks else None,
    }


def _cut(text: str, width: int = MAX_CELL_CHARS) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def _last_line(text: str | None) -> str:
    lines = [line for line in (text or "").strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else ""


def _table(rows: list[list[str]], right: set[int]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    out = []
    for row in rows:
        cells = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))]
        out.append("  " + "  ".join(cells).rstrip())
    return out


def format_status(state: JournalState) -> str:
    """The status as short, aligned human text (for ``taskfarm status``)."""
    counts = state.counts()
    ntasks = len(state.tasks)
    code = status_exit_code(state)
    verdict = {0: "complete", 1: "failed tasks"}.get(code, "incomplete, resumable")
    lines = [f"journal  {state.path}  ({state.valid_bytes} bytes"]
    if state.torn_tail_bytes:
        lines[0] += f", {state.torn_tail_bytes} torn bytes at the end ignored"
    lines[0] += ")"
    shown = "  ".join(f"{s} {n}" for s, n in counts.items() if n) or "none"
    lines.append(f"tasks    {ntasks}: {shown}")
    if state.runs:
        last = state.runs[-1]
        end = f"ended ({last['status']})" if "status" in last else "ended"
        lines.append(f"runs     {len(state.runs)}; last {end if last.get('ended') else 'did not end'}")
    lines.append(f"status   {verdict} (exit {code})")
    dup = sum(1 for e in state.tasks.values() if e.successes > 1)
    if dup:
        lines.append(f"warning  {dup} tasks have more than one success record (first kept)")
    failed = [e for e in state.tasks.values() if e.state == FAILURE]
    if failed:
        lines.append(f"failed tasks ({len(failed)}):")
        rows = [["key", "label", "attempts", "error"]]
        for e in failed[:MAX_FAILED_ROWS]:
            rows.append([_cut(e.key), _cut(e.label), str(e.attempts), _cut(_last_line(e.error_text))])
        lines.extend(_table(rows, {2}))
        if len(failed) > MAX_FAILED_ROWS:
            lines.append(f"  ... and {len(failed) - MAX_FAILED_ROWS} more")
    ranks = state.per_rank()
    if ranks and len(ranks) <= MAX_RANK_ROWS:
        lines.append("per rank:")
        rows = [["rank", "done", "failed", "busy_s"]]
        for rank, s in ranks.items():
            rows.append([str(rank), str(int(s["done"])), str(int(s["failed"])), f"{s['busy_s']:.1f}"])
        lines.extend(_table(rows, {0, 1, 2, 3}))
    elif ranks:
        done = [s["done"] for s in ranks.values()]
        busy = [s["busy_s"] for s in ranks.values()]
        lines.append(
            f"ranks    {len(ranks)}: done min/mean/max {min(done):.0f}/{sum(done) / len(done):.1f}/"
            f"{max(done):.0f}, busy_s min/mean/max {min(busy):.1f}/"
            f"{sum(busy) / len(busy):.1f}/{max(busy):.1f}"
        )
    return "\n".join(lines)
