"""The fault suite's results log: every case adds a row, written once the session ends.

The rows (what each fault did, with its measured recovery) go to $RDV_FAULT_RESULTS, else
run/faults/results.json; `scripts/reliability_table.py` renders them into docs/reliability.md.
Nothing is written when no fault case ran.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.faults import FaultLog, results_path


@pytest.fixture(scope="session")
def fault_log() -> Iterator[FaultLog]:
    log = FaultLog()
    yield log
    if log.rows:
        path = results_path()
        log.write(path)
        print(f"fault suite: {len(log.rows)} rows written to {path}")
