"""Control latency through two full stations, beside the transport floor and today's designs:
`rdv bench control` (`python -m bench.control`).

DESIGN.md's target: leader read -> follower command applied, 100 Hz, p50 <= 1.5 ms, p99 <= 3 ms.

rdv
    deploy/demo.conf under real supervisord (bench.stations): Mosquitto on a free port, a robot
    station (sim follower, session manager, WebRTC gateway) and a teleop station (sim leader,
    session manager, gateway) that pair by themselves; the arm drivers run at `--rate`. Once the
    follower reports `tracking`, taps on both buses (a thread each) record, per command: the
    leader's frame (`seq`, `t` = leader read time) on the teleop bus, and the same `seq` arriving
    as `joints.command` on the robot bus, which is the socket the follower reads. latency =
    arrival on the robot bus - leader read (one machine: one wall clock, no offset estimate
    involved). loss = 1 - applied / sent, sent = leader frames read in the window, applied =
    those that reached the robot bus, minus the follower's rejections in the window
    (rdv_commands_rejected_total). The follower's own histogram (rdv_control_latency_seconds:
    read -> send_action() returned, dated through the gateway's clock-offset estimate) is
    scraped before and after the window and shown beside it, with the CPU each process used.
floor
    The same hops with no application code (bench.hops): ZeroMQ PUB/SUB ipc -> bare aiortc
    unordered data channel between two processes -> ZeroMQ PUB/SUB ipc, four processes,
    measured in the same run at the same rate; latency = arrival at the last socket - send.
baselines
    Re-created (bench.hops, labelled as such): lekiwi_style (JSON over ZeroMQ PUSH/PULL, one
    30 Hz loop each side) and lrvd_style (JSON over an aiortc data channel, 25 Hz loop, send
    only on change, the robot drains every 40 ms and applies the newest). They run at their own
    rates whatever `--rate` says; latency = leader read -> follower send_action() returned.

`--seconds` is the measuring time of the whole run: half for rdv, a quarter for the floor, a
quarter for the two baselines (run together: both are light 25-30 Hz loops). Each part is
measured alone, one after the other, so none loads another; the machine's CPU busy share in each
window is recorded (other users of a shared machine included). Everything started is stopped by
pid and temp dirs are removed, also on Ctrl-C, SIGTERM or a failure. Exit status: 0 all figures
measured, 1 a figure missing (time-out, failure), 130 interrupted. It must never signal a
process it did not start, nor judge a figure it did not measure in this run.
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import hops
from bench.common import (
    TARGETS,
    BenchError,
    BenchTimeout,
    Budget,
    CpuWindow,
    Progress,
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
from services.bus import JointFrame
from tests.support.broker import free_port

WARMUP_S = 0.5  # floor and baselines: the first half second after "go" is not counted
SETTLE_S = 0.5  # rdv: tracking reached, then this long before the window opens
RESERVE_S = 12.0  # of --budget, kept for stopping everything
FIGURES = ("p50", "p99", "max", "loss")


@dataclass
class Figures:
    latencies_ms: list[float]
    sent: int
    applied: int
    rejected: int = 0

    def summary(self) -> dict[str, float | None]:
        values = self.latencies_ms
        loss = None if self.sent == 0 else (self.sent - self.applied + self.rejected) / self.sent
        return {
            "p50": rounded(percentile(values, 50)) if values else None,
            "p99": rounded(percentile(values, 99)) if values else None,
            "max": rounded(max(values)) if values else None,
            "loss": None if loss is None else round(min(1.0, max(0.0, loss)), 4),
        }


def match(
    sent: Iterable[tuple[int, int]], applied: Iterable[tuple[int, int, int]], warmup_s: float
) -> Figures:
    """Commands sent after the warm-up, and the first application of each (by seq)."""
    sent = list(sent)
    if not sent:
        return Figures([], 0, 0)
    start = min(t for _seq, t in sent) + int(warmup_s * 1e9)
    counted = {seq: t for seq, t in sent if t >= start}
    first: dict[int, int] = {}
    for seq, _t, applied_ns in applied:
        if seq in counted and seq not in first:
            first[seq] = applied_ns
    latencies = [(first[seq] - counted[seq]) / 1e6 for seq in first]
    return Figures(latencies, len(counted), len(first))


# --- floor and baselines ----------------------------------------------------------------------


def run_floor(rate_hz: float, seconds: float, ready_timeout_s: float) -> tuple[Figures, dict]:
    import multiprocessing as mp

    root = Path(tempfile.mkdtemp(prefix="rdv-fl-"))  # short: ipc paths max 107 bytes
    try:
        first, second = f"ipc://{root}/a.sock", f"ipc://{root}/b.sock"
        offer_end, answer_end = mp.get_context("spawn").Pipe()
        sides = [
            hops.Side("sink", hops.floor_sink, {"endpoint": second}),
            hops.Side("relay_robot", hops.floor_relay, {"peer": answer_end, "role": "robot",
                      "endpoint_in": "", "endpoint_out": second, "host": "127.0.0.1"}),
            hops.Side("relay_teleop", hops.floor_relay, {"peer": offer_end, "role": "teleop",
                      "endpoint_in": first, "endpoint_out": "", "host": "127.0.0.1"}),
            hops.Side("source", hops.floor_source, {"endpoint": first, "rate_hz": rate_hz},
                      sends=True),
        ]  # fmt: skip
        results, usage = run_sides(sides, seconds + WARMUP_S, ready_timeout_s)
        figures = match(results["source"]["sent"], results["sink"]["applied"], WARMUP_S)
        return figures, {"cpu": usage, "rate_hz": rate_hz}
    finally:
        shutil.rmtree(root, ignore_errors=True)


def run_baselines(seconds: float, ready_timeout_s: float) -> tuple[dict[str, Figures], dict]:
    import multiprocessing as mp

    cmd_port, obs_port = free_port(), free_port()
    offer_end, answer_end = mp.get_context("spawn").Pipe()
    sides = [
        hops.Side("lekiwi_host", hops.lekiwi_host, {"cmd_port": cmd_port, "obs_port": obs_port}),
        hops.Side("lekiwi_client", hops.lekiwi_client,
                  {"cmd_port": cmd_port, "obs_port": obs_port}, sends=True),
        hops.Side("lrvd_robot", hops.lrvd_robot, {"peer": answer_end, "host": "127.0.0.1"}),
        hops.Side("lrvd_teleop", hops.lrvd_teleop, {"peer": offer_end, "host": "127.0.0.1"},
                  sends=True),
    ]  # fmt: skip
    results, usage = run_sides(sides, seconds + WARMUP_S, ready_timeout_s)
    figures = {
        "lekiwi_style": match(
            results["lekiwi_client"]["sent"], results["lekiwi_host"]["applied"], WARMUP_S
        ),
        "lrvd_style": match(
            results["lrvd_teleop"]["sent"], results["lrvd_robot"]["applied"], WARMUP_S
        ),
    }
    details = {
        "cpu": usage,
        "rate_hz": {"lekiwi_style": hops.LEKIWI_HZ, "lrvd_style": 1 / hops.LRVD_INTERVAL_S},
    }
    return figures, details


def run_sides(sides: list[hops.Side], seconds: float, ready_timeout_s: float) -> tuple[dict, dict]:
    try:
        return hops.run_sides(sides, seconds, ready_timeout_s)
    except hops.SideError as exc:
        raise BenchError(str(exc)) from None


# --- rdv --------------------------------------------------------------------------------------


def histogram_quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """Prometheus' histogram_quantile over (upper bound, cumulative count) pairs: linear
    within the bucket that holds the q-th observation."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    total = buckets[-1][1]
    rank = q * total
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if math.isinf(bound):
                return lower_bound
            width = count - lower_count
            share = 0.0 if width <= 0 else (rank - lower_count) / width
            return lower_bound + (bound - lower_bound) * share
        lower_bound, lower_count = bound, count
    return None


def histogram_delta(before: dict[str, float], after: dict[str, float], name: str,
                    labels: str = "") -> dict[str, Any]:  # fmt: skip
    """Count, mean and quantiles (ms) of one histogram's observations between two scrapes."""
    suffix = f",{labels}" if labels else ""
    buckets = []
    for key, value in after.items():
        prefix = f"{name}_bucket{{"
        if key.startswith(prefix) and key.endswith(f"{suffix}}}"):
            le = key[len(prefix) :].split(",")[0].removeprefix("le=").rstrip("}")
            buckets.append((float(le), value - before.get(key, 0.0)))
    buckets.sort()
    plain = f"{{{labels}}}" if labels else ""
    count = after.get(f"{name}_count{plain}", 0.0) - before.get(f"{name}_count{plain}", 0.0)
    total = after.get(f"{name}_sum{plain}", 0.0) - before.get(f"{name}_sum{plain}", 0.0)
    quantile = {q: histogram_quantile(q, buckets) for q in (0.5, 0.99)}
    return {
        "count": int(count),
        "mean_ms": rounded(total / count * 1000) if count else None,
        "p50_ms": rounded(quantile[0.5] * 1000) if quantile[0.5] is not None else None,
        "p99_ms": rounded(quantile[0.99] * 1000) if quantile[0.99] is not None else None,
        "share_le_1_5ms": _share_le(buckets, 0.0015),
        "share_le_3ms": _share_le(buckets, 0.003),
    }


def _share_le(buckets: list[tuple[float, float]], bound: float) -> float | None:
    total = buckets[-1][1] if buckets else 0
    for le, count in buckets:
        if math.isclose(le, bound):
            return round(count / total, 4) if total else None
    return None


def rejected_total(samples: dict[str, float]) -> float:
    return sum(v for k, v in samples.items() if k.startswith("rdv_commands_rejected_total{"))


def run_rdv(
    rate_hz: float, seconds: float, video: bool, budget: Budget, log: Progress
) -> tuple[Figures, dict[str, Any]]:
    stations = DemoStations(rate_hz=rate_hz)
    try:
        log("rdv: starting deploy/demo.conf (broker, robot and teleop stations)")
        pids = stations.start(timeout_s=max(5.0, min(40.0, budget.left())), cameras=video)
        feeds = {
            "teleop": (stations.bus("teleop"), ["joints.leader"]),
            "robot": (stations.bus("robot"), ["joints.command", "joints.follower"]),
        }
        with BusTap(feeds) as tap:
            started = time.monotonic()
            if tap.wait_for(follower_state("robot", "tracking"), budget.left(), start=0) is None:
                raise BenchTimeout(
                    f"the follower never reached tracking:\n{stations.station.logs()}"
                )
            log(f"rdv: stations paired, follower tracking after {time.monotonic() - started:.1f} s")
            time.sleep(SETTLE_S)
            running = stations.station.programs()
            pids = {name: pid for name, pid in pids.items()
                    if name != "broker" and running[name]["statename"] == "RUNNING"}  # fmt: skip
            before = stations.metrics("robot", "follower_arm", "rdv_")
            mark = tap.mark()
            cpu = CpuWindow(pids)
            time.sleep(seconds)
            window_end = time.time_ns()
            usage = cpu.result()
            time.sleep(0.3)  # commands in flight at the end of the window
            after = stations.metrics("robot", "follower_arm", "rdv_")
            seen = tap.since(mark)
        return rdv_figures(seen, before, after, window_end, usage)
    finally:
        log("rdv: stopping the stations")
        stations.stop()


def rdv_figures(seen: list, before: dict[str, float], after: dict[str, float], window_end: int,
                usage: dict[str, Any]) -> tuple[Figures, dict[str, Any]]:  # fmt: skip
    leader: dict[int, Any] = {}
    command: dict[int, Any] = {}
    for item in seen:
        if not isinstance(item.frame, JointFrame):
            continue
        if item.topic == "joints.leader" and item.frame.t <= window_end:
            leader.setdefault(item.frame.seq, item)
        elif item.topic == "joints.command":
            command.setdefault(item.frame.seq, item)
    delivered = [seq for seq in leader if seq in command]
    latency = [(command[s].recv_ns - leader[s].frame.t) / 1e6 for s in delivered]
    hop_leader = [(leader[s].recv_ns - leader[s].frame.t) / 1e6 for s in delivered]
    hop_gateways = [(command[s].recv_ns - leader[s].recv_ns) / 1e6 for s in delivered]
    offset_error = [(command[s].frame.t - leader[s].frame.t) / 1e6 for s in delivered]
    rejected = int(rejected_total(after) - rejected_total(before))
    figures = Figures(latency, len(leader), len(delivered), rejected)
    applied = histogram_delta(before, after, "rdv_control_latency_seconds")
    received = histogram_delta(before, after, "rdv_bus_latency_seconds", "topic=joints.command")
    apply_mean = (
        None
        if applied["mean_ms"] is None or received["mean_ms"] is None
        else rounded(applied["mean_ms"] - received["mean_ms"])
    )

    def p(values: list[float], q: float) -> float | None:
        return rounded(percentile(values, q)) if values else None

    details = {
        "sent": figures.sent,
        "delivered": figures.applied,
        "rejected": rejected,
        "hops_ms": {
            "leader_read_to_teleop_bus": {"p50": p(hop_leader, 50), "p99": p(hop_leader, 99)},
            "teleop_bus_to_robot_bus": {"p50": p(hop_gateways, 50), "p99": p(hop_gateways, 99)},
            "robot_bus_to_applied_mean": apply_mean,
        },
        "follower_histogram": {"applied": applied, "received": received},
        "clock_offset_error_ms": {
            "p50": p(offset_error, 50),
            "max_abs": rounded(max((abs(v) for v in offset_error), default=0.0)),
        },
        "cpu": usage,
    }
    return figures, details


# --- report -----------------------------------------------------------------------------------


@dataclass
class Report:
    args: argparse.Namespace
    machine: dict[str, Any] = field(default_factory=dict)
    results: dict[str, dict[str, float | None]] = field(default_factory=dict)
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    def put(self, name: str, figures: Figures) -> None:
        self.results[name] = figures.summary()
        self.counts[name] = {"sent": figures.sent, "applied": figures.applied,
                             "samples": len(figures.latencies_ms)}  # fmt: skip

    def figures(self, name: str) -> dict[str, float | None]:
        return self.results.get(name) or dict.fromkeys(FIGURES)


def split_seconds(seconds: float) -> dict[str, float]:
    return {"rdv": seconds / 2, "floor": seconds / 4, "baselines": seconds / 4}


def render(report: Report) -> str:
    args = report.args
    windows = split_seconds(args.seconds)
    lines = [
        f"rdv control benchmark: leader read -> follower command, rdv at {args.rate:g} Hz "
        f"({'with' if args.with_video else 'without'} video on the link); "
        f"windows rdv {windows['rdv']:g} s, floor {windows['floor']:g} s, "
        f"baselines {windows['baselines']:g} s",
        machine_line(report.machine),
        "",
        f"{'path':<34}{'rate':>7}{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}{'loss':>8}"
        f"{'samples':>9}   machine busy",
    ]
    rows = [
        ("rdv", "rdv (two full stations)", args.rate, "rdv"),
        ("floor", "floor (ZMQ -> bare DC -> ZMQ)", args.rate, "floor"),
        ("lekiwi_style", "LeKiwi-style (re-created)", hops.LEKIWI_HZ, "baselines"),
        ("lrvd_style", "lrvd-style (re-created)", 1 / hops.LRVD_INTERVAL_S, "baselines"),
    ]
    for key, label, rate, phase in rows:
        f = report.figures(key)
        busy = (report.details.get(phase, {}).get("cpu") or {}).get("machine_busy")
        loss = "-" if f["loss"] is None else f"{f['loss'] * 100:.1f}%"
        samples = report.counts.get(key, {}).get("samples", 0)
        lines.append(
            f"{label:<34}{rate:>5g}Hz{ms(f['p50']):>9}{ms(f['p99']):>9}{ms(f['max']):>9}"
            f"{loss:>8}{samples:>9}   {'-' if busy is None else f'{busy * 100:.0f}%'}"
        )
    rdv = report.figures("rdv")
    d = report.details.get("rdv", {})
    p50_target, p99_target = TARGETS["control_p50_ms"], TARGETS["control_p99_ms"]
    lines += [
        "",
        f"target (DESIGN.md, 100 Hz): p50 <= {p50_target:g} ms, p99 <= {p99_target:g} ms; "
        f"per command to the follower's socket: p50 {verdict(rdv['p50'], p50_target)}, p99 "
        f"{verdict(rdv['p99'], p99_target)}",
    ]
    if d:
        applied = d["follower_histogram"]["applied"]
        shares = (applied["share_le_1_5ms"], applied["share_le_3ms"])
        if None not in shares:
            # The histogram's buckets end exactly at 1.5 and 3 ms: these verdicts are exact.
            lines.append(
                f"  applied (follower's histogram, {_pct(shares[0])} <= {p50_target:g} ms, "
                f"{_pct(shares[1])} <= {p99_target:g} ms): p50 "
                f"{'met' if shares[0] >= 0.5 else 'MISSED'}, p99 "
                f"{'met' if shares[1] >= 0.99 else 'MISSED'}"
            )
    if d:
        hop = d["hops_ms"]
        applied = d["follower_histogram"]["applied"]
        lines += [
            "rdv per hop (ms, p50 / p99): leader read -> teleop bus "
            f"{ms(hop['leader_read_to_teleop_bus']['p50'])} / "
            f"{ms(hop['leader_read_to_teleop_bus']['p99'])}; teleop bus -> robot bus (gateways "
            f"+ data channel) {ms(hop['teleop_bus_to_robot_bus']['p50'])} / "
            f"{ms(hop['teleop_bus_to_robot_bus']['p99'])}; robot bus -> applied, mean "
            f"{ms(hop['robot_bus_to_applied_mean'], 3)}",
            f"follower's histogram (read -> applied, clock-offset corrected): "
            f"{applied['count']} applied, mean {ms(applied['mean_ms'])} ms, p50 ~"
            f"{ms(applied['p50_ms'])} ms, p99 ~{ms(applied['p99_ms'])} ms (bucket-interpolated),"
            f" {_pct(applied['share_le_1_5ms'])} <= 1.5 ms, {_pct(applied['share_le_3ms'])} "
            "<= 3 ms",
        ]
    for phase in ("rdv", "floor", "baselines"):
        usage = (report.details.get(phase) or {}).get("cpu") or {}
        if usage.get("process_cpu_pct"):
            shares = ", ".join(f"{k} {v}" for k, v in usage["process_cpu_pct"].items())
            lines.append(f"CPU per process, {phase} window (% of one core): {shares}")
    notes = [
        "rdv: per command, leader read (frame t) -> the same seq arriving on the robot bus as "
        "joints.command (the follower's socket), from taps on both buses; loss = commands read "
        "in the window that never reached it, or that the follower rejected.",
        "floor: the same hops, no rdv code, four processes, same rate. Baselines re-create "
        "LeKiwi (JSON, ZMQ PUSH/PULL over TCP, 30 Hz loops, CONFLATE) and lrvd 0.3.0 (JSON on an "
        "unordered aiortc channel, send on change, 40 ms loops, the robot applies only the "
        "newest); their loss counts commands never applied, superseded ones included.",
        "Each part ran alone, one after another; 'machine busy' is the whole machine's CPU "
        "share in that window, other users included.",
    ]
    lines.append("")
    lines += notes_block(notes)
    lines += [f"ERROR: {error}" for error in report.errors]
    return "\n".join(lines)


def _pct(share: float | None) -> str:
    return "-" if share is None else f"{share * 100:.1f}%"


def document(report: Report) -> dict[str, Any]:
    return {
        "bench": "control",
        "rate_hz": report.args.rate,
        "video": report.args.with_video,
        "rdv": report.figures("rdv"),
        "floor": report.figures("floor"),
        "baselines": {name: report.figures(name) for name in ("lekiwi_style", "lrvd_style")},
        "seconds": split_seconds(report.args.seconds),
        "samples": report.counts,
        "target": {"p50": TARGETS["control_p50_ms"], "p99": TARGETS["control_p99_ms"]},
        **document_tail(report.machine, report.details, report.errors),
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rdv bench control",
        description="Control latency, leader read -> follower command applied, through two full "
        "rdv stations (bus, gateways, WebRTC data channel), beside the bare transport floor and "
        "re-created LeKiwi-style and lrvd-style designs, in one run on this machine.",
    )
    parser.add_argument(
        "--rate", type=float, default=100.0, help="leader read rate in Hz for rdv and the floor "
        "(baselines keep their own 30 and 25 Hz) (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--seconds", type=float, default=20.0, help="measuring time of the whole run: half rdv, "
        "a quarter floor, a quarter baselines (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--with-video",
        action="store_true",
        help="keep demo.conf's camera running, so the robot gateway also streams video while "
        "control is measured (default: off: the path the target is about, bus + gateways + "
        "data channel, measured without video load)",
    )
    add_output_flags(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not 0 < args.rate <= 1000:
        parser.error("--rate must be in (0, 1000] Hz (the arm driver's range)")
    if args.seconds <= 0 or args.budget < RESERVE_S + args.seconds + 5:
        parser.error(f"--seconds must be > 0 and --budget >= --seconds + {RESERVE_S + 5:g}")
    report = Report(args)
    windows = split_seconds(args.seconds)
    with Run(args, RESERVE_S) as run:
        report.machine, report.errors = run.machine, run.errors
        budget = run.budget
        phases = (
            ("floor", lambda: run_floor(args.rate, windows["floor"], min(30, budget.left()))),
            ("rdv", lambda: run_rdv(args.rate, windows["rdv"], args.with_video, budget, run.log)),
            ("baselines", lambda: run_baselines(windows["baselines"], min(30, budget.left()))),
        )
        for name, phase in phases:
            try:
                budget.check(f"{name} not run")
                run.log(f"{name}: measuring")
                figures, details = phase()
            except BenchError as exc:  # the other parts still run
                report.errors.append(f"{name}: {exc}")
                run.log(f"{name} failed: {exc}")
                continue
            report.details[name] = details
            for key, value in (figures if isinstance(figures, dict) else {name: figures}).items():
                report.put(key, value)
                if not value.latencies_ms:
                    report.errors.append(f"{key}: no command was applied")
    return run.finish(render(report), document(report), args.json, complete=True)


if __name__ == "__main__":
    sys.exit(main())
