"""Session setup, both stations online -> first command applied: `rdv bench setup`
(`python -m bench.session_setup`).

DESIGN.md's target: session setup <= 1 s (p50).

deploy/demo.conf runs under real supervisord (bench.stations: Mosquitto on a free port, robot
and teleop stations with sim arms) until the follower tracks. Then, `--sessions` times, a new
session is forced the way a station that goes away and comes back forces one: both session
managers are stopped (a clean stop: each publishes `offline` and ends its session, so the
gateways close their peers and the follower's deadman holds), and started again at the same
moment through supervisord's XML-RPC. The gateways and arms keep running, as they do when a
station's session manager restarts.

setup_ms runs from "both stations online" = the later of the two stations' first `online`
presence after the restart, by the `ts` each station stamped on it (its own wall clock, the
same clock as the bus frames on one machine), to the first `joints.command` arriving on the
robot's bus, the socket the follower reads, from a tap on that bus; the follower's frames then
must show that command (or a later one) applied. Process start-up is before t0, so not timed.
Between: pairing over MQTT (request, accept, signed), the WebRTC offer/answer relayed by the
session managers, ICE + DTLS + SCTP on loopback, the first ping/pong (the gateway forwards no
command before it has a clock offset). Parts are printed per session: online -> paired (the
robot's busy presence `ts`), paired -> gateway connected (its session.status), connected ->
first command.

Everything started is stopped by pid and temp dirs are removed, also on Ctrl-C, SIGTERM or a
failure. Exit status: 0 all sessions measured, 1 otherwise, 130 interrupted. It must never
signal a process it did not start.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field
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
from bench.stations import (
    BusTap,
    DemoStations,
    PresenceLog,
    Seen,
    follower_state,
    online_since,
)
from services.bus import FollowerFrame, MessageFrame
from services.demo import DEMO_STATIONS

SESSION_MANAGERS = ("robot_session", "teleop_session")
RESERVE_S = 8.0  # of --budget, kept for stopping everything
TRIAL_TIMEOUT_S = 15.0


@dataclass
class Trial:
    setup_ms: float
    online_to_paired_ms: float | None
    paired_to_connected_ms: float | None
    connected_to_command_ms: float | None
    skew_ms: float  # how far apart the two stations came online


def run_trial(
    stations: DemoStations, tap: BusTap, presence: PresenceLog, timeout_s: float
) -> Trial:
    station = stations.station
    stop_mark = tap.mark()
    for name in SESSION_MANAGERS:
        station.call("stopProcess", name, True)
    # The old session is over once the follower holds (its deadman: no command for 250 ms);
    # it publishes its state every tick, so a frame after the stop says so.
    if tap.wait_for(follower_state("robot", "stale"), timeout_s, stop_mark) is None:
        raise BenchTimeout("the follower did not hold after both session managers stopped")
    time.sleep(0.1)
    bus_mark, presence_mark = tap.mark(), presence.mark()
    restart_ns = time.time_ns()
    for name in SESSION_MANAGERS:
        station.call("startProcess", name, False)
    online = {}
    for role, station_id in DEMO_STATIONS.items():
        seen = presence.wait_for(online_since(station_id, restart_ns), timeout_s, presence_mark)
        if seen is None:
            raise BenchTimeout(f"the {role} station did not come online again")
        online[role] = int(seen.presence.ts * 1e9)
    t0 = max(online.values())
    command = tap.wait_for(
        lambda s: s.side == "robot" and s.topic == "joints.command" and s.recv_ns >= t0,
        timeout_s,
        bus_mark,
    )
    if command is None:
        raise BenchTimeout("no command reached the follower after both stations came online")
    first: Seen = command
    applied = tap.wait_for(
        lambda s: (
            isinstance(s.frame, FollowerFrame)
            and s.side == "robot"
            and s.frame.cmd_seq >= first.frame.seq
            and s.frame.state in ("ramping", "tracking")
        ),
        timeout_s,
        bus_mark,
    )
    if applied is None:
        raise BenchError("the follower never showed the first command applied")
    paired = presence.wait_for(
        lambda s: s.station == DEMO_STATIONS["robot"] and s.presence is not None
        and s.presence.busy and s.presence.ts * 1e9 >= restart_ns,
        0.0,
        presence_mark,
    )  # fmt: skip
    connected = tap.wait_for(
        lambda s: s.side == "robot" and isinstance(s.frame, MessageFrame)
        and s.frame.fields.get("event") == "connected",
        0.0,
        bus_mark,
    )  # fmt: skip
    paired_ns = None if paired is None else int(paired.presence.ts * 1e9)
    connected_ns = None if connected is None else connected.recv_ns

    def gap(a: int | None, b: int | None) -> float | None:
        return None if a is None or b is None else rounded((b - a) / 1e6)

    return Trial(
        setup_ms=rounded((first.recv_ns - t0) / 1e6),
        online_to_paired_ms=gap(t0, paired_ns),
        paired_to_connected_ms=gap(paired_ns, connected_ns),
        connected_to_command_ms=gap(connected_ns, first.recv_ns),
        skew_ms=rounded(abs(online["robot"] - online["teleop"]) / 1e6),
    )


@dataclass
class Report:
    args: argparse.Namespace
    machine: dict[str, Any] = field(default_factory=dict)
    trials: list[Trial] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    def figures(self) -> dict[str, float | None]:
        values = [t.setup_ms for t in self.trials]
        return {
            "p50": rounded(percentile(values, 50)) if values else None,
            "max": rounded(max(values)) if values else None,
        }


def render(report: Report) -> str:
    figures = report.figures()
    target = TARGETS["setup_p50_ms"]
    lines = [
        f"rdv session setup benchmark: both stations online -> first command applied, "
        f"{len(report.trials)} of {report.args.sessions} sessions",
        machine_line(report.machine),
        "",
        f"{'session':>8}{'setup ms':>11}{'online->paired':>16}{'->connected':>13}"
        f"{'->command':>11}{'online skew':>13}",
    ]
    for i, t in enumerate(report.trials, 1):
        lines.append(
            f"{i:>8}{ms(t.setup_ms, 1):>11}{ms(t.online_to_paired_ms, 1):>16}"
            f"{ms(t.paired_to_connected_ms, 1):>13}{ms(t.connected_to_command_ms, 1):>11}"
            f"{ms(t.skew_ms, 1):>13}"
        )
    busy = (report.details.get("cpu") or {}).get("machine_busy")
    lines += [
        "",
        f"setup p50 {ms(figures['p50'], 1)} ms (target <= {target:,.0f} ms: "
        f"{verdict(figures['p50'], target)}), max {ms(figures['max'], 1)} ms; machine CPU "
        f"{'-' if busy is None else f'{busy * 100:.0f}%'} busy over the sessions",
        "",
    ]
    lines += notes_block(
        [
            "Each session: both session managers stopped (clean stop, the follower holds), then "
            "started together; setup runs from the later of the two stations' first online "
            "presence (its own ts) to the first command on the robot's bus; the follower's "
            "frames confirm it applied. Gateways and arms keep running.",
        ]
    )
    lines += [f"ERROR: {error}" for error in report.errors]
    return "\n".join(lines)


def document(report: Report) -> dict[str, Any]:
    return {
        "bench": "setup",
        "rdv": report.figures(),
        "sessions": len(report.trials),
        "trials": [t.__dict__ for t in report.trials],
        "target": {"p50": TARGETS["setup_p50_ms"]},
        **document_tail(report.machine, report.details, report.errors),
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rdv bench setup",
        description="Session setup time, both stations online -> first command applied, over "
        "new sessions between two full rdv stations (deploy/demo.conf) on this machine.",
    )
    parser.add_argument(
        "--sessions", type=int, default=10, help="sessions to time (default: %(default)s)"
    )
    add_output_flags(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.sessions < 1 or args.budget < RESERVE_S + 10:
        parser.error(f"--sessions must be >= 1 and --budget >= {RESERVE_S + 10:g}")
    report = Report(args)
    with Run(args, RESERVE_S) as run:
        report.machine, report.errors = run.machine, run.errors
        stations = DemoStations(rate_hz=100.0)
        try:
            run.log("starting deploy/demo.conf (broker, robot and teleop stations)")
            stations.start(timeout_s=max(5.0, min(40.0, run.budget.left())))
            topics = ["joints.command", "joints.follower", "session.status"]
            feeds = {"robot": (stations.bus("robot"), topics)}
            with BusTap(feeds) as tap, PresenceLog(stations.identities["teleop"]) as presence:
                tracking = follower_state("robot", "tracking")
                if tap.wait_for(tracking, run.budget.left(), start=0) is None:
                    raise BenchTimeout("the stations never paired (follower never tracking)")
                run.log("stations paired, follower tracking; timing new sessions")
                cpu = CpuWindow()
                for index in range(args.sessions):
                    run.budget.check(f"session {index + 1} of {args.sessions} not run")
                    timeout_s = min(TRIAL_TIMEOUT_S, run.budget.left())
                    trial = run_trial(stations, tap, presence, timeout_s)
                    report.trials.append(trial)
                    run.log(f"session {index + 1}: setup {trial.setup_ms:.1f} ms")
                report.details["cpu"] = cpu.result()
        finally:
            run.log("stopping the stations")
            stations.stop()
    complete = len(report.trials) == args.sessions
    return run.finish(render(report), document(report), args.json, complete)


if __name__ == "__main__":
    sys.exit(main())
