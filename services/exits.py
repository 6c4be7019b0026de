"""Exit codes shared by every rdv service, and what makes a configuration error final.

deploy/*.conf list `exitcodes=78` with `autorestart=unexpected`, meaning a process that exits
78 (EX_CONFIG: it cannot work as configured) stays down with its message in the log. But
supervisord only judges the exit code of a process that has been up for `startsecs` (1 s in
deploy/*.conf); one that exits sooner "exited too quickly" and is retried with a growing backoff,
twenty times over three and a half minutes, whatever its code. A configuration error is found
in well under a second, so `final()` keeps the process up until it is past startsecs before
exiting 78. It does so only under supervisord (SUPERVISOR_ENABLED in the environment), so a
user at a shell sees the error at once. It must never delay any other exit code.
"""

from __future__ import annotations

import os
import time

EXIT_CONFIG = 78  # sysexits.h EX_CONFIG
SUPERVISOR_STARTSECS_S = 1.0  # `startsecs` in every program of deploy/*.conf
MARGIN_S = 0.5  # supervisord notices an exit on its next tick; stay clearly past startsecs


def uptime_s() -> float | None:
    """Seconds since this process started (supervisord's clock starts at the same spawn)."""
    try:
        with open("/proc/self/stat") as stat:
            # Fields after the command name (which may hold spaces); starttime is field 22.
            start_ticks = int(stat.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as uptime:
            system_up_s = float(uptime.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return system_up_s - start_ticks / os.sysconf("SC_CLK_TCK")


def final(code: int) -> int:
    """`code`, after lingering past supervisord's startsecs when it is a configuration error
    and supervisord runs this process, so that supervisord takes 78 as final."""
    if code != EXIT_CONFIG or not os.environ.get("SUPERVISOR_ENABLED"):
        return code
    up_s = uptime_s()
    wait_s = SUPERVISOR_STARTSECS_S + MARGIN_S - (0.0 if up_s is None else up_s)
    if wait_s > 0:
        time.sleep(wait_s)
    return code
