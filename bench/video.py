"""Glass-to-glass video latency, rdv's media path beside stock aiortc in the same run:
`rdv bench video` (`python -m bench.video`).

DESIGN.md's target: capture -> decoded at the teleop, 640x480@30, p50 <= 25 ms and p99 <= 45 ms
for at least one codec.

Each variant is two processes on this machine, measured one after the other: a sender (the robot
side) and a receiver (the teleop side), real aiortc peers whose ICE offers only 127.0.0.1, with
offer/answer over a pipe the parent creates between them (as bench.hops does). Both are
`GatewayPeer`s, so the data channels, the pings, the clock-offset estimate and the capture-time
matching are rdv's, the same in both variants; only the media path differs:

rdv
    rdv's media path (services/webrtc_gateway/media.py): `install_encoders()` (H264 with x264
    `ultrafast`; VP8 is aiortc's), `CameraTrack` handing the encoder the newest frame when it
    arrives, and `fix_receive_path()` (a jitter buffer that releases a frame at its RTP marker).
aiortc_stock
    aiortc with its defaults: its own encoders (H264 with x264's default preset), its own
    JitterBuffer, and a track written the way aiortc's examples write one (`VideoStreamTrack`
    subclass that paces itself with `next_timestamp()`, 30 fps on the wall clock, and returns the
    newest rendered picture when asked; its slots fall half a frame after the camera's ticks,
    the mean of the arbitrary phase a deployment gets). The measurement hook alone differs from
    a stock install, and adds no latency: the receiver keeps raw RTP timestamps as pts
    (`RtpTimestamps`, the timestamp mapper only), and the track reports each frame's capture time
    keyed by its RTP timestamp, so decoded frames can be matched with capture times as rdv's are.

The sender renders the simulated arm moving (services/camera/render.py) at `--fps` on its own
thread, as the camera service does in its own process, and stamps each picture with
`services.clock.now_ns()` once rendered (where the camera service stamps a captured frame). The
receiver's latency for a decoded frame = decode time - capture time moved to its clock by the
peer's offset estimate (one machine: ~0), which is what `GatewayPeer` records. The first second
of video after the first sample is a warm-up, not counted; then both sides measure for
`--seconds`: latencies, frames decoded per second, and each process's CPU time over wall time
(% of one core, from /proc by the parent; the sender's includes rendering, which its camera
thread measures and is shown apart). Every process is stopped by pid
(bench.hops.run_sides), also on Ctrl-C, SIGTERM or a failure. Exit status: 0 all figures
measured, 1 a figure missing, 130 interrupted. This module must never contact anything but
127.0.0.1, and never edits aiortc: the stock variant's choices are set per process.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import multiprocessing as mp
import re
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

from bench import hops
from bench.common import (
    TARGETS,
    BenchError,
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
from services import clock
from services.arm_driver.ticker import Ticker
from services.bus.frames import VideoFrame
from services.camera.render import ArmPose, ArmRenderer

CAMERA = "front"
HOST = "127.0.0.1"
VARIANTS = ("rdv", "aiortc_stock")
LABELS = {"rdv": "rdv", "aiortc_stock": "aiortc stock (defaults)"}
FIGURES = ("p50", "p99", "fps", "cpu_sender_pct", "cpu_receiver_pct")
WARMUP_S = 1.0  # after the first glass-to-glass sample: encoder start-up, first keyframe
CONNECT_TIMEOUT_S = 20.0
READY_TIMEOUT_S = 30.0  # both processes up, connected, video flowing, warmed up
RESERVE_S = 8.0  # of --budget, kept for stopping everything
STOCK_TRACK_FPS = 30  # aiortc's VideoStreamTrack.next_timestamp() paces at 30 fps, whatever --fps
# Where the stock track's 30 fps slots fall between the camera's ticks, as a share of a frame
# interval. In the field the phase is arbitrary and drifts; half a frame is its mean (the picture
# taken is ~half a frame old). Slots that coincide with pictures would make the figure flip, run
# to run and within a run, between a fresh picture and one a whole frame old.
STOCK_TRACK_PHASE = 0.5


# --- the sender's camera ------------------------------------------------------------------------


class SimCamera:
    """The robot's camera for the bench: the sim arm, moving, rendered at `fps` on its own thread
    (the camera service is its own process), each picture stamped once rendered and handed on."""

    def __init__(self, width: int, height: int, fps: float, deliver: Callable[[Any], None]) -> None:
        self.fps = fps
        self.renderer = ArmRenderer(width, height, CAMERA)
        self._deliver = deliver
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sim-camera", daemon=True)
        self.frames = 0
        self.cpu_s = 0.0  # this thread's CPU time: rendering, shown apart from the sender's
        self.tick_origin = 0.0
        self._ticker: Ticker | None = None

    def start(self) -> None:
        self.tick_origin = time.monotonic()  # the first tick; the next every 1/fps s
        self._ticker = Ticker(self.fps)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.ident is not None:  # started
            self._thread.join(timeout=5)

    def _run(self) -> None:
        assert self._ticker is not None
        while not self._stop.is_set():
            self._ticker.sleep()
            began = time.thread_time()
            image = self.renderer.render(moving_pose(self.frames / self.fps), clock.now_ns(),
                                         self.frames)  # fmt: skip
            captured_ns = clock.now_ns()
            height, width = image.shape[:2]
            frame = VideoFrame(self.frames, captured_ns, "robot", width, height, "bgr24",
                               image.tobytes())  # fmt: skip
            self.cpu_s += time.thread_time() - began
            self.frames += 1
            self._deliver(frame)


def moving_pose(t_s: float) -> ArmPose:
    """A slow sweep of every joint: each picture differs from the last, as a working arm's."""
    return ArmPose(
        shoulder_pan=40 * math.sin(2 * math.pi * 0.3 * t_s),
        shoulder_lift=20 * math.sin(2 * math.pi * 0.2 * t_s),
        elbow_flex=-30 + 25 * math.sin(2 * math.pi * 0.25 * t_s),
        wrist_flex=30 * math.sin(2 * math.pi * 0.4 * t_s),
        wrist_roll=90 * math.sin(2 * math.pi * 0.1 * t_s),
        gripper=50 + 40 * math.sin(2 * math.pi * 0.5 * t_s),
    )


# --- the stock variant's track and receive path (set in its processes only) ---------------------


def stock_style_track_class() -> type:
    """Built on first use: aiortc is imported only in the peer processes."""
    from aiortc import VideoStreamTrack

    from services.webrtc_gateway.media import RtpOrigin, to_av_frame

    class StockStyleTrack(VideoStreamTrack):
        """A camera track as aiortc's examples write one: `recv()` waits for its next 30 fps
        slot on the wall clock (`next_timestamp()`) and returns the newest picture, whether or
        not a new one came. `offer()` is how the bench's camera hands pictures over (what
        GatewayPeer.send_video calls); `on_capture` is the measurement hook."""

        def __init__(self, camera: str, on_capture: Callable[[str, int, int], None]) -> None:
            super().__init__()
            self.camera = camera
            self.sender: Any = None
            self._on_capture = on_capture
            self._latest: Any = None
            self._taken = True
            self._first = asyncio.Event()
            self._camera_ticks: tuple[float, float] | None = None
            self._origin = RtpOrigin()
            self.frames_replaced = 0  # rendered, never sent: a newer one came first
            self.frames_repeated = 0  # the same picture sent again: no newer one came in time
            self.ages_ns: list[int] = []  # how old each picture was when its slot came

        def align(self, tick_origin: float, period_s: float) -> None:
            """Bench only: the camera's tick schedule (monotonic), to set the phase against."""
            self._camera_ticks = (tick_origin, period_s)

        async def _first_slot(self) -> None:
            """Start pacing STOCK_TRACK_PHASE of a frame interval after a camera tick."""
            if self._camera_ticks is None:
                return
            origin, period = self._camera_ticks
            now = time.monotonic()
            ticks = math.ceil((now - origin) / period - STOCK_TRACK_PHASE)
            await asyncio.sleep(origin + (ticks + STOCK_TRACK_PHASE) * period - now)

        def offer(self, frame: Any) -> None:
            if not self._taken:
                self.frames_replaced += 1
            self._latest, self._taken = frame, False
            self._first.set()

        async def recv(self) -> Any:
            if not self._first.is_set():  # nothing to show before the camera's first picture
                await self._first.wait()
                await self._first_slot()
            pts, _time_base = await self.next_timestamp()
            frame = self._latest
            if self._taken:
                self.frames_repeated += 1
            self.ages_ns.append(clock.now_ns() - frame.t)
            self._taken = True
            rtp_ts = self._origin.rtp_ts(self.sender, pts)
            if rtp_ts is not None:
                self._on_capture(self.camera, rtp_ts, frame.t)
            return to_av_frame(frame, pts)  # pts in 1/90000 s, next_timestamp()'s time base

    return StockStyleTrack


def media_path(variant: str) -> dict[str, Any]:
    """GatewayPeer's media arguments: rdv's own, or stock aiortc's (the example-style track and
    aiortc's own jitter buffer; of rdv's receive path only the timestamp mapper, which is the
    measurement and adds no latency)."""
    if variant == "rdv":
        return {}
    from services.webrtc_gateway.media import keep_rtp_timestamps

    return {"track_factory": stock_style_track_class(), "receive_path": keep_rtp_timestamps}


# --- the two peer processes ---------------------------------------------------------------------


def _prepare(variant: str) -> None:
    from services.webrtc_gateway.media import check_aiortc, install_encoders
    from services.webrtc_gateway.peer import restrict_host_candidates

    restrict_host_candidates([HOST])
    check_aiortc()
    if variant == "rdv":
        install_encoders()  # stock keeps aiortc's encoder factory


async def _signal(gateway: Any, pipe: Connection, offerer: bool) -> str:
    """Offer/answer over the pipe between the two processes (not timed); returns the answer."""
    loop = asyncio.get_running_loop()
    if offerer:
        pipe.send(await gateway.make_offer())
        answer = await loop.run_in_executor(None, pipe.recv)
        await gateway.accept_answer(answer)
        return answer
    answer = await gateway.accept_offer(await loop.run_in_executor(None, pipe.recv))
    pipe.send(answer)
    return answer


def video_codec_of(sdp: str) -> str | None:
    """The codec an SDP answer chose for its first video stream (its first payload type)."""
    match = re.search(r"^m=video \d+ \S+ (\d+)", sdp, re.MULTILINE)
    if match is None:
        return None
    name = re.search(rf"^a=rtpmap:{match.group(1)} ([^/\s]+)/", sdp, re.MULTILINE)
    return None if name is None else name.group(1).lower()


async def _stopped(control: hops.Control) -> None:
    # Waited for on a worker thread: the event loop gets no extra wake-ups while it streams.
    await asyncio.get_running_loop().run_in_executor(None, control.stop.wait)


def sender_side(conn: Connection, peer: Connection, variant: str, width: int, height: int,
                fps: float) -> dict[str, Any]:  # fmt: skip
    """The robot: renders the arm, streams it; measures its CPU between "go" and "stop"."""
    _prepare(variant)
    from services.webrtc_gateway.peer import GatewayPeer, PeerConfig

    async def run() -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        robot = GatewayPeer(PeerConfig(initiator=False, cameras=(CAMERA,)), **media_path(variant))

        def deliver(frame: Any) -> None:  # on the camera's thread: the loop sends it
            loop.call_soon_threadsafe(robot.send_video, CAMERA, frame)

        camera = SimCamera(width, height, fps, deliver)
        watch = None
        try:
            await _signal(robot, peer, offerer=False)
            await robot.wait_open(CONNECT_TIMEOUT_S)
            watch = asyncio.ensure_future(robot.watch_link())  # answers the teleop's pings
            camera.start()
            track = robot.camera_tracks[CAMERA]
            if hasattr(track, "align"):  # the stock track: its phase against the camera's ticks
                track.align(camera.tick_origin, 1 / fps)
            control = hops.Control(conn)
            control.start()
            await loop.run_in_executor(None, control.go.wait)
            began, frames, render_s = time.monotonic(), camera.frames, camera.cpu_s
            replaced, repeated = track.frames_replaced, getattr(track, "frames_repeated", 0)
            ages = len(getattr(track, "ages_ns", ()))
            await _stopped(control)
            seconds = time.monotonic() - began
            return {
                "seconds": seconds,
                "render_cpu_pct": 100 * (camera.cpu_s - render_s) / seconds,
                "rendered": camera.frames - frames,
                "never_sent": track.frames_replaced - replaced,
                "repeated": getattr(track, "frames_repeated", 0) - repeated,
                "ages_ns": getattr(track, "ages_ns", [])[ages:],
            }
        finally:
            camera.stop()
            if watch is not None:
                watch.cancel()
            await robot.close()

    return asyncio.run(run())


def receiver_side(conn: Connection, peer: Connection, variant: str, codec: str) -> dict[str, Any]:
    """The teleop: asks for the camera, decodes it; glass-to-glass per decoded frame, as
    GatewayPeer records it, between "go" and "stop"."""
    _prepare(variant)
    from services.webrtc_gateway.peer import GatewayPeer, PeerConfig

    decoded = [0]

    def count(_camera: str, _frame: Any) -> None:
        decoded[0] += 1

    async def run() -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        config = PeerConfig(initiator=True, cameras=(CAMERA,), video_codec=codec)
        teleop = GatewayPeer(config, on_video=count, **media_path(variant))
        watch = None
        try:
            answer = await _signal(teleop, peer, offerer=True)
            await teleop.wait_open(CONNECT_TIMEOUT_S)
            watch = asyncio.ensure_future(teleop.watch_link())  # pings: the clock offset
            # Warm-up: video flowing and the offset known (a first sample), then WARMUP_S more.
            # Not bounded here: the parent's ready time-out stops a process that never gets one.
            while not teleop.video_latency_ns:
                await asyncio.sleep(0.02)
            await asyncio.sleep(WARMUP_S)
            control = hops.Control(conn)
            control.start()
            await loop.run_in_executor(None, control.go.wait)
            teleop.video_latency_ns.clear()
            began, first = time.monotonic(), decoded[0]
            await _stopped(control)
            seconds = time.monotonic() - began
            monitor = teleop.monitor
            return {
                "seconds": seconds,
                "decoded": decoded[0] - first,
                "latency_ns": list(teleop.video_latency_ns),
                "codec": video_codec_of(answer),
                "offset_ns": None if monitor is None else monitor.offset.offset_ns,
                "rtt_ns": None if monitor is None else monitor.rtt_ns,
            }
        finally:
            if watch is not None:
                watch.cancel()
            await teleop.close()

    return asyncio.run(run())


# --- the parent's side --------------------------------------------------------------------------


@dataclass
class Measured:
    """One variant's run, as its two processes reported it."""

    sender: dict[str, Any]
    receiver: dict[str, Any]
    usage: dict[str, Any]  # bench.common.CpuWindow's, over the window: machine and each process

    @property
    def latencies_ms(self) -> list[float]:
        return [ns / 1e6 for ns in self.receiver["latency_ns"]]

    def figures(self) -> dict[str, float | None]:
        values = self.latencies_ms
        return {
            "p50": rounded(percentile(values, 50)) if values else None,
            "p99": rounded(percentile(values, 99)) if values else None,
            "fps": rounded(self.receiver["decoded"] / self.receiver["seconds"], 2),
            "cpu_sender_pct": self.usage["process_cpu_pct"].get("sender"),
            "cpu_receiver_pct": self.usage["process_cpu_pct"].get("receiver"),
        }

    def _ages_ms(self) -> list[float]:
        return [ns / 1e6 for ns in self.sender["ages_ns"]]

    def details(self) -> dict[str, Any]:
        values = self.latencies_ms
        offset, rtt = self.receiver["offset_ns"], self.receiver["rtt_ns"]
        return {
            "samples": len(values),
            "decoded": self.receiver["decoded"],
            "max_ms": rounded(max(values)) if values else None,
            "mean_ms": rounded(sum(values) / len(values)) if values else None,
            "negotiated_codec": self.receiver["codec"],
            "rendered": self.sender["rendered"],
            "rendered_never_sent": self.sender["never_sent"],
            "sent_again": self.sender["repeated"],
            "picture_age_at_slot_ms_p50": (
                rounded(percentile(ages, 50)) if (ages := self._ages_ms()) else None
            ),
            "render_cpu_pct": rounded(self.sender["render_cpu_pct"], 1),
            "window_s": {
                "sender": rounded(self.sender["seconds"]),
                "receiver": rounded(self.receiver["seconds"]),
            },
            "clock_offset_ms": None if offset is None else rounded(offset / 1e6),
            "rtt_ms": None if rtt is None else rounded(rtt / 1e6),
            "machine_busy": self.usage["machine_busy"],
        }


def run_variant(variant: str, args: argparse.Namespace, ready_timeout_s: float) -> Measured:
    offer_end, answer_end = mp.get_context("spawn").Pipe()
    sides = [
        hops.Side("receiver", receiver_side,
                  {"peer": offer_end, "variant": variant, "codec": args.codec}, sends=True),
        hops.Side("sender", sender_side, {"peer": answer_end, "variant": variant,
                  "width": args.width, "height": args.height, "fps": args.fps}, sends=True),
    ]  # fmt: skip
    try:
        # Both "send": both get "go" together, both are stopped together after --seconds.
        results, usage = hops.run_sides(sides, args.seconds, ready_timeout_s)
    except hops.SideError as exc:
        raise BenchError(str(exc)) from None
    finally:
        for end in (offer_end, answer_end):
            end.close()
    measured = Measured(results["sender"], results["receiver"], usage)
    negotiated = measured.receiver["codec"]
    if negotiated != args.codec:
        raise BenchError(f"asked for {args.codec}, the peers negotiated {negotiated}")
    if not measured.receiver["latency_ns"]:
        raise BenchError("no decoded frame was matched with its capture time")
    return measured


# --- report -------------------------------------------------------------------------------------


@dataclass
class Report:
    args: argparse.Namespace
    machine: dict[str, Any] = field(default_factory=dict)
    measured: dict[str, Measured] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    def figures(self, variant: str) -> dict[str, float | None]:
        measured = self.measured.get(variant)
        return measured.figures() if measured is not None else dict.fromkeys(FIGURES)


def size_text(args: argparse.Namespace) -> str:
    return f"{args.width}x{args.height}"


def render(report: Report) -> str:
    args = report.args
    lines = [
        f"rdv video benchmark: glass-to-glass, capture -> decoded at the teleop, "
        f"{args.codec.upper()} {size_text(args)}@{args.fps:g}, {args.seconds:g} s per variant, "
        "two processes each, loopback",
        machine_line(report.machine),
        "",
        f"{'path':<26}{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}{'fps':>7}{'CPU send':>10}"
        f"{'(render)':>9}{'CPU recv':>10}{'samples':>9}   machine busy",
    ]
    for variant in VARIANTS:
        f = report.figures(variant)
        measured = report.measured.get(variant)
        d = measured.details() if measured is not None else {}
        busy = d.get("machine_busy")
        lines.append(
            f"{LABELS[variant]:<26}{ms(f['p50']):>9}{ms(f['p99']):>9}{ms(d.get('max_ms')):>9}"
            f"{ms(f['fps'], 1):>7}{_pct(f['cpu_sender_pct']):>10}"
            f"{_pct(d.get('render_cpu_pct')):>9}{_pct(f['cpu_receiver_pct']):>10}"
            f"{d.get('samples', 0):>9}   {'-' if busy is None else f'{busy * 100:.0f}%'}"
        )
    rdv = report.figures("rdv")
    p50_target, p99_target = TARGETS["video_p50_ms"], TARGETS["video_p99_ms"]
    at_target_size = (args.width, args.height, args.fps) == (640, 480, 30)
    lines += [
        "",
        f"target (DESIGN.md, 640x480@30, at least one codec): p50 <= {p50_target:g} ms, p99 <= "
        f"{p99_target:g} ms; rdv {args.codec.upper()}: p50 {verdict(rdv['p50'], p50_target)}, "
        f"p99 {verdict(rdv['p99'], p99_target)}"
        + ("" if at_target_size else " (this run is not at the target's size and rate)"),
    ]
    for variant in VARIANTS:
        measured = report.measured.get(variant)
        if measured is None:
            continue
        d = measured.details()
        lines.append(
            f"{LABELS[variant]}: {d['rendered']} rendered, {d['rendered_never_sent']} never sent "
            f"(a newer one came first), {d['sent_again']} sent again (no newer one in time), "
            f"{d['decoded']} decoded; clock offset {ms(d['clock_offset_ms'], 3)} ms, RTT "
            f"{ms(d['rtt_ms'], 3)} ms"
            + ("" if d["picture_age_at_slot_ms_p50"] is None else
               f"; picture age when the track's slot came, p50 "
               f"{ms(d['picture_age_at_slot_ms_p50'])} ms")
        )  # fmt: skip
    notes = [
        "Per decoded frame: decode time at the teleop process - capture time (stamped when the "
        "sim arm's picture was rendered, on the robot process's clock, moved to the teleop's by "
        "the ping/pong offset estimate), as GatewayPeer records it; fps = frames decoded per "
        "second; CPU = each process's CPU time / wall time in the window (% of one core), the "
        "sender's including rendering (shown apart).",
        "rdv: install_encoders (H264: x264 ultrafast; VP8: aiortc's), CameraTrack (newest "
        "frame as it arrives), marker-releasing jitter buffer. aiortc stock: aiortc's encoders "
        "(H264: x264 default preset), its JitterBuffer, and an example-style VideoStreamTrack "
        f"paced by next_timestamp() ({STOCK_TRACK_FPS} fps, wall clock) returning the newest "
        f"picture, its slots {STOCK_TRACK_PHASE:g} frame after the camera's ticks (the mean "
        "of an arbitrary phase). Measurement hook only, adding no latency: raw RTP timestamps as "
        "pts at the receiver, capture times sent on the state channel keyed by RTP timestamp.",
        "The variants ran one after the other, each alone; 'machine busy' is the whole "
        "machine's CPU share during that variant, other users included.",
    ]
    if args.fps != STOCK_TRACK_FPS:
        notes.append(f"--fps {args.fps:g}: the stock track still sends {STOCK_TRACK_FPS} fps "
                     "(next_timestamp() is fixed), repeating or skipping pictures.")  # fmt: skip
    lines.append("")
    lines += notes_block(notes)
    lines += [f"ERROR: {error}" for error in report.errors]
    return "\n".join(lines)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}%"


def document(report: Report) -> dict[str, Any]:
    args = report.args
    return {
        "bench": "video",
        "codec": args.codec,
        "size": size_text(args),
        "fps": args.fps,
        "seconds": args.seconds,
        "rdv": report.figures("rdv"),
        "baselines": {"aiortc_stock": report.figures("aiortc_stock")},
        "target": {"p50": TARGETS["video_p50_ms"], "p99": TARGETS["video_p99_ms"]},
        "measurement_hook": "aiortc_stock: raw RTP timestamps kept as pts at the receiver and "
        "capture times sent keyed by RTP timestamp; no latency added",
        "stock_track_phase_frames": STOCK_TRACK_PHASE,
        **document_tail(
            report.machine,
            {variant: m.details() for variant, m in report.measured.items()},
            report.errors,
        ),
    }


def parse_size(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"(\d+)x(\d+)", text.strip())
    if match is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not WIDTHxHEIGHT, e.g. 640x480")
    width, height = int(match.group(1)), int(match.group(2))
    if not (16 <= width <= 3840 and 16 <= height <= 2160) or width % 2 or height % 2:
        raise argparse.ArgumentTypeError("the size must be even, 16x16 .. 3840x2160")
    return width, height


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rdv bench video",
        description="Glass-to-glass video latency (capture -> decoded at the teleop) over real "
        "aiortc peers in two processes, rdv's media path beside stock aiortc, in one run.",
    )
    parser.add_argument("--codec", choices=("vp8", "h264"), default="vp8",
                        help="video codec (default: %(default)s)")  # fmt: skip
    parser.add_argument("--size", type=parse_size, default=(640, 480), metavar="WxH",
                        help="picture size (default: 640x480)")  # fmt: skip
    parser.add_argument("--fps", type=float, default=30.0,
                        help="frames rendered per second (default: %(default)s)")  # fmt: skip
    parser.add_argument(
        "--seconds", type=float, default=20.0,
        help="measuring time of each variant, after set-up and warm-up (default: %(default)s)",
    )  # fmt: skip
    add_output_flags(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.width, args.height = args.size
    if not 0 < args.fps <= 120:
        parser.error("--fps must be in (0, 120]")
    if args.seconds <= 0 or args.budget < 2 * args.seconds + RESERVE_S + 5:
        parser.error(f"--seconds must be > 0 and --budget >= 2 x --seconds + {RESERVE_S + 5:g}")
    report = Report(args)
    with Run(args, RESERVE_S) as run:
        report.machine, report.errors = run.machine, run.errors
        for variant in VARIANTS:
            try:
                run.budget.check(f"{variant} not run")
                # What is left after this variant's measuring (and the next's) goes to set-up.
                later = args.seconds * (len(VARIANTS) - VARIANTS.index(variant))
                ready_timeout_s = min(READY_TIMEOUT_S, run.budget.left() - later)
                if ready_timeout_s <= 0:
                    raise BenchError("the --budget leaves no time to set it up")
                run.log(f"{variant}: starting sender and receiver, measuring {args.seconds:g} s")
                report.measured[variant] = run_variant(variant, args, ready_timeout_s)
            except BenchError as exc:  # the other variant still runs
                report.errors.append(f"{variant}: {exc}")
                run.log(f"{variant} failed: {exc}")
    return run.finish(render(report), document(report), args.json, complete=True)


if __name__ == "__main__":
    sys.exit(main())
