"""WebRTC gateway process: joins this station's bus to the peer station over aiortc.

Driven by the session manager: `session.control {connect}` starts a peer (the teleop offers,
the robot answers), SDP travels only through the session manager's signed signaling
(`session.status`/`session.control {signal}`), and `connected` / `closed` go back on
`session.status`. Teleop: `joints.leader` -> `cmd` channel; `joints.follower` <- `state`.
Robot: `cmd` -> `joints.command` (time on the robot's clock); `joints.follower` -> `state`.
On link loss it reports `closed` and stops forwarding, so the follower's deadman holds the arm.
One asyncio loop; bus sockets are watched through their file descriptors. It must never
forward a command it could not validate or date.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import statistics
import sys
import time
from typing import Any

from aiortc import RTCIceServer

from services import clock, exits, metrics
from services.bus import (
    BusConfigError,
    FollowerFrame,
    JointFrame,
    MessageFrame,
    Publisher,
    Subscriber,
    VideoFrame,
    load_bus_map,
)
from services.bus.health import HealthBeat
from services.camera.config import CAMERAS_ENV, camera_names, cameras_from_env
from services.logs import setup_logging
from services.service_flags import add_station_flags
from services.webrtc_gateway.media import CODEC_MIME, check_aiortc, install_encoders
from services.webrtc_gateway.peer import GatewayPeer, PeerConfig, restrict_host_candidates
from services.webrtc_gateway.viewer import Viewer, ViewerState

PROCESS = "gateway"
EXIT_CONFIG = 78
VIEWER_PORT = 8080


def station_offset() -> int:
    """demo.conf's second station serves its page this many ports up, like its metrics."""
    return int(os.environ.get("RDV_STATION_PORT_OFFSET") or 0)


log = logging.getLogger("rdv.gateway")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m services.webrtc_gateway",
        description="Connect this station to its paired peer over WebRTC, as the session "
        "manager directs: leader joints out (teleop) or commands in (robot), follower state "
        "back, link loss detected within 500 ms.",
    )
    parser.add_argument("--role", choices=("robot", "teleop"), required=True,
                        help="which side this station is (no default: give it)")  # fmt: skip
    parser.add_argument(
        "--ice-host",
        action="append",
        default=None,
        help="offer only this local address as an ICE host candidate; repeat for more; "
        "127.0.0.1 keeps two stations on one machine on loopback (default: $RDV_ICE_HOSTS, "
        "comma-separated, else every interface)",
    )
    parser.add_argument(
        "--ice-server",
        action="append",
        default=None,
        help="STUN/TURN URL such as turn:turn.example:3478; repeat for more "
        "(default: $RDV_ICE_SERVERS, comma-separated, else none, so nothing is contacted unasked)",
    )
    parser.add_argument(
        "--ice-username",
        default=os.environ.get("RDV_ICE_USERNAME"),
        help="TURN username (default: $RDV_ICE_USERNAME, else none)",
    )
    parser.add_argument(
        "--ice-credential",
        default=os.environ.get("RDV_ICE_CREDENTIAL"),
        help="TURN password (default: $RDV_ICE_CREDENTIAL)",
    )
    parser.add_argument(
        "--cameras",
        default=",".join(camera_names(cameras_from_env())),
        help="robot: comma-separated cameras to stream, as the camera service publishes them "
        f"(default: the names in ${CAMERAS_ENV}, else none)",
    )
    parser.add_argument(
        "--video-codec",
        choices=sorted(CODEC_MIME),
        default=os.environ.get("RDV_VIDEO_CODEC", "vp8"),
        help="teleop: the codec asked of the robot's cameras (default: $RDV_VIDEO_CODEC or "
        "%(default)s)",
    )
    parser.add_argument(
        "--viewer-host",
        default=os.environ.get("RDV_VIEWER_HOST", "127.0.0.1"),
        help="address of the viewer page; any non-loopback address requires the access token "
        "printed in its URL (default: $RDV_VIEWER_HOST or %(default)s)",
    )
    parser.add_argument(
        "--viewer-port",
        type=int,
        default=int(os.environ.get("RDV_VIEWER_PORT") or VIEWER_PORT + station_offset()),
        help="port of the viewer page, plus $RDV_PORT_OFFSET; 0 turns the page off (default: "
        "$RDV_VIEWER_PORT, else %(default)s)",
    )
    parser.add_argument(
        "--connect-timeout",
        type=float,
        default=10.0,
        help="seconds from the session's start until the channels must be open "
        "(default: %(default)s)",
    )
    add_station_flags(parser)
    return parser


class Gateway:
    def __init__(self, args: argparse.Namespace, bus: Any) -> None:
        self.args = args
        self.role = args.role
        topics = [
            "session.control",
            "joints.leader" if self.role == "teleop" else "joints.follower",
        ]
        if self.role == "robot":
            topics.append("health")  # the follower's control latency, for both viewer pages
        self.subscriber = Subscriber(bus, topics)
        self.view = ViewerState(role=self.role, station=args.station)
        self.viewer: Viewer | None = None
        self.video_seen: dict[str, tuple[int, float]] = {}
        self.cameras = tuple(name for name in args.cameras.split(",") if name)
        self.video: Subscriber | None = None
        if self.role == "robot" and self.cameras:
            # Its own socket, with the video queue bound: a backlog of frames is latency.
            self.video = Subscriber(bus, ["video.*"], recv_hwm=bus.video_hwm)
        self.publisher = Publisher(bus, PROCESS)
        self.health = HealthBeat(self.publisher, args.station, PROCESS)
        self.ice_servers = [
            RTCIceServer(urls=url, username=args.ice_username, credential=args.ice_credential)
            for url in args.ice_server
        ]
        self.peer: GatewayPeer | None = None
        self.session: str | None = None
        self.said: dict[str, Any] | None = None  # our offer/answer for the current session
        self.tasks: set[asyncio.Task] = set()  # held so the loop cannot drop them mid-flight
        self.answer: asyncio.Future | None = None
        self.offer: asyncio.Future | None = None
        self.stop = asyncio.Event()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_reader(self.subscriber.fd, self.on_bus)
        loop.call_soon(self.on_bus)  # messages queued before the reader was added
        if self.video is not None:
            loop.add_reader(self.video.fd, self.on_video_bus)
        self.start_viewer(loop)
        try:
            while not self.stop.is_set():
                self.refresh_view()
                self.health.maybe_send(
                    role=self.role,
                    viewer=self.viewer.url if self.viewer else None,
                    state="live" if self.is_open() else "idle",
                    session=self.session,
                    rtt_ms=self.rtt_ms(),
                )
                await asyncio.sleep(0.2)
        finally:
            loop.remove_reader(self.subscriber.fd)
            if self.video is not None:
                loop.remove_reader(self.video.fd)
                self.video.close()
            await self.end_session("gateway stopping", report=True)
            if self.viewer is not None:
                await self.viewer.close()
            self.subscriber.close()
            self.publisher.close()

    # --- bus -------------------------------------------------------------------------------

    def on_bus(self) -> None:
        # The ZeroMQ fd is edge-triggered: read until nothing is pending, every time.
        while self.subscriber.pending():
            for received in self.subscriber.drain(limit=100):
                self.on_frame(received.topic, received.frame)

    def on_video_bus(self) -> None:
        assert self.video is not None
        while self.video.pending():
            latest: dict[str, VideoFrame] = {}
            for received in self.video.drain(limit=100):
                if isinstance(received.frame, VideoFrame):
                    latest[received.topic.removeprefix("video.")] = received.frame
            if self.peer is not None:
                for camera, frame in latest.items():
                    self.peer.send_video(camera, frame)

    def on_frame(self, topic: str, frame: Any) -> None:
        if topic == "session.control" and isinstance(frame, MessageFrame):
            self.on_control(frame.fields)
        elif topic == "joints.leader" and isinstance(frame, JointFrame):
            if self.peer:
                self.peer.send_command(frame)
            self.show(leader=list(frame.pos))
        elif topic == "joints.follower" and isinstance(frame, FollowerFrame):
            if self.peer:
                self.peer.send_follower(frame)
            self.show(follower=list(frame.pos), follower_state=frame.state)
        elif topic == "health" and isinstance(frame, MessageFrame):
            control_ms = frame.fields.get("control_ms")
            if frame.fields.get("role") == "follower" and isinstance(control_ms, (int, float)):
                self.show(control_ms=float(control_ms))
                if self.peer:
                    self.peer.send_telemetry({"control_ms": float(control_ms)})

    def on_control(self, event: dict[str, Any]) -> None:
        name, session = event.get("event"), event.get("session")
        if name == "connect" and isinstance(session, str):
            # A repeated connect while still connecting: the session manager may have missed our
            # offer/answer (it restarted, or subscribed late). Say it again; `said` may be a
            # superseded session's, set after this one began, so its session is checked.
            said = self.said
            repeat = session == self.session and said and said["session"] == session
            if repeat and not self.is_open():
                self.say(**said)
            if session != self.session:
                # Set up synchronously: the peer's offer may be the very next bus frame.
                old_peer, self.peer = self.peer, None
                loop = asyncio.get_running_loop()
                self.session, self.said = session, None
                self.offer, self.answer = loop.create_future(), loop.create_future()
                initiator = bool(event.get("initiator"))
                cameras = self.cameras
                if self.role == "teleop":
                    offered = event.get("peer_cameras")
                    cameras = tuple(c for c in offered if isinstance(c, str)) if isinstance(
                        offered, list) else ()  # fmt: skip
                self.show(session_state="connecting", peer=event.get("peer"), cameras=cameras)
                self.spawn(self.start_session(session, initiator, cameras, old_peer))
        elif name == "disconnect" and session == self.session:
            # `only`: this runs later, when a `connect` queued behind this event (a gateway
            # resuming from a pause reads both at once) may already have started the next session.
            self.spawn(self.end_session(f"session ended: {event.get('reason')}", only=session))
        elif name == "estop" and self.role == "teleop":
            self.estop(str(event.get("by", "teleop bus"))[:100])  # `rdv estop` on this station
        elif name == "signal" and session == self.session and isinstance(event.get("sdp"), str):
            waiting = self.offer if event.get("kind") == "signal.offer" else self.answer
            if waiting is not None and not waiting.done():
                waiting.set_result(event["sdp"])

    def is_open(self) -> bool:
        return self.peer is not None and self.peer.monitor is not None

    def rtt_ms(self) -> float | None:
        monitor = self.peer.monitor if self.peer is not None else None
        return None if monitor is None or monitor.rtt_ns is None else monitor.rtt_ns / 1e6

    def spawn(self, coroutine: Any) -> None:
        task = asyncio.ensure_future(coroutine)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def say(self, **fields: Any) -> None:
        frame = MessageFrame(self.publisher.next_seq(), clock.now_ns(), self.args.station, fields)
        self.publisher.send("session.status", frame)

    # --- sessions --------------------------------------------------------------------------

    async def start_session(
        self,
        session: str,
        initiator: bool,
        cameras: tuple[str, ...],
        old_peer: GatewayPeer | None,
    ) -> None:
        if old_peer is not None:
            await old_peer.close()
        config = PeerConfig(
            initiator=initiator,
            ice_servers=self.ice_servers,
            cameras=cameras,
            video_codec=self.args.video_codec,
        )
        peer = GatewayPeer(
            config,
            on_command=self.forward_command,
            on_follower=self.forward_follower,
            on_video=self.viewer.on_video if self.viewer else lambda _camera, _frame: None,
            on_estop=self.estop_from_peer,
            on_telemetry=lambda figures: self.show(**figures),
        )
        if self.session != session:  # superseded while the old peer was closing
            await peer.close()
            return
        self.peer = peer
        log.info("session %s: connecting (%s)", session, "offering" if initiator else "answering")

        async def connect() -> None:
            if initiator:
                offer = await peer.make_offer()
                self.said = dict(event="signal", kind="signal.offer", session=session, sdp=offer)
                self.say(**self.said)
                await peer.accept_answer(await self.answer)
            else:
                answer = await peer.accept_offer(await self.offer)
                self.said = dict(event="signal", kind="signal.answer", session=session, sdp=answer)
                self.say(**self.said)
            await peer.wait_open(self.args.connect_timeout)

        try:
            await asyncio.wait_for(connect(), self.args.connect_timeout)
        except (asyncio.TimeoutError, ValueError) as exc:
            if self.peer is peer:
                log.warning("session %s: could not connect (%s)", session, exc or "time-out")
                await self.end_session("connect failed", report=True, status="failed")
            else:
                await peer.close()
            return
        if self.peer is not peer:  # ended or replaced while connecting
            await peer.close()
            return
        self.say(event="connected", session=session)
        log.info("session %s: live", session)
        self.show(session_state="live")
        if self.viewer is not None and self.role == "teleop":
            log.info("Open %s to watch", self.viewer.url)
        reason = await peer.watch_link()
        if self.peer is peer:
            log.warning("session %s: %s", session, reason)
            await self.end_session(reason, report=True)

    async def end_session(
        self, why: str, *, report: bool = False, status: str = "closed", only: str | None = None
    ) -> None:
        if only is not None and self.session != only:
            return  # that session is already over, and a newer one must not be ended for it
        peer, session = self.peer, self.session
        self.peer, self.session = None, None
        if peer is None:
            return
        if report and session is not None:
            self.say(event=status, session=session, reason=why)
        log.info("session %s closed: %s", session, why)
        self.show(session_state="link lost" if why == "link_lost" else "searching", peer=None,
                  rtt_ms=None, video_ms={}, fps={})  # fmt: skip
        await peer.close()

    def forward_command(self, frame: JointFrame) -> None:
        """Robot side: a validated command, its time on our clock, onto the station bus."""
        self.publisher.send("joints.command", frame)
        self.show(leader=list(frame.pos))

    def forward_follower(self, frame: FollowerFrame) -> None:
        """Teleop side: the robot's follower state onto this station's bus."""
        self.publisher.send("joints.follower", frame)
        self.show(follower=list(frame.pos), follower_state=frame.state)

    # --- emergency stop ----------------------------------------------------------------------

    def estop(self, by: str) -> str:
        """Latch the follower's stop: on the robot's own bus, or over the link to the robot."""
        if self.role == "robot":
            self.control(event="estop", by=by)
            return "stop latched on this robot station; re-arm here when it is safe"
        if self.peer is not None and self.peer.send_estop(by):
            note = f"stop sent to {self.view.peer}; the follower state shows when it holds"
        else:
            note = ("NOT DELIVERED: no live link to a robot. A lost link already makes the "
                    "follower hold; use `rdv estop` on the robot station to latch it")  # fmt: skip
        if note != self.view.estop_note:  # senders repeat a stop: say each outcome once
            log.warning("emergency stop from %s: %s", by, note)
        self.show(estop_note=note)
        return note

    def estop_from_peer(self, by: str) -> None:
        if self.view.follower_state != "estop":
            log.warning("emergency stop from the paired teleop (%s)", by)
        self.control(event="estop", by=f"peer {self.view.peer} ({by})")

    def rearm(self, by: str) -> str:
        self.control(event="rearm", by=by)
        self.show(estop_note=None)
        return "re-arm sent; the follower ramps to the leader from where it is"

    def control(self, **fields: Any) -> None:
        frame = MessageFrame(self.publisher.next_seq(), clock.now_ns(), self.args.station, fields)
        self.publisher.send("session.control", frame)

    # --- viewer page -------------------------------------------------------------------------

    def start_viewer(self, loop: asyncio.AbstractEventLoop) -> None:
        if self.args.viewer_port == 0:
            return
        port = self.args.viewer_port + int(os.environ.get("RDV_PORT_OFFSET") or 0)
        try:
            self.viewer = Viewer(self.view, self.args.viewer_host, port, loop, self.estop,
                                 self.rearm if self.role == "robot" else None)  # fmt: skip
        except OSError as exc:  # the page is a convenience: control must run without it
            log.error("viewer page not served on %s:%d: %s", self.args.viewer_host, port, exc)
            return
        self.viewer.start()
        log.info("viewer page on %s", self.viewer.url)

    def show(self, **fields: Any) -> None:
        """Update what the page shows (kept without a page too: the e-stop reads it)."""
        if self.viewer is not None:
            self.viewer.update(**fields)  # under the page threads' lock
        else:
            for key, value in fields.items():
                setattr(self.view, key, value)

    def refresh_view(self) -> None:
        """Figures the page shows that change by themselves: RTT, video latency and rate."""
        peer = self.peer
        if self.viewer is None or peer is None or peer.monitor is None:
            return
        now = time.monotonic()
        fps = dict(self.view.fps)
        for camera, count in self.viewer.frames.items():
            before, then = self.video_seen.setdefault(camera, (count, now))
            if now - then >= 1.0:  # a whole second: 0.2 s windows would jitter by 5 fps
                fps[camera] = (count - before) / (now - then)
                self.video_seen[camera] = (count, now)
        self.show(
            rtt_ms=self.rtt_ms(),
            video_ms={
                camera: statistics.median(recent) / 1e6
                for camera, recent in peer.recent_video_latency_ns.items()
                if recent
            },
            fps=fps,
        )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    setup_logging(args.log_level, PROCESS)
    try:
        check_aiortc()
    except RuntimeError as exc:
        log.error("%s", exc)
        return EXIT_CONFIG
    install_encoders()
    hosts = args.ice_host or [h for h in os.environ.get("RDV_ICE_HOSTS", "").split(",") if h]
    if hosts:
        restrict_host_candidates(hosts)
    # Under supervisord (deploy/*.conf) the environment is how a station is given its servers.
    servers = os.environ.get("RDV_ICE_SERVERS", "")
    args.ice_server = args.ice_server or [url for url in servers.split(",") if url]
    try:
        bus = load_bus_map(args.bus_config, run_dir=args.run_dir)
    except BusConfigError as exc:
        log.error("%s", exc)
        return EXIT_CONFIG
    metrics.serve_metrics(args.metrics_port or bus.metrics_port(PROCESS))

    async def serve() -> None:
        gateway = Gateway(args, bus)
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, gateway.stop.set)
        await gateway.run()

    try:
        asyncio.run(serve())
    except BusConfigError as exc:  # its bus endpoint cannot be bound (run dir, port)
        log.error("%s", exc)
        return EXIT_CONFIG
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(exits.final(main()))
