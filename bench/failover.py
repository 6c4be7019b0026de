"""Link loss and gateway crashes between two full stations: `rdv bench failover`
(`python -m bench.failover`).

DESIGN.md's target: link loss -> follower holding <= 500 ms (hold_ms_max).

deploy/demo.conf runs under real supervisord (bench.stations) until the follower tracks; a tap
on the robot's bus records the follower's frames (state on every tick, stamped `t` by the
follower) and the robot gateway's session.status.

hold_ms, `--trials` times: a full link cut while tracking, then the time until the follower
reports `stale` (holding position). The cut (`--cut`):
  iptables  (default when run as root with iptables) one rule drops every UDP packet on the
            loopback interface to or from the two gateways' ICE ports (found from their
            sockets in /proc): the network path dies both ways while every process runs on,
            as when a cable is pulled. The rule carries a comment naming this run and is
            deleted after each trial, and on any exit.
  sigstop   SIGSTOP of the teleop gateway: nothing more reaches the robot from the teleop (a
            hung peer). From the robot's side it is the same silence.
t_cut is taken just before the rule is added (or the signal sent), so hold_ms includes the time
the cut itself took to apply. The cut is held until the robot gateway reports the session
closed (its ping/pong gives the link up after 500 ms; at most `--cut-s`), then lifted; the
stations must re-pair and the follower track again before the next trial. Also printed:
link_lost_ms, cut -> the robot gateway reporting the session closed. The rule names the ports
of the established ICE pair only: a new session picks new ports, so stations that re-pair while
a cut is held would not be blocked (one cannot drop all of a shared machine's loopback UDP).

resume_ms, `--trials` times: SIGKILL of the robot gateway while tracking, until the follower
reports `tracking` again: supervisord restarts the gateway, the teleop notices the lost link,
both session managers end the session and pair anew, WebRTC connects, the follower ramps back
to the leader. Also printed: the hold after the kill.

Everything started is stopped by pid, the iptables rule removed and temp dirs deleted, also on
Ctrl-C, SIGTERM or a failure. Exit status: 0 all trials measured, 1 otherwise, 130 interrupted.
It must never signal a process it did not start, nor drop traffic other than its own gateways'.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import (
    TARGETS,
    BenchError,
    BenchTimeout,
    CpuWindow,
    Run,
    add_output_flags,
    document_tail,
    machine_line,
    ms,
    notes_block,
    percentile,
    rounded,
    verdict,
)
from bench.stations import BusTap, DemoStations, follower_state
from services.bus import MessageFrame

RESERVE_S = 8.0  # of --budget, kept for stopping everything
WAIT_S = 20.0  # a re-pair or a state change that takes longer than this is a failure
LOOPBACK_HEX = "0100007F"  # 127.0.0.1 as /proc/net/udp prints it


# --- cutting the link ------------------------------------------------------------------------


def udp_ports(pid: int) -> list[int]:
    """The 127.0.0.1 UDP ports a process has open (its ICE sockets), from /proc."""
    inodes = set()
    with contextlib.suppress(OSError):
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
    ports = []
    with contextlib.suppress(OSError):
        for line in Path("/proc/net/udp").read_text().splitlines()[1:]:
            fields = line.split()
            address, port = fields[1].split(":")
            if fields[9] in inodes and address == LOOPBACK_HEX:
                ports.append(int(port, 16))
    return sorted(ports)


class IptablesCut:
    """One DROP rule on the loopback interface for a set of UDP ports, removed on exit."""

    def __init__(self, tag: str) -> None:
        self.binary = shutil.which("iptables") or "/usr/sbin/iptables"
        self.tag = tag
        self.rule: list[str] | None = None

    @staticmethod
    def available() -> bool:
        binary = shutil.which("iptables") or "/usr/sbin/iptables"
        if os.geteuid() != 0 or not os.access(binary, os.X_OK):
            return False
        probe = subprocess.run(
            [binary, "-w", "5", "-S", "INPUT"], capture_output=True, timeout=10, check=False
        )
        return probe.returncode == 0

    def _run(self, action: str, rule: list[str]) -> None:
        result = subprocess.run(
            [self.binary, "-w", "5", action, "INPUT", *rule],
            capture_output=True, text=True, timeout=10, check=False,
        )  # fmt: skip
        if result.returncode != 0:
            raise BenchError(f"iptables {action} failed: {result.stderr.strip()}")

    def cut(self, ports: list[int]) -> None:
        if not ports or len(ports) > 15:  # multiport takes at most 15 ports
            raise BenchError(f"cannot cut: gateway ICE ports {ports}")
        rule = ["-i", "lo", "-p", "udp", "-m", "multiport", "--ports", ",".join(map(str, ports))]
        rule += ["-m", "comment", "--comment", self.tag, "-j", "DROP"]
        self._run("-I", rule)
        self.rule = rule

    def restore(self) -> None:
        if self.rule is not None:
            rule, self.rule = self.rule, None
            self._run("-D", rule)


# --- trials ----------------------------------------------------------------------------------


@dataclass
class HoldTrial:
    hold_ms: float
    link_lost_ms: float | None
    cut_apply_ms: float  # how long adding the rule (or sending the signal) took
    ports: list[int]


@dataclass
class ResumeTrial:
    resume_ms: float
    hold_ms: float | None
    first_command_ms: float | None  # kill -> the new session's first command on the robot bus


def robot_closed(since_ns: int):
    def check(seen: Any) -> bool:
        return (
            seen.side == "robot"
            and isinstance(seen.frame, MessageFrame)
            and seen.frame.fields.get("event") == "closed"
            and seen.recv_ns >= since_ns
        )

    return check


def state_after(state: str, since_ns: int):
    base = follower_state("robot", state)
    return lambda seen: base(seen) and seen.frame.t >= since_ns


def wait_tracking(tap: BusTap, timeout_s: float) -> None:
    """Tracking now (a fresh frame says so), whatever happened before."""
    if tap.wait_for(state_after("tracking", time.time_ns()), timeout_s) is None:
        raise BenchTimeout("the follower did not track again")


def hold_trial(
    stations: DemoStations, tap: BusTap, method: str, cutter: IptablesCut | None, cut_s: float
) -> HoldTrial:
    wait_tracking(tap, WAIT_S)
    station = stations.station
    gateways = {name: station.pid(name) for name in ("robot_gateway", "teleop_gateway")}
    ports = sorted({p for pid in gateways.values() for p in udp_ports(pid)})
    mark = tap.mark()
    stopped = None
    t_cut = time.time_ns()
    try:
        if method == "iptables":
            assert cutter is not None
            cutter.cut(ports)
        else:
            stopped = gateways["teleop_gateway"]
            os.kill(stopped, signal.SIGSTOP)
        applied_ns = time.time_ns()
        held = tap.wait_for(state_after("stale", t_cut), WAIT_S, mark)
        if held is None:
            raise BenchTimeout("the follower did not hold after the link was cut")
        # Held until the robot gateway gives the link up (or --cut-s): the session then ends.
        left_s = max(0.0, cut_s - (time.time_ns() - t_cut) / 1e9)
        closed = tap.wait_for(robot_closed(t_cut), left_s, mark)
    finally:
        if cutter is not None:
            cutter.restore()
        if stopped is not None:
            os.kill(stopped, signal.SIGCONT)
    return HoldTrial(
        hold_ms=rounded((held.frame.t - t_cut) / 1e6),
        link_lost_ms=None if closed is None else rounded((closed.recv_ns - t_cut) / 1e6),
        cut_apply_ms=rounded((applied_ns - t_cut) / 1e6),
        ports=ports,
    )


def resume_trial(stations: DemoStations, tap: BusTap) -> ResumeTrial:
    wait_tracking(tap, WAIT_S)
    station = stations.station
    pid = station.pid("robot_gateway")
    mark = tap.mark()
    t_kill = time.time_ns()
    os.kill(pid, signal.SIGKILL)
    held = tap.wait_for(state_after("stale", t_kill), WAIT_S, mark)
    if held is None:
        raise BenchTimeout("the follower did not hold after the gateway SIGKILL")
    # Tracking frames right after the kill are the old session's last (the deadman has 250 ms).
    back = tap.wait_for(state_after("tracking", held.frame.t), WAIT_S, mark)
    if back is None:
        raise BenchTimeout("the follower did not track again after the gateway SIGKILL")
    first = tap.wait_for(
        lambda seen: seen.topic == "joints.command" and seen.recv_ns > held.frame.t, 0.0, mark
    )
    station.wait_for_new_pid("robot_gateway", pid, WAIT_S)  # remembered for stop()'s check
    return ResumeTrial(
        resume_ms=rounded((back.frame.t - t_kill) / 1e6),
        hold_ms=rounded((held.frame.t - t_kill) / 1e6),
        first_command_ms=None if first is None else rounded((first.recv_ns - t_kill) / 1e6),
    )


# --- report ----------------------------------------------------------------------------------


@dataclass
class Report:
    args: argparse.Namespace
    method: str = ""
    machine: dict[str, Any] = field(default_factory=dict)
    holds: list[HoldTrial] = field(default_factory=list)
    resumes: list[ResumeTrial] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    def figures(self) -> dict[str, float | None]:
        holds = [t.hold_ms for t in self.holds]
        resumes = [t.resume_ms for t in self.resumes]
        return {
            "hold_ms_max": rounded(max(holds)) if holds else None,
            "resume_ms_p50": rounded(percentile(resumes, 50)) if resumes else None,
            "resume_ms_max": rounded(max(resumes)) if resumes else None,
        }


def render(report: Report) -> str:
    f = report.figures()
    target = TARGETS["hold_ms_max"]
    lines = [
        f"rdv failover benchmark: link cut ({report.method}) -> follower holding, robot gateway "
        f"SIGKILL -> tracking again; {report.args.trials} trials each",
        machine_line(report.machine),
        "",
        f"{'trial':>6}{'hold ms':>10}{'link lost ms':>14}{'cut applied ms':>16}"
        f"{'resume ms':>12}{'first command ms':>18}{'hold after kill ms':>20}",
    ]
    for i in range(max(len(report.holds), len(report.resumes))):
        h = report.holds[i] if i < len(report.holds) else None
        r = report.resumes[i] if i < len(report.resumes) else None
        lines.append(
            f"{i + 1:>6}{ms(h and h.hold_ms, 1):>10}{ms(h and h.link_lost_ms, 1):>14}"
            f"{ms(h and h.cut_apply_ms, 1):>16}{ms(r and r.resume_ms, 0):>12}"
            f"{ms(r and r.first_command_ms, 0):>18}{ms(r and r.hold_ms, 1):>20}"
        )
    busy = (report.details.get("cpu") or {}).get("machine_busy")
    lines += [
        "",
        f"hold_ms_max {ms(f['hold_ms_max'], 1)} (target <= {target:g} ms: "
        f"{verdict(f['hold_ms_max'], target)}); resume_ms p50 {ms(f['resume_ms_p50'], 0)}, max "
        f"{ms(f['resume_ms_max'], 0)}; machine CPU "
        f"{'-' if busy is None else f'{busy * 100:.0f}%'} busy over the trials",
        "",
    ]
    cut = (
        "an iptables DROP of every loopback UDP packet to or from the two gateways' ICE ports "
        "(both directions; all processes keep running)"
        if report.method == "iptables"
        else "SIGSTOP of the teleop gateway (a hung peer: the robot hears nothing more)"
    )
    lines += notes_block(
        [
            f"Link cut: {cut}, held until the robot gateway gave the link up, then lifted; hold = "
            "cut -> the "
            "follower's first frame in state stale (its deadman, 250 ms without a command); "
            "link lost = cut -> the robot gateway reporting the session closed (ping/pong, "
            "500 ms).",
            "Resume: SIGKILL of the robot gateway -> the follower's first frame in state "
            "tracking again (supervisord restart, re-pairing, WebRTC, ramp back to the leader); "
            "first command = kill -> the new session's first command on the robot's bus (the "
            "rest is the ramp).",
        ]
    )
    lines += [f"ERROR: {error}" for error in report.errors]
    return "\n".join(lines)


def document(report: Report) -> dict[str, Any]:
    return {
        "bench": "failover",
        "rdv": report.figures(),
        "cut": report.method,
        "trials": {
            "hold": [t.__dict__ for t in report.holds],
            "resume": [t.__dict__ for t in report.resumes],
        },
        "target": {"hold_ms_max": TARGETS["hold_ms_max"]},
        **document_tail(report.machine, report.details, report.errors),
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rdv bench failover",
        description="Full link cut -> follower holding (hold_ms), and robot gateway SIGKILL -> "
        "tracking again (resume_ms), between two full rdv stations (deploy/demo.conf).",
    )
    parser.add_argument(
        "--trials", type=int, default=5, help="trials of each kind (default: %(default)s)"
    )
    parser.add_argument(
        "--cut",
        choices=("auto", "iptables", "sigstop"),
        default="auto",
        help="how the link is cut: iptables drops the gateways' loopback UDP (needs root), "
        "sigstop freezes the teleop gateway; auto: iptables when usable, else sigstop "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--cut-s",
        type=float,
        default=1.5,
        help="longest a cut is held; it is lifted as soon as the robot gateway gives the link "
        "up (500 ms ping/pong) (default: %(default)s)",
    )
    add_output_flags(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.trials < 1 or args.cut_s <= 0 or args.budget < RESERVE_S + 10:
        parser.error(f"--trials >= 1, --cut-s > 0 and --budget >= {RESERVE_S + 10:g}")
    report = Report(args)
    cutter = None
    with Run(args, RESERVE_S) as run:
        report.machine, report.errors = run.machine, run.errors
        report.method = args.cut
        if args.cut == "auto":
            report.method = "iptables" if IptablesCut.available() else "sigstop"
        if report.method == "iptables":
            cutter = IptablesCut(f"rdv-bench-failover-{os.getpid()}")
        stations = DemoStations(rate_hz=100.0)
        try:
            run.log("starting deploy/demo.conf (broker, robot and teleop stations)")
            stations.start(timeout_s=max(5.0, min(40.0, run.budget.left())))
            topics = ["joints.follower", "joints.command", "session.status"]
            with BusTap({"robot": (stations.bus("robot"), topics)}) as tap:
                tracking = follower_state("robot", "tracking")
                if tap.wait_for(tracking, run.budget.left(), start=0) is None:
                    raise BenchTimeout("the stations never paired (follower never tracking)")
                cpu = CpuWindow()
                for index in range(args.trials):
                    run.budget.check(f"hold trial {index + 1} not run")
                    trial = hold_trial(stations, tap, report.method, cutter, args.cut_s)
                    report.holds.append(trial)
                    run.log(f"link cut {index + 1}: holding after {trial.hold_ms:.1f} ms")
                for index in range(args.trials):
                    run.budget.check(f"resume trial {index + 1} not run")
                    resumed = resume_trial(stations, tap)
                    report.resumes.append(resumed)
                    run.log(f"gateway SIGKILL {index + 1}: tracking again after "
                            f"{resumed.resume_ms:.0f} ms")  # fmt: skip
                report.details["cpu"] = cpu.result()
        finally:
            if cutter is not None:
                with contextlib.suppress(BenchError):
                    cutter.restore()
            run.log("stopping the stations")
            stations.stop()
    complete = len(report.holds) == len(report.resumes) == args.trials
    return run.finish(render(report), document(report), args.json, complete)


if __name__ == "__main__":
    sys.exit(main())
