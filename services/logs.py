"""Logging set-up shared by every rdv process: one line per event, process name first.

supervisord captures stderr into the run dir; timestamps are included so those files read on
their own. Must never log per-frame: hot paths rate-limit their own warnings.
"""

from __future__ import annotations

import logging


def setup_logging(level: str, process: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format=f"%(asctime)s {process} %(levelname)s %(message)s",
        force=True,
    )
