"""What every `rdv bench` shares: the machine print-out, percentiles, the table/--json output
contract, progress lines and the time budget.

Output contract (issue 7): a readable table on stdout by default; with `--json` the table goes
to stderr and stdout's last line is one JSON object. Latencies are in milliseconds. This module
must never start or stop a process; the benches do that themselves.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import traceback
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

# DESIGN.md, "Performance targets" (ms unless said otherwise).
TARGETS = {
    "control_p50_ms": 1.5,
    "control_p99_ms": 3.0,
    "setup_p50_ms": 1000.0,
    "hold_ms_max": 500.0,
    "discover_ms": 2000.0,
    "video_p50_ms": 25.0,
    "video_p99_ms": 45.0,
}
LIBRARIES = ("pyzmq", "msgpack", "aiortc", "aioice", "av", "paho-mqtt", "supervisor", "numpy")


class BenchError(RuntimeError):
    """The run cannot give a figure (a process failed, a check failed)."""


class BenchTimeout(BenchError):
    """Something did not happen in time, or the budget ran out."""


def library_versions(names: Iterable[str] = LIBRARIES) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    with contextlib.suppress(ImportError):
        import zmq

        out["libzmq"] = zmq.zmq_version()
    return out


def mosquitto_version() -> str | None:
    binary = shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if os.access(p, os.X_OK)),
        None,
    )
    if binary is None:
        return None
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        # `mosquitto -h` prints "mosquitto version X" and exits 3.
        text = subprocess.run(
            [binary, "-h"], capture_output=True, text=True, timeout=5, check=False
        ).stdout
        found = re.search(r"mosquitto version (\S+)", text)
        return found.group(1) if found else None
    return None


def busy_share() -> float | None:
    """Share of the machine's CPU time spent busy over the next 0.5 s (0..1), from two /proc/stat
    reads: how loaded the machine is right now, other users included."""

    first = _cpu_times()
    time.sleep(0.5)
    second = _cpu_times()
    if first is None or second is None or second[0] == first[0]:
        return None
    total, idle = second[0] - first[0], second[1] - first[1]
    return round(1 - idle / total, 3)


def machine_info(mosquitto: str | None = None) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu": cpu,
        "os": platform.platform(terse=True),
        "python": platform.python_version(),
        "libraries": library_versions(),
        "mosquitto": mosquitto if mosquitto is not None else mosquitto_version(),
        "loadavg_1m_at_start": round(os.getloadavg()[0], 2),
        "cpu_busy_at_start": busy_share(),
    }


def machine_line(machine: dict[str, Any]) -> str:
    libs = machine.get("libraries") or {}
    shown = ", ".join(f"{name} {version}" for name, version in libs.items() if version)
    busy = machine.get("cpu_busy_at_start")
    busy_text = "" if busy is None else f", CPU {busy * 100:.0f}% busy"
    return textwrap.fill(
        f"machine: {machine.get('cores')} cores ({machine.get('cpu')}), {machine.get('os')}, "
        f"Python {machine.get('python')}, {shown}, Mosquitto {machine.get('mosquitto')}; "
        f"load {machine.get('loadavg_1m_at_start')}{busy_text} at start",
        100,
        subsequent_indent="  ",
    )


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) by linear interpolation between closest ranks."""
    if not values:
        raise ValueError("no values")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def rounded(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


def ms(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def verdict(value: float | None, target: float) -> str:
    if value is None:
        return ""
    return "met" if value <= target else "MISSED"


class Progress:
    """Progress lines on stderr with the time since the start (stdout is for the results)."""

    def __init__(self) -> None:
        self.start = time.monotonic()

    def __call__(self, message: str) -> None:
        print(f"[{time.monotonic() - self.start:6.1f} s] {message}", file=sys.stderr, flush=True)

    def elapsed(self) -> float:
        return time.monotonic() - self.start


class Budget:
    """The wall-clock bound of a run; `reserve_s` of it is kept for stopping everything."""

    def __init__(self, total_s: float, reserve_s: float) -> None:
        self.deadline = time.monotonic() + total_s - reserve_s

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def check(self, what: str) -> None:
        if self.left() <= 0:
            raise BenchTimeout(f"{what}: the --budget was used up")


def raise_keyboard_interrupt_on_term() -> None:
    """SIGTERM and SIGINT both stop a bench through its cleanup (also when started with SIGINT
    ignored, as `cmd &` does)."""

    def interrupt(_signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGINT, interrupt)


def emit(table: str, document: dict[str, Any], as_json: bool) -> None:
    """The output contract: the table on stdout, or with --json the table on stderr and the
    JSON object as stdout's last line."""
    if as_json:
        print(table, file=sys.stderr, flush=True)
        print(json.dumps(document, allow_nan=False), flush=True)
    else:
        print(table, flush=True)


def notes_block(notes: Iterable[str]) -> list[str]:
    return [textwrap.fill(note, 100, subsequent_indent="  ") for note in notes]


def _cpu_times() -> tuple[int, int] | None:
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except (OSError, IndexError):
        return None
    values = [int(v) for v in fields]
    return sum(values), values[3] + (values[4] if len(values) > 4 else 0)


def process_cpu_ticks(pid: int) -> int | None:
    """utime + stime of one process, in clock ticks (None when it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[11]) + int(fields[12])


class CpuWindow:
    """CPU use over a measuring window: the whole machine's busy share (other users included)
    and, per named process, its share of one core."""

    def __init__(self, pids: dict[str, int] | None = None) -> None:
        self.pids = pids or {}
        self._machine = _cpu_times()
        self._procs = {name: process_cpu_ticks(pid) for name, pid in self.pids.items()}
        self._start = time.monotonic()

    def result(self) -> dict[str, Any]:
        elapsed = time.monotonic() - self._start
        machine = _cpu_times()
        busy = None
        if self._machine is not None and machine is not None and machine[0] > self._machine[0]:
            total, idle = machine[0] - self._machine[0], machine[1] - self._machine[1]
            busy = round(1 - idle / total, 3)
        ticks_per_s = os.sysconf("SC_CLK_TCK")
        procs: dict[str, float | None] = {}
        for name, pid in self.pids.items():
            before, after = self._procs.get(name), process_cpu_ticks(pid)
            procs[name] = (
                None
                if before is None or after is None or elapsed <= 0
                else round(100 * (after - before) / ticks_per_s / elapsed, 1)
            )
        return {"machine_busy": busy, "process_cpu_pct": procs}


def add_output_flags(parser: argparse.ArgumentParser, budget_s: float = 60.0) -> None:
    """--json and --budget, the same for every bench."""
    parser.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object as the last line of stdout (table: stderr) (default: off)",
    )
    parser.add_argument(
        "--budget",
        type=float,
        default=budget_s,
        help="seconds the whole run may take, cleanup included (default: %(default)s)",
    )


class Run:
    """A bench's main() around its measuring: SIGTERM/Ctrl-C through the cleanup, the machine
    print-out, the budget, errors collected rather than raised, and the exit status.

        with Run(args, reserve_s) as run:
            try: ...measure...
            finally: ...stop what was started...
        return run.finish(table, document, args.json, complete)
    """

    def __init__(self, args: argparse.Namespace, reserve_s: float) -> None:
        raise_keyboard_interrupt_on_term()
        self.log = Progress()
        self.budget = Budget(args.budget, reserve_s)
        self.machine: dict[str, Any] = {}
        self.errors: list[str] = []
        self.interrupted = False

    def __enter__(self) -> Run:
        self.machine.update(machine_info())
        self.log(machine_line(self.machine))
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 _tb: object) -> bool:  # fmt: skip
        if kind is None:
            return False
        if issubclass(kind, BenchError):
            self.errors.append(str(exc))
            self.log(f"failed: {exc}")
        elif issubclass(kind, KeyboardInterrupt):
            self.interrupted = True
            self.errors.append("interrupted")
        elif issubclass(kind, Exception):  # a bug: still cleaned up and reported; say so
            self.errors.append(f"{kind.__name__}: {exc}")
            self.log("".join(traceback.format_exception(kind, exc, _tb)))  # type: ignore[arg-type]
        else:
            return False
        return True

    def finish(self, table: str, document: dict[str, Any], as_json: bool, complete: bool) -> int:
        """Print the results; exit status 0 all measured, 1 something missing, 130 interrupted."""
        if not self.machine:
            self.machine.update(machine_info())
        emit(table, document, as_json)
        if self.interrupted:
            return 130
        return 0 if not self.errors and complete else 1


def document_tail(machine: dict[str, Any], details: dict[str, Any], errors: list[str]) -> dict:
    """The keys every bench's JSON ends with."""
    return {"machine": machine, "details": details, "ok": not errors, "errors": errors}
