"""Checks of an arm's motion read from station buses, shared by the station tests.

Tracking error bound, derived rather than picked: the follower is a first-order lag (tau) with
a speed limit, so at leader speed v it trails by about v * tau; the command path adds at most a
tick at each end (leader read, follower tick), v * 2 / rate. With the sweep's worst-case speed
that is ~5.3 degrees at the defaults; 1 degree more covers sensor noise (sigma 0.05).
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass

from services.arm_driver.safety import SafetyConfig
from services.bus import FollowerFrame, JointFrame, Subscriber
from services.sim import SO101_REST, SimFollowerConfig, SimLeaderConfig
from services.sim.leader import SweepMotion

DEFAULTS = SafetyConfig(limits=((0.0, 1.0),))
RATE_HZ = DEFAULTS.rate_hz
PERIOD_S = 1.0 / RATE_HZ
SIM = SimFollowerConfig()
LEADER = SimLeaderConfig()
PEAK_SPEED = SweepMotion(
    LEADER.limits, SO101_REST, LEADER.period_s, LEADER.amplitude
).peak_speed_bound()
TRACKING_BOUND = PEAK_SPEED * (SIM.lag_tau_s + 2 * PERIOD_S) + 1.0
NOISE_SLACK = 8 * SIM.noise_std  # a single noisy reading stays well inside this


@dataclass
class Sample:
    topic: str
    frame: JointFrame | FollowerFrame
    recv_ns: int


def collect(subscribers: Subscriber | list[Subscriber], seconds: float, until=None) -> list[Sample]:
    """Frames received (from one or several buses) for `seconds`, or until `until(sample)`."""
    if isinstance(subscribers, Subscriber):
        subscribers = [subscribers]
    samples = []
    deadline = time.monotonic() + seconds
    while (remaining := deadline - time.monotonic()) > 0:
        wait_ms = min(remaining, 0.1) * 1000 / len(subscribers)
        for subscriber in subscribers:
            first = subscriber.recv(timeout_ms=wait_ms)
            if first is None:
                continue
            # Take everything queued: reading one frame per bus per turn would let a backlog
            # from one stall of this process persist, and skew every later comparison.
            for received in [first, *subscriber.drain()]:
                sample = Sample(received.topic, received.frame, received.recv_ns)
                samples.append(sample)
                if until is not None and until(sample):
                    return samples
    return samples


def followers(samples: list[Sample]) -> list[FollowerFrame]:
    return [s.frame for s in samples if isinstance(s.frame, FollowerFrame)]


def wait_for_state(subscriber: Subscriber, state: str, timeout_s: float) -> list[Sample]:
    samples = collect(
        subscriber,
        timeout_s,
        until=lambda s: isinstance(s.frame, FollowerFrame) and s.frame.state == state,
    )
    seen = [f.state for f in followers(samples)]
    assert seen and seen[-1] == state, f"follower never reached {state!r}; states seen: {set(seen)}"
    return samples


def tracking_errors(samples: list[Sample]) -> list[float]:
    """|leader - follower| for each follower frame, against the latest leader frame read before
    it was measured. Paired by origin time (`t`), not by arrival here, so a late reader cannot
    make tracking look worse or better; both stations must share one clock (one machine)."""
    leader = None
    errors = []
    for sample in sorted(samples, key=lambda s: s.frame.t):
        if sample.topic == "joints.leader":
            leader = sample.frame
        elif leader is not None:
            errors.append(
                max(abs(a - b) for a, b in zip(leader.pos, sample.frame.pos, strict=True))
            )
    return errors


def max_goal_step(frames: list[FollowerFrame]) -> float:
    """Largest goal change between consecutive frames, in units of max_step per elapsed tick."""
    worst = 0.0
    for before, after in itertools.pairwise(frames):
        ticks = max(1.0, (after.t - before.t) / 1e9 / PERIOD_S)
        change = max(abs(a - b) for a, b in zip(before.goal, after.goal, strict=True))
        worst = max(worst, (change - NOISE_SLACK) / (DEFAULTS.max_step * ticks))
    return worst


def follower_segments(frames: list[FollowerFrame]) -> list[list[FollowerFrame]]:
    """Frames split per follower process: a restarted driver starts its `seq` again. Its sim arm
    also starts again from rest (a real arm stays where it is), so motion is judged per run."""
    segments: list[list[FollowerFrame]] = []
    for frame in frames:
        if not segments or frame.src != segments[-1][-1].src or frame.seq <= segments[-1][-1].seq:
            segments.append([])
        segments[-1].append(frame)
    return segments


def commands_out_of_order(frames: list[FollowerFrame]) -> list[tuple[int, int]]:
    """(seq before, seq after) wherever the applied command's seq went back within one follower
    run, unless a restarted leader's stream took over the way the safety rules allow: only
    after the old stream had been silent for `command_timeout`. (Command origin times are no
    use here: the gateway re-dates them with an offset estimate that moves as it improves.)"""
    # The old command was first shown at most a tick after it was applied; the new one cannot
    # be applied earlier than command_timeout after that (a tick of slack for publishing).
    takeover_ns = (DEFAULTS.command_timeout_s - 2 * PERIOD_S) * 1e9
    bad = []
    for segment in follower_segments(frames):
        shown_since = segment[0].t
        for before, after in itertools.pairwise(segment):
            if after.cmd_seq == before.cmd_seq:
                continue
            if 0 <= after.cmd_seq < before.cmd_seq and after.t - shown_since < takeover_ns:
                bad.append((before.cmd_seq, after.cmd_seq))
            shown_since = after.t
    return bad


def max_reengage_step(frames: list[FollowerFrame]) -> float:
    """Largest goal step into and during `ramping`, in units of ramp_step per elapsed tick: <= 1
    means the follower (re)engaged from where it was at ramp speed instead of jumping."""
    worst = 0.0
    for segment in follower_segments(frames):
        for before, after in itertools.pairwise(segment):
            if after.state == "ramping":
                ticks = max(1.0, (after.t - before.t) / 1e9 / PERIOD_S)
                change = max(abs(a - b) for a, b in zip(before.goal, after.goal, strict=True))
                worst = max(worst, (change - NOISE_SLACK) / (DEFAULTS.ramp_step * ticks))
    return worst


def max_goal_step_per_run(frames: list[FollowerFrame]) -> float:
    """max_goal_step over each follower run (see follower_segments), the worst of them."""
    return max((max_goal_step(segment) for segment in follower_segments(frames)), default=0.0)
