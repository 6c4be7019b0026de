"""The session state machine of one station, robot or teleop side, as pure logic.

Inputs are events (verified inbox messages, gateway status, the discovery board, the clock);
outputs are `Actions` for the caller to carry out (messages to send, bus events, presence to
republish). It owns no I/O and reads no clock. Every state has a time-out; a robot serves one
session at a time, and races resolve at the robot. It must never pair across owners or with a
robot whose joints differ from the leader's.
"""

from __future__ import annotations

import logging
import random
import uuid
from dataclasses import dataclass, field
from typing import Any

from services.session_manager.presence import Presence, PresenceBoard

log = logging.getLogger(__name__)
STATES = ("idle", "requesting", "paired", "live")
OUTCOMES = ("ended", "peer_lost", "timeout", "gateway_closed", "gateway_failed", "rejected")


@dataclass(frozen=True)
class Timeouts:
    requesting_s: float = 3.0  # no answer to a request
    paired_s: float = 15.0  # paired, the gateway has not connected yet
    retry_s: float = 0.5  # a teleop that found no robot, or lost a race, tries again after this


@dataclass
class Send:
    kind: str
    to: str
    body: dict[str, Any]


@dataclass
class Actions:
    sends: list[Send] = field(default_factory=list)
    bus: list[dict[str, Any]] = field(default_factory=list)  # session.control events
    presence_changed: bool = False
    outcome: str | None = None  # set when a session ended, for rdv_sessions_total

    def extend(self, other: Actions) -> None:
        self.sends += other.sends
        self.bus += other.bus
        self.presence_changed |= other.presence_changed
        self.outcome = other.outcome or self.outcome


class SessionMachine:
    def __init__(
        self,
        me: str,
        role: str,
        joints: tuple[str, ...],
        *,
        inbox: str,
        peer: str | None = None,
        timeouts: Timeouts | None = None,
        rng: random.Random | None = None,
    ) -> None:
        if role not in ("robot", "teleop"):
            raise ValueError(f"role must be robot or teleop, got {role!r}")
        self.me = me
        self.role = role
        self.joints = joints
        self.inbox = inbox
        self.wanted_peer = peer
        self.timeouts = timeouts or Timeouts()
        self.rng = rng or random.Random()
        self.state = "idle"
        self.session: str | None = None
        self.peer: str | None = None
        self.last_partner: str | None = None
        self._deadline: float | None = None
        self._live_since = 0.0
        self._corr: str | None = None
        self._candidates: list[str] = []
        self._retry_at = 0.0
        self._empty_look_at: float | None = None  # when the last look found no robot

    @property
    def busy(self) -> bool:
        """In a session (paired or live); a teleop that is only asking is still free."""
        return self.state in ("paired", "live")

    # --- events -------------------------------------------------------------------------------

    def on_tick(self, now: float, board: PresenceBoard) -> Actions:
        actions = Actions()
        if self.state in ("paired", "live") and self._peer_gone(board, now):
            return self._end(now, "peer_lost", notify=False)
        if self._deadline is not None and now >= self._deadline:
            if self.state == "requesting":
                log.info("no answer from %s; trying the next robot", self._candidates[:1])
                return self._next_candidate(now, board)
            return self._end(now, "timeout", notify=True)
        if self.role == "teleop" and self.state == "idle" and now >= self._retry_at:
            self._candidates = self._rank_candidates(now, board)
            if self._candidates:
                self._empty_look_at = None
                actions.extend(self._request(now))
            else:
                self._retry_at = now + self.timeouts.retry_s
                self._empty_look_at = now  # a robot arriving may cut this wait short
        return actions

    def robot_became_free(self, presence: Presence) -> None:
        """A robot that suits this teleop just came online or became free: look again at the
        next tick instead of waiting out the idle retry (no robot was there when it last
        looked). Only after an empty look, so racing teleops keep their spread-out retries."""
        if self.role != "teleop" or self.state != "idle" or self._empty_look_at is None:
            return
        if self._suits(presence):
            self._retry_at = min(self._retry_at, self._empty_look_at)

    def _peer_gone(self, board: PresenceBoard, now: float) -> bool:
        """Whether the peer's presence says the session is over.

        Paired, the link is not up yet: a peer whose presence is not fresh and online is given
        up. Live, the gateways' ping/pong is the authority on the peer, and presence is only
        believed when it cannot be an artefact of the broker: stale presence means no refresh
        reached us (broker down, the peer's session manager paused), and `offline` may be the
        peer's Last Will published by a broker that is shutting down (Mosquitto 2 sends every
        will when it stops) or a will retained from before. Either way ending would cut a
        working link. What ends a live session is presence sent after it went live that is
        online and not in this session (the peer's session manager restarted and forgot it),
        presence removed, `session.end`, or the gateway reporting the link closed.
        """
        assert self.peer is not None
        status = board.status(self.peer, now)
        if self.state != "live":
            return status != "online"
        if status == "unknown":
            return True
        sighting = board.stations[self.peer]
        presence = sighting.presence
        return (
            presence.status == "online"
            and sighting.received_s > self._live_since
            and presence.session != self.session
        )

    def on_message(self, kind: str, sender: str, body: dict[str, Any], now: float,
                   board: PresenceBoard) -> Actions:  # fmt: skip
        """A verified inbox message (signature, freshness and replay already checked)."""
        session = body.get("session")
        if kind == "session.request" and self.role == "robot":
            return self._on_request(sender, body, now, board)
        if kind in ("session.accept", "session.reject") and self.role == "teleop":
            current = self.state == "requesting" and sender == self._candidate
            if not current or session != self.session:
                ours = sender == self.peer and session == self.session
                if kind == "session.accept" and isinstance(session, str) and not ours:
                    # A robot accepted a request this teleop gave up on: free it now, rather
                    # than leave it waiting out its paired time-out.
                    body = {"session": session, "reason": "abandoned"}
                    return Actions(sends=[Send("session.end", sender, body)])
                return Actions()
            if body.get("corr") != self._corr:
                return Actions()
            if kind == "session.accept":
                return self._pair(sender, now, board)
            log.info("robot %s refused: %s", sender, body.get("reason"))
            return self._next_candidate(now, board)
        if kind == "session.end" and sender == self.peer and session == self.session:
            return self._end(now, "ended", notify=False)
        if kind.startswith("signal.") and sender == self.peer and session == self.session:
            # body first: a body field named "event" or "kind" must not rename the bus event.
            return Actions(bus=[{**body, "event": "signal", "kind": kind}])
        return Actions()

    def on_gateway(self, event: dict[str, Any], now: float) -> Actions:
        """A session.status event from this station's gateway."""
        if event.get("session") != self.session or self.session is None:
            return Actions()
        name = event.get("event")
        if name == "connected" and self.state == "paired":
            self.state = "live"
            self._deadline = None
            self._live_since = now
            log.info("session %s live with %s", self.session, self.peer)
            return Actions(presence_changed=True)
        if name in ("closed", "failed") and self.state in ("paired", "live"):
            return self._end(now, f"gateway_{name}", notify=True)
        if name == "signal" and self.peer is not None:
            kind = event.get("kind")
            if kind in ("signal.offer", "signal.answer") and isinstance(event.get("sdp"), str):
                body = {"session": self.session, "sdp": event["sdp"]}
                return Actions(sends=[Send(kind, self.peer, body)])
        return Actions()

    def shutdown(self, now: float) -> Actions:
        """Clean stop: tell the peer, so it does not wait for our presence to go stale."""
        if self.state in ("paired", "live"):
            return self._end(now, "ended", notify=True)
        return Actions()

    # --- robot side ---------------------------------------------------------------------------

    def _on_request(self, sender: str, body: dict[str, Any], now: float,
                    board: PresenceBoard) -> Actions:  # fmt: skip
        session, corr = body.get("session"), body.get("corr")
        if not isinstance(session, str) or not isinstance(corr, str):
            return Actions()
        reply = {"session": session, "corr": corr}
        if self.state != "idle":
            if sender == self.peer and session == self.session:
                return Actions(sends=[Send("session.accept", sender, reply)])  # a repeated ask
            return Actions(sends=[Send("session.reject", sender, {**reply, "reason": "busy"})])
        joints = body.get("joints")
        if not isinstance(joints, list) or tuple(joints) != self.joints:  # 5 -> TypeError
            return Actions(sends=[Send("session.reject", sender, {**reply, "reason": "joints"})])
        sighting = board.stations.get(sender)
        if sighting is not None and sighting.presence.role != "teleop":
            # Only a teleop may drive this arm; another robot signing a request may not.
            return Actions(sends=[Send("session.reject", sender, {**reply, "reason": "role"})])
        if board.status(sender, now) != "online":
            # Pairing with a station whose presence we cannot see would end at once (peer_lost).
            reject = {**reply, "reason": "not_ready"}
            return Actions(sends=[Send("session.reject", sender, reject)])
        self.session = session
        actions = self._pair(sender, now, board)
        actions.sends.insert(0, Send("session.accept", sender, reply))
        return actions

    # --- teleop side --------------------------------------------------------------------------

    @property
    def _candidate(self) -> str | None:
        return self._candidates[0] if self._candidates else None

    def _rank_candidates(self, now: float, board: PresenceBoard) -> list[str]:
        robots = board.online(now, role="robot")
        usable = [
            station
            for station, presence in robots.items()
            if self._suits(presence) and (self.wanted_peer in (None, station))
        ]
        self.rng.shuffle(usable)  # racing teleops spread over the free robots
        if self.last_partner in usable:
            usable.remove(self.last_partner)
            usable.insert(0, self.last_partner)
        return usable

    def _suits(self, presence: Presence) -> bool:
        return not presence.busy and presence.joints == self.joints

    def _request(self, now: float) -> Actions:
        self.state = "requesting"
        self.session = uuid.uuid4().hex
        self._corr = uuid.uuid4().hex
        self._deadline = now + self.timeouts.requesting_s
        body = {
            "session": self.session,
            "joints": list(self.joints),
            "reply_to": self.inbox,
            "corr": self._corr,
        }
        log.info("asking robot %s for a session", self._candidate)
        return Actions(sends=[Send("session.request", self._candidate, body)])

    def _next_candidate(self, now: float, board: PresenceBoard) -> Actions:
        self._candidates = self._candidates[1:]
        online = board.online(now, role="robot")
        self._candidates = [c for c in self._candidates if c in online and self._suits(online[c])]
        if self._candidates:
            return self._request(now)
        self._reset()
        self._retry_at = now + self.timeouts.retry_s * (1 + self.rng.random())
        return Actions(outcome="rejected")

    # --- both ---------------------------------------------------------------------------------

    def _pair(self, peer: str, now: float, board: PresenceBoard) -> Actions:
        self.state = "paired"
        self.peer = peer
        self.last_partner = peer
        self._deadline = now + self.timeouts.paired_s
        self._candidates = []
        log.info("paired with %s, session %s", peer, self.session)
        sighting = board.stations.get(peer)
        event = {
            "event": "connect",
            "session": self.session,
            "peer": peer,
            "role": self.role,
            # The teleop makes the WebRTC offer; the robot answers.
            "initiator": self.role == "teleop",
            # What the peer announced: the teleop offers one video stream per robot camera.
            "peer_cameras": list(sighting.presence.cameras) if sighting else [],
        }
        return Actions(bus=[event], presence_changed=True)

    def _end(self, now: float, outcome: str, *, notify: bool) -> Actions:
        actions = Actions(presence_changed=True, outcome=outcome)
        if self.session is not None:
            actions.bus.append({"event": "disconnect", "session": self.session, "reason": outcome})
            if notify and self.peer is not None:
                body = {"session": self.session, "reason": outcome}
                actions.sends.append(Send("session.end", self.peer, body))
        log.info("session %s with %s ended: %s", self.session, self.peer, outcome)
        self._reset()
        self._retry_at = now + self.timeouts.retry_s
        return actions

    def _reset(self) -> None:
        self.state = "idle"
        self.session = None
        self.peer = None
        self._deadline = None
        self._corr = None
        self._candidates = []
