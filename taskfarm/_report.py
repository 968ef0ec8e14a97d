"""Human-readable views of a farm's statistics: the end-of-run summary."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def format_summary(stats: Mapping[str, Any]) -> str:
    """A short table: tasks by outcome, wall time, throughput, per-rank counts."""
    wall = float(stats.get("wall_time", 0.0))
    done = int(stats.get("done", 0))
    rate = done / wall if wall > 0 else 0.0
    lines = [
        f"taskfarm: {done} done, {stats.get('failed', 0)} failed, {stats.get('cancelled', 0)} cancelled "
        f"of {stats.get('submitted', 0)} submitted in {wall:.2f} s ({rate:.0f} tasks/s) "
        f"on {stats.get('workers', 0)} worker(s)",
    ]
    extra = [
        f"{name} {stats[name]}"
        for name in ("retried", "resubmitted", "stolen", "zombies", "duplicates")
        if stats.get(name)
    ]
    if stats.get("lost_ranks"):
        extra.append(f"lost ranks {stats['lost_ranks']}")
    if extra:
        lines.append("  " + ", ".join(extra))
    ranks: Mapping[str, Mapping[str, Any]] = stats.get("ranks", {})
    if ranks:
        lines.append("  rank  host              tasks  failed  busy")
        for rank, r in ranks.items():
            busy = float(r.get("busy_time", 0.0)) / wall if wall > 0 else 0.0
            lines.append(
                f"  {rank:>4}  {str(r.get('host', '?'))[:16]:<16}  {r.get('tasks', 0):>5}  "
                f"{r.get('failed', 0):>6}  {busy:5.0%}{'' if r.get('alive', True) else '  LOST'}"
            )
    return "\n".join(lines) + "\n"
