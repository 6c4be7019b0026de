"""Fault injection on a running demo (deploy/demo.conf) and what the tests measure of recovery.

`inject()` breaks one program of a healthy demo while a `BusRecorder` watches both buses, waits
until the demo has recovered (program running, both session managers live in one session, the
follower tracking again), and returns a `Recovery`: the timeline judged afterwards (when the
follower held, when it tracked again, the largest goal step, commands applied out of order).
`FaultLog` collects one row per fault for docs/reliability.md (scripts/reliability_table.py).

Times come from the test's clock: frames are stamped when they arrive here, faults when the
signal is sent. Only processes of the demo's own supervisord are signalled, by pid; a paused
process is always continued, even when the test fails.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import json
import os
import platform
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pytest

from services.bus import FollowerFrame
from services.bus.config import REPO_ROOT
from tests.support.arm_checks import (
    commands_out_of_order,
    max_goal_step_per_run,
    max_reengage_step,
)
from tests.support.broker import (
    MqttConnectError,
    close_client,
    mqtt_client,
    received,
    subscribe,
)
from tests.support.recorder import BusRecorder
from tests.support.station import Station

RESULTS_ENV = "RDV_FAULT_RESULTS"
HOLDING = ("stale", "waiting", "estop")
GAP_NS = 200_000_000  # no follower frame for 20 ticks: the follower was not running (a
# restart takes far longer; a loaded machine can stall a process for a few ticks)
STEADY_S = 1.0  # tracking this long, unbroken, counts as "tracking again"


@dataclass
class Recovery:
    """What one fault did, judged from the recorded timeline. Times in s after the fault."""

    fault_ns: int
    resume_ns: int  # when the fault ended: the kill itself, or SIGCONT after a pause
    session_before: str | None
    session_after: str | None = None
    restarted_s: float | None = None  # killed: supervisord spawned it again (a new pid)
    hold_s: float | None = None  # first `stale` follower frame (None: never held)
    hold_after_last_command_s: float | None = None  # same, from the last command applied
    interrupted: bool = False  # the follower stopped tracking at some point
    tracking_s: float | None = None  # start of the final unbroken tracking run
    session_s: float | None = None  # both session managers live in the final session
    max_step_ratio: float = 0.0  # largest goal step / (max_step per tick); <= 1 is safe
    out_of_order: list[tuple[int, int]] = field(default_factory=list)  # applied cmd seqs
    ramp_ratio: float = 0.0  # largest goal step while ramping / ramp_step per tick
    states: list[str] = field(default_factory=list)  # follower states in order, deduplicated

    @property
    def tracking_after_resume_s(self) -> float | None:
        if self.tracking_s is None:
            return None
        return max(0.0, self.tracking_s - (self.resume_ns - self.fault_ns) / 1e9)


def wait_healthy(
    demo: Station,
    recorder: BusRecorder,
    timeout_s: float,
    running: Callable[[], bool] | None = None,
) -> str:
    """Wait until `running()` (default: every program of `demo` runs), both stations are live
    in one session and the follower has tracked for STEADY_S; return that session id."""
    if running is None:

        def running() -> bool:
            return all(i["statename"] == "RUNNING" for i in demo.programs().values())

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        session = recorder.session(since_ns=time.time_ns() - 1_500_000_000)
        if session and running() and recorder.tracking_since(STEADY_S) is not None:
            return session
        time.sleep(0.2)
    raise AssertionError(
        f"demo not healthy within {timeout_s} s: session {recorder.session()}, "
        f"states {_states(recorder.followers(time.time_ns() - 3_000_000_000))}\n"
        f"{demo.status_text()}"
    )


def inject(
    demo: Station,
    recorder: BusRecorder,
    program: str,
    how: str,
    *,
    pause_s: float = 3.0,
    timeout_s: float = 60.0,
) -> Recovery:
    """SIGKILL (`how="kill"`) or SIGSTOP for pause_s then SIGCONT (`how="pause"`) `program`,
    then wait for recovery and judge it."""
    session_before = wait_healthy(demo, recorder, timeout_s)
    pid = int(demo.programs()[program]["pid"])
    assert pid > 0, f"{program} has no pid"
    fault_ns = time.time_ns()
    if how == "kill":
        os.kill(pid, signal.SIGKILL)
        resume_ns = fault_ns
    elif how == "pause":
        os.kill(pid, signal.SIGSTOP)
        try:
            time.sleep(pause_s)
        finally:
            resume_ns = time.time_ns()
            os.kill(pid, signal.SIGCONT)
    else:
        raise ValueError(how)
    recovery = Recovery(fault_ns, resume_ns, session_before)

    def back() -> bool:
        info = demo.programs()[program]
        new_pid = int(info["pid"]) not in (0, pid)
        if how == "kill" and new_pid and recovery.restarted_s is None:
            recovery.restarted_s = (time.time_ns() - fault_ns) / 1e9
        running = info["statename"] == "RUNNING"
        return running and (new_pid if how == "kill" else int(info["pid"]) == pid)

    wait_recovered(demo, recorder, recovery, back, timeout_s)
    judge(recorder, recovery)
    return recovery


def wait_recovered(
    demo: Station,
    recorder: BusRecorder,
    recovery: Recovery,
    program_ok: Callable[[], bool],
    timeout_s: float,
) -> None:
    """Poll until program_ok() (it may note when the program came back in `recovery`), a live
    session (health sent after the fault ended) and steady tracking. Fails with the demo's state
    on time-out."""
    deadline = time.monotonic() + timeout_s
    program_back = False
    while time.monotonic() < deadline:
        program_back = program_back or program_ok()
        if (
            program_back
            and recorder.session(since_ns=recovery.resume_ns) is not None
            and recorder.tracking_since(STEADY_S) is not None
        ):
            return
        time.sleep(0.1)
    frames = recorder.followers(recovery.fault_ns)
    raise AssertionError(
        f"no recovery within {timeout_s} s: program back {program_back}, "
        f"session {recorder.session(since_ns=recovery.resume_ns)}, "
        f"follower states {_states(frames)}\n{demo.status_text()}\n{demo.logs()}"
    )


def judge(recorder: BusRecorder, recovery: Recovery) -> None:
    """Fill in the timeline figures of `recovery` from what the recorder saw."""
    fault_ns = recovery.fault_ns
    timeline = recorder.followers(fault_ns - 2_000_000_000)
    frames = [frame for _, frame in timeline]
    after = [(t, f) for t, f in timeline if t >= fault_ns]
    recovery.states = _states(after)
    recovery.max_step_ratio = max_goal_step_per_run(frames)
    recovery.out_of_order = commands_out_of_order(frames)
    recovery.ramp_ratio = max_reengage_step(frames)

    first_hold = next(((t, f) for t, f in after if f.state in HOLDING), None)
    if first_hold is not None:
        recovery.hold_s = (first_hold[0] - fault_ns) / 1e9
        last_command = _last_command_before(timeline, first_hold[0])
        if last_command is not None:
            recovery.hold_after_last_command_s = (first_hold[0] - last_command) / 1e9
    gaps = any(b[0] - a[0] > GAP_NS for a, b in itertools.pairwise(after))
    recovery.interrupted = gaps or any(f.state != "tracking" for _, f in after)
    steady = recorder.tracking_since(STEADY_S)
    if recovery.interrupted and steady is not None:
        recovery.tracking_s = max(0.0, (steady - fault_ns) / 1e9)
    elif not recovery.interrupted:
        recovery.tracking_s = 0.0

    recovery.session_after = recorder.session()
    recovery.session_s = _session_since(recorder, recovery)


def _last_command_before(timeline: list[tuple[int, FollowerFrame]], until_ns: int) -> int | None:
    """When the follower last applied a new command before `until_ns` (its frame's arrival)."""
    last = None
    previous = None
    for recv_ns, frame in timeline:
        if recv_ns >= until_ns:
            break
        if previous is not None and frame.cmd_seq != previous.cmd_seq:
            last = recv_ns
        previous = frame
    return last


def _session_since(recorder: BusRecorder, recovery: Recovery) -> float | None:
    """Seconds from the fault until both session managers said `live` in the final session and
    kept saying it; 0.0 when the session never changed and never stopped being live. Health
    beats come once a second, so this is late by up to a second."""
    final = recovery.session_after
    if final is None:
        return None
    beats = recorder.health_since(recovery.fault_ns, "session_manager")
    bad = [
        b.recv_ns
        for b in beats
        if (b.fields.get("state"), b.fields.get("session")) != ("live", final)
    ]
    if not bad and final == recovery.session_before:
        return 0.0
    cut = max(bad, default=recovery.fault_ns)
    back: dict[str, int] = {}
    for beat in beats:
        if beat.recv_ns > cut:
            back.setdefault(beat.station, beat.recv_ns)
    if len(back) < 2:
        return None
    return (max(back.values()) - recovery.fault_ns) / 1e9


def _states(frames: list[tuple[int, FollowerFrame]]) -> list[str]:
    out: list[str] = []
    for _, frame in frames:
        if not out or out[-1] != frame.state:
            out.append(frame.state)
    return out


# --- results ---------------------------------------------------------------------------------

FIGURES = (
    "hold_s",  # fault -> follower holding
    "restarted_s",  # fault -> program RUNNING again (new pid) or resumed
    "session_s",  # fault -> both session managers live in the final session
    "tracking_s",  # fault -> follower tracking again (0: never stopped)
    "presence_s",  # broker back -> both stations' retained presence online again
    "max_step_ratio",  # largest goal step / max_step per tick over the whole fault
)


@dataclass
class FaultRow:
    """One line of docs/reliability.md: a fault, what the system did, and the figures."""

    fault: str
    target: str
    behaviour: str = "did not recover (see the test's failure)"
    figures: dict[str, float | None] = field(default_factory=dict)
    test: str = ""
    passed: bool | None = None

    def measured(self, recovery: Recovery, **more: float | None) -> None:
        """Take the figures and a behaviour sentence from a judged recovery."""
        self.figures = {
            "hold_s": recovery.hold_s,
            "restarted_s": recovery.restarted_s,
            "session_s": recovery.session_s,
            "tracking_s": recovery.tracking_s,
            "max_step_ratio": round(recovery.max_step_ratio, 3),
            **more,
        }
        self.behaviour = describe(recovery)


def describe(recovery: Recovery) -> str:
    """What the system did, in words, from the timeline (no figure is made up here)."""
    parts = []
    if not recovery.interrupted:
        parts.append("control never stopped: the follower kept tracking")
    elif recovery.hold_s is not None:
        parts.append("follower held, then ramped back to the leader")
    else:
        parts.append("follower restarted from where the arm is and ramped to the leader")
    if recovery.session_after == recovery.session_before:
        parts.append("same session throughout")
    else:
        parts.append("session ended and re-paired")
    if recovery.resume_ns != recovery.fault_ns and recovery.tracking_s:
        after = recovery.tracking_after_resume_s or 0.0
        parts.append(f"tracking {after:.1f} s after SIGCONT")
    return "; ".join(parts)


class FaultLog:
    """Rows of one test session, written as JSON for scripts/reliability_table.py."""

    def __init__(self) -> None:
        self.rows: list[FaultRow] = []
        self.started = time.strftime("%Y-%m-%d %H:%M:%S %z")
        self.load_at_start = os.getloadavg()

    @contextlib.contextmanager
    def case(self, fault: str, target: str, test: str) -> Iterator[FaultRow]:
        """A row for one fault, recorded whether the assertions in the block pass or not."""
        row = FaultRow(fault, target, test=test)
        try:
            yield row
            row.passed = True
        except BaseException:
            row.passed = False
            raise
        finally:
            self.rows.append(row)
            figures = ", ".join(f"{k} {v}" for k, v in row.figures.items() if v is not None)
            print(f"fault: {fault} / {target}: {row.behaviour} ({figures}) passed={row.passed}")

    def write(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        document = {
            "machine": machine(self.started, self.load_at_start),
            "rows": [asdict(row) for row in self.rows],
        }
        path.write_text(json.dumps(document, indent=1) + "\n")


def results_path() -> Path:
    """Where the suite writes its rows: $RDV_FAULT_RESULTS, else run/faults/results.json."""
    return Path(os.environ.get(RESULTS_ENV) or REPO_ROOT / "run" / "faults" / "results.json")


def machine(started: str, load_at_start: tuple[float, float, float]) -> dict[str, Any]:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "started": started,
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "load_at_start": [round(x, 2) for x in load_at_start],
        "load_at_end": [round(x, 2) for x in os.getloadavg()],
    }


# --- presence ---------------------------------------------------------------------------------


def retained_presence(
    url: str,
    owner: str,
    stations: set[str],
    username: str | None = None,
    password: str | None = None,
) -> dict[str, dict[str, Any]]:
    """The retained presence of `stations` on the broker right now, as a fresh subscriber gets
    it ({} while the broker does not answer). Waits at most 2 s for them to arrive."""
    try:
        client = mqtt_client(url, username, password, protocol=5, timeout_s=2.0)
    except (OSError, MqttConnectError):
        return {}
    try:
        subscribe(client, f"rdv/v1/{owner}/+/presence", timeout_s=2.0)
        deadline = time.monotonic() + 2.0
        found: dict[str, dict[str, Any]] = {}
        while time.monotonic() < deadline and set(found) != stations:
            for message in received(client):
                station = message.topic.split("/")[3]
                if station in stations and message.payload:
                    found[station] = json.loads(message.payload)
            time.sleep(0.05)
        return found
    except (OSError, TimeoutError, ValueError):
        return {}
    finally:
        close_client(client)


def wait_presence_restored(
    url: str,
    owner: str,
    robot: str,
    teleop: str,
    session: str | None,
    timeout_s: float,
    **credentials: str | None,
) -> dict[str, dict[str, Any]]:
    """Wait until both stations' retained presence says online and, when `session` is given,
    both busy in it; returns the presence seen. Fails with the last presence on time-out."""
    deadline = time.monotonic() + timeout_s
    found: dict[str, dict[str, Any]] = {}
    while time.monotonic() < deadline:
        found = retained_presence(url, owner, {robot, teleop}, **credentials)
        online = len(found) == 2 and all(p.get("status") == "online" for p in found.values())
        in_session = session is None or all(
            p.get("busy") and p.get("session") == session for p in found.values()
        )
        if online and in_session:
            return found
        time.sleep(0.2)
    raise AssertionError(f"presence not restored within {timeout_s} s: {found}")


# --- file systems -----------------------------------------------------------------------------


@contextlib.contextmanager
def mounted(target: Path, *mounts: list[str]) -> Iterator[None]:
    """`mount ARGS... TARGET` for each of `mounts`, in turn, for the block: a small tmpfs (disk
    full) or a read-only bind of the directory onto itself (unwritable). Unmounted afterwards,
    lazily if something still holds it. Skips the test, saying why, where the kernel does not
    let this process mount."""
    tools = "/usr/bin:/bin:/usr/sbin:/sbin"
    mount = shutil.which("mount", path=tools) or "mount"
    umount = shutil.which("umount", path=tools) or "umount"
    stacked = 0
    try:
        for args in mounts:
            result = subprocess.run(
                [mount, *args, str(target)], capture_output=True, text=True, timeout=30
            )
            if result.returncode != 0:
                pytest.skip(f"cannot mount here (needs root, CAP_SYS_ADMIN): {result.stderr}")
            stacked += "remount" not in ",".join(args)
        yield
    finally:
        for _ in range(stacked):
            if subprocess.run([umount, str(target)], capture_output=True, timeout=30).returncode:
                subprocess.run([umount, "-l", str(target)], capture_output=True, timeout=30)


def read_only(target: Path) -> contextlib.AbstractContextManager[None]:
    """`target` with what it holds, but read-only: bound onto itself, remounted ro."""
    return mounted(target, ["--bind", str(target)], ["-o", "remount,bind,ro"])


def small_tmpfs(target: Path, size: str) -> contextlib.AbstractContextManager[None]:
    return mounted(target, ["-t", "tmpfs", "-o", f"size={size}", "tmpfs"])


def fill(directory: Path) -> Path:
    """Write a file in `directory` until the file system is full; returns the file."""
    filler = directory / "filler"
    chunk = b"\0" * 65536
    with open(filler, "wb") as out:
        try:
            while True:
                out.write(chunk)
                out.flush()
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
    return filler
