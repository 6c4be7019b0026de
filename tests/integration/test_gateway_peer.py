"""Two real aiortc peers on loopback: channels, commands, follower frames, offset, link loss.

Both gateway peers run in this process with ICE restricted to 127.0.0.1 (nothing leaves
loopback). The data channels, SCTP, DTLS and ICE are aiortc's real ones.
"""

from __future__ import annotations

import asyncio
import time

import msgpack
import numpy as np
import pytest
from prometheus_client import REGISTRY

from services.bus.frames import FollowerFrame, JointFrame, VideoFrame
from services.camera.render import ArmPose, ArmRenderer
from services.webrtc_gateway.media import install_encoders
from services.webrtc_gateway.peer import GatewayPeer, PeerConfig, restrict_host_candidates

pytestmark = pytest.mark.integration
MS = 1_000_000


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


async def connected(**robot_kwargs) -> tuple[GatewayPeer, GatewayPeer]:
    restrict_host_candidates(["127.0.0.1"])
    teleop = GatewayPeer(PeerConfig(initiator=True, joint_count=6))
    robot = GatewayPeer(PeerConfig(initiator=False, joint_count=6), **robot_kwargs)
    answer = await robot.accept_offer(await teleop.make_offer())
    await teleop.accept_answer(answer)
    await asyncio.gather(teleop.wait_open(20), robot.wait_open(20))
    return teleop, robot


def joint(seq: int, value: float = 1.0) -> JointFrame:
    return JointFrame(seq, time.time_ns(), "teleop", (value,) * 6)


async def until(condition, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


def test_channels_are_negotiated_with_the_right_reliability() -> None:
    async def scenario() -> None:
        teleop, robot = await connected()
        try:
            for peer in (teleop, robot):
                assert (peer.cmd.ordered, peer.cmd.maxRetransmits) == (False, 0)
                assert (peer.state.ordered, peer.state.maxRetransmits) == (True, None)
                assert peer.cmd.readyState == peer.state.readyState == "open"
        finally:
            await teleop.close()
            await robot.close()

    run(scenario())


def test_commands_cross_with_seq_kept_and_time_on_the_local_clock() -> None:
    received: list[JointFrame] = []

    async def scenario() -> None:
        teleop, robot = await connected(on_command=received.append)
        watchers = [asyncio.ensure_future(p.watch_link()) for p in (teleop, robot)]
        try:
            await until(lambda: robot.monitor.answered)
            sent = [joint(seq, seq / 10) for seq in range(200)]
            for frame in sent:
                teleop.send_command(frame)
                await asyncio.sleep(0.002)
            await until(lambda: len(received) >= 190)  # unreliable: a rare loss is allowed
            by_seq = {frame.seq: frame for frame in sent}
            for frame in received:
                original = by_seq[frame.seq]
                assert frame.pos == original.pos and frame.src == original.src
                # One machine: the estimated offset is ~0, so times agree within a millisecond.
                assert abs(frame.t - original.t) < 1 * MS
            offset = robot.monitor.offset.offset_ns
            print(f"offset estimate on one machine: {offset / 1e6:.3f} ms, "
                  f"RTT {robot.monitor.rtt_ns / 1e6:.3f} ms")  # fmt: skip
            assert abs(offset) < 1 * MS
        finally:
            for task in watchers:
                task.cancel()
            await teleop.close()
            await robot.close()

    run(scenario())


def test_commands_are_dropped_until_the_clock_offset_is_known() -> None:
    received: list[JointFrame] = []

    async def scenario() -> None:
        teleop, robot = await connected(on_command=received.append)
        try:  # no watch_link on the robot: it never pings, so it never learns the offset
            for seq in range(20):
                teleop.send_command(joint(seq))
            await until(lambda: robot.commands_dropped >= 15)
            assert received == []
        finally:
            await teleop.close()
            await robot.close()

    run(scenario())


def test_follower_frames_come_back_on_the_reliable_channel() -> None:
    got: list[FollowerFrame] = []

    async def scenario() -> None:
        restrict_host_candidates(["127.0.0.1"])
        teleop = GatewayPeer(PeerConfig(initiator=True, joint_count=6), on_follower=got.append)
        robot = GatewayPeer(PeerConfig(initiator=False, joint_count=6))
        await teleop.accept_answer(await robot.accept_offer(await teleop.make_offer()))
        await asyncio.gather(teleop.wait_open(20), robot.wait_open(20))
        try:
            frames = [
                FollowerFrame(n, time.time_ns(), "robot", (0.5,) * 6, (0.4,) * 6, "tracking", n, 7)
                for n in range(50)
            ]
            for frame in frames:
                robot.send_follower(frame)
            await until(lambda: len(got) == 50)
            assert got == frames  # reliable and ordered: every frame, in order
        finally:
            await teleop.close()
            await robot.close()

    run(scenario())


def test_garbage_on_the_command_channel_is_dropped_and_counted() -> None:
    received: list[JointFrame] = []

    def dropped(reason: str) -> float:
        labels = {"stream": "dc.cmd", "reason": reason}
        return REGISTRY.get_sample_value("rdv_frames_dropped_total", labels) or 0.0

    async def scenario() -> None:
        teleop, robot = await connected(on_command=received.append)
        watchers = [asyncio.ensure_future(p.watch_link()) for p in (teleop, robot)]
        try:
            await until(lambda: robot.monitor.answered)
            before = {r: dropped(r) for r in ("malformed", "non_finite", "length", "too_large")}
            bad_nan = {"v": 1, "seq": 1, "t": time.time_ns(), "src": "x", "pos": [float("nan")] * 6}
            bad_len = {**bad_nan, "pos": [0.0] * 5}
            teleop.cmd.send(b"\x00garbage")
            teleop.cmd.send(msgpack.packb(bad_nan))
            teleop.cmd.send(msgpack.packb(bad_len))
            teleop.cmd.send(b"\x80" * 5000)
            teleop.send_command(joint(99))  # a good one after the garbage still arrives
            await until(lambda: len(received) == 1)
            assert received[0].seq == 99
            for reason in before:
                assert dropped(reason) == before[reason] + 1, reason
        finally:
            for task in watchers:
                task.cancel()
            await teleop.close()
            await robot.close()

    run(scenario())


def test_a_hung_peer_is_declared_lost_within_the_horizon() -> None:
    async def scenario() -> None:
        teleop, robot = await connected()
        robot_watch = asyncio.ensure_future(robot.watch_link())
        try:
            watch = asyncio.ensure_future(teleop.watch_link())
            await until(lambda: teleop.monitor.answered)
            robot.answer_pings = False  # the robot hangs: no more pongs
            hung_at = time.monotonic()
            reason = await asyncio.wait_for(watch, 5)
            lost_after_s = time.monotonic() - hung_at
            print(f"hung peer declared lost after {lost_after_s * 1000:.0f} ms")
            assert reason == "link_lost"
            # The horizon is 500 ms after the last pong, and the last pong came at most one
            # ping interval before the hang; 150 ms more absorbs scheduling on 2 loaded cores.
            assert lost_after_s <= 0.5 + 0.15, lost_after_s
        finally:
            robot_watch.cancel()
            await teleop.close()
            await robot.close()

    run(scenario())


async def video_pair(codec: str) -> tuple[GatewayPeer, GatewayPeer, list]:
    restrict_host_candidates(["127.0.0.1"])
    install_encoders()
    decoded: list = []
    teleop = GatewayPeer(
        PeerConfig(initiator=True, cameras=("front",), video_codec=codec),
        on_video=lambda camera, frame: decoded.append((camera, frame)),
    )
    robot = GatewayPeer(PeerConfig(initiator=False, cameras=("front",)))
    answer = await robot.accept_offer(await teleop.make_offer())
    await teleop.accept_answer(answer)
    await asyncio.gather(teleop.wait_open(20), robot.wait_open(20))
    return teleop, robot, decoded


@pytest.mark.parametrize("codec", ["vp8", "h264"])
def test_camera_frames_arrive_decoded_with_their_capture_times(codec: str) -> None:
    renderer = ArmRenderer(640, 480, "front")
    sent: list[np.ndarray] = []

    async def scenario() -> None:
        teleop, robot, decoded = await video_pair(codec)
        watchers = [asyncio.ensure_future(p.watch_link()) for p in (teleop, robot)]
        try:
            await until(lambda: teleop.monitor.answered)
            assert list(robot.camera_tracks) == ["front"]
            for n in range(90):  # 3 s at 30 fps, a moving arm
                image = renderer.render(ArmPose(shoulder_pan=n - 45.0), time.time_ns(), n)
                sent.append(image)
                robot.send_video("front", VideoFrame(n, time.time_ns(), "robot", 640, 480,
                                                     "bgr24", image.tobytes()))  # fmt: skip
                await asyncio.sleep(1 / 30)
            await until(lambda: len(decoded) >= 80, 20)
            camera, last = decoded[-1]
            assert camera == "front" and (last.width, last.height) == (640, 480)
            picture = last.to_ndarray(format="bgr24").astype(int)
            # Lossy, but the same picture: closest to one of the last frames sent, not others.
            errors = [np.abs(picture - image).mean() for image in sent]
            assert min(errors) < 4.0, min(errors)
            assert int(np.argmin(errors)) >= len(sent) - 5
            # The receive path keeps RTP timestamps, so capture times find their frames.
            latencies = list(teleop.video_latency_ns)
            assert len(latencies) >= 0.9 * len(decoded), (len(latencies), len(decoded))
            assert all(0 < ns < 1_000_000_000 for ns in latencies)
            print(f"{codec}: {len(decoded)} frames decoded, glass-to-glass p50 "
                  f"{sorted(latencies)[len(latencies) // 2] / MS:.1f} ms")  # fmt: skip
        finally:
            for watcher in watchers:
                watcher.cancel()
            await teleop.close()
            await robot.close()

    run(scenario())


def test_a_busy_encoder_gets_the_newest_frame_never_a_backlog() -> None:
    async def scenario() -> None:
        teleop, robot, decoded = await video_pair("vp8")
        try:
            track = robot.camera_tracks["front"]
            image = np.zeros((480, 640, 3), np.uint8)
            for n in range(50):  # a burst, faster than any encoder
                robot.send_video("front", VideoFrame(n, time.time_ns(), "robot", 640, 480,
                                                     "bgr24", image.tobytes()))  # fmt: skip
            await until(lambda: len(decoded) >= 1, 20)
            await asyncio.sleep(0.5)
            assert track.frames_replaced >= 45  # replaced while waiting, not queued
            assert len(decoded) <= 3
        finally:
            await teleop.close()
            await robot.close()

    run(scenario())
