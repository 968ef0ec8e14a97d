"""Entry point of a worker process started by MPI spawn (``FarmExecutor`` without mpiexec)."""

from __future__ import annotations

from ._transport import parent
from ._worker import serve


def main() -> None:
    transport = parent()
    if transport is None:
        raise SystemExit("taskfarm._spawned is started by FarmExecutor through MPI spawn, not by hand")
    try:
        serve(transport)
    finally:
        transport.close()


if __name__ == "__main__":
    main()
