"""The fault suite's motion checks (tests/support/arm_checks.py) catch what they are for.

Synthetic follower timelines: each check must pass a legal one and flag the fault it exists to
catch, or a fault case could pass while the follower misbehaves.
"""

from __future__ import annotations

from services.bus import FollowerFrame
from tests.support.arm_checks import (
    DEFAULTS,
    commands_out_of_order,
    follower_segments,
    max_goal_step_per_run,
    max_reengage_step,
)

TICK_NS = 10_000_000


def timeline(spec: list[tuple[str, int, float]], *, src: str = "robot", seq0: int = 0):
    """(state, applied cmd seq, goal of joint 0) per tick -> follower frames."""
    return [
        FollowerFrame(seq0 + i, i * TICK_NS, src, (goal,), (goal,), state, cmd, i * TICK_NS)
        for i, (state, cmd, goal) in enumerate(spec)
    ]


def test_a_leader_restart_may_take_over_only_after_command_timeout() -> None:
    dead_ticks = round(DEFAULTS.command_timeout_s / 0.01)
    legal = timeline(
        [("tracking", 100, 0.0), ("tracking", 101, 0.0)]
        + [("stale", 101, 0.0)] * dead_ticks
        + [("ramping", 3, 0.0)]
    )
    assert commands_out_of_order(legal) == []
    reordered = timeline([("tracking", 100, 0.0), ("tracking", 101, 0.0), ("tracking", 99, 0.0)])
    assert commands_out_of_order(reordered) == [(101, 99)]
    too_early = timeline([("tracking", 100, 0.0), ("tracking", 101, 0.0), ("ramping", 3, 0.0)])
    assert commands_out_of_order(too_early) == [(101, 3)]


def test_a_restarted_follower_starts_a_new_run() -> None:
    first = timeline([("tracking", 5, 10.0), ("tracking", 6, 10.5)], seq0=500)
    second = timeline([("waiting", -1, 0.0), ("ramping", 7, 1.0)], seq0=0)
    runs = follower_segments(first + second)
    assert [len(run) for run in runs] == [2, 2]
    # The sim arm of a new driver starts at rest: no jump is counted across runs...
    assert max_goal_step_per_run(first + second) <= 1.0
    # ...but a jump inside one run is.
    jump = timeline([("tracking", 5, 10.0), ("tracking", 6, 10.0 + 3 * DEFAULTS.max_step)])
    assert max_goal_step_per_run(jump) > 1.0


def test_reengaging_faster_than_the_ramp_is_flagged() -> None:
    step = DEFAULTS.ramp_step
    ramp = timeline([("stale", 1, 0.0), ("ramping", 2, step), ("ramping", 3, 2 * step)])
    assert max_reengage_step(ramp) <= 1.0
    lunge = timeline([("stale", 1, 0.0), ("ramping", 2, 3 * step)])
    assert max_reengage_step(lunge) > 1.0
