"""The real worker with a fault in its store's writes, for the reliability tests (docs/reliability.md).

`python tests/fault_worker.py` runs `runwatch worker` after wrapping `ClickHouseStore.write` as
RUNWATCH_TEST_FAULT says; production code has no fault hooks:

- `crash-after-insert:N` exits the process right after its N-th write, before the offsets are committed;
- `fail-after-insert:N` fails the N-th write once after its inserts were made, before the commit;
- `clickhouse-down-while:PATH` refuses every write as a lost connection while PATH exists.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path


def install(fault: str) -> None:
    from runwatch.sinks.store import ClickHouseStore

    kind, _, arg = fault.partition(":")
    write = ClickHouseStore.write
    calls = {"n": 0}
    log = logging.getLogger("runwatch.sink")

    def faulty(self, batch):
        if kind == "clickhouse-down-while" and Path(arg).exists():
            raise ConnectionError("ClickHouse is unavailable (injected by RUNWATCH_TEST_FAULT)")
        write(self, batch)
        calls["n"] += 1
        if kind == "fail-after-insert" and calls["n"] == int(arg):
            raise RuntimeError("failing after a chunk's inserts, before its commit (injected by RUNWATCH_TEST_FAULT)")
        if kind == "crash-after-insert" and calls["n"] >= int(arg):
            log.error("runwatch sink: crashing after an insert, before its offset commit (RUNWATCH_TEST_FAULT)")
            os._exit(137)

    if kind not in ("clickhouse-down-while", "fail-after-insert", "crash-after-insert"):
        raise SystemExit(f"fault_worker: unknown RUNWATCH_TEST_FAULT {fault!r}")
    ClickHouseStore.write = faulty


if __name__ == "__main__":
    install(os.environ.get("RUNWATCH_TEST_FAULT", ""))
    from runwatch.cli import main

    sys.argv = ["runwatch", "worker"]
    main()
