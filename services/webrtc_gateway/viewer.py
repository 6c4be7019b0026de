"""The viewer page a station's gateway serves: live cameras, leader vs follower joints, link and
latency figures, session state, and the emergency stop.

Plain HTTP on 127.0.0.1 by default (a thread of its own, so a slow browser never stalls the
gateway's event loop). The page itself is one static file with plain JavaScript, no build step
and nothing fetched from elsewhere. Video reaches the browser over WebRTC: the page offers
(POST /offer) and the gateway answers with one track per camera, each fed the newest decoded
frame (never a queue). Bound to any other address, every request must carry the access token
printed in the URL. The stop button works on either station; re-arm is served only by a robot
station's page. This module never touches the arm: it hands stop/re-arm to the gateway.
"""

from __future__ import annotations

import asyncio
import fractions
import hmac
import ipaddress
import json
import logging
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import av
from aiortc import MediaStreamTrack, RTCConfiguration, RTCPeerConnection, RTCSessionDescription

log = logging.getLogger(__name__)
PAGE = Path(__file__).with_name("viewer.html")
VIDEO_CLOCK_HZ = 90_000
MAX_BODY = 64 * 1024  # an SDP offer is a few KB
MAX_VIEWERS = 4  # each browser costs one video encode per camera


@dataclass
class ViewerState:
    """What the page shows; written by the gateway's loop, read by HTTP threads (under a lock)."""

    role: str
    station: str
    cameras: tuple[str, ...] = ()
    session_state: str = "searching"  # searching | connecting | live | link lost
    peer: str | None = None
    leader: list[float] | None = None
    follower: list[float] | None = None
    follower_state: str | None = None
    rtt_ms: float | None = None
    control_ms: float | None = None
    video_ms: dict[str, float] = field(default_factory=dict)
    fps: dict[str, float] = field(default_factory=dict)
    estop_note: str | None = None


class RelayTrack(MediaStreamTrack):
    """One camera to one browser: the newest decoded frame, re-timed for this connection."""

    kind = "video"

    def __init__(self) -> None:
        super().__init__()
        self._latest: av.VideoFrame | None = None
        self._fresh = asyncio.Event()
        self._start: float | None = None

    def offer(self, frame: av.VideoFrame) -> None:
        self._latest = frame
        self._fresh.set()

    async def recv(self) -> av.VideoFrame:
        await self._fresh.wait()
        self._fresh.clear()
        assert self._latest is not None
        # A copy: the decoded frame is shared with other viewers' encoders, each needing its
        # own timestamps.
        pixels = self._latest.to_ndarray(format="yuv420p")
        frame = av.VideoFrame.from_ndarray(pixels, format="yuv420p")
        now = time.monotonic()
        if self._start is None:
            self._start = now
        frame.pts = int((now - self._start) * VIDEO_CLOCK_HZ)
        frame.time_base = fractions.Fraction(1, VIDEO_CLOCK_HZ)
        return frame


class Viewer:
    """The page server and the browsers' WebRTC connections of one gateway."""

    def __init__(
        self,
        state: ViewerState,
        host: str,
        port: int,
        loop: asyncio.AbstractEventLoop,
        on_estop: Callable[[str], str],
        on_rearm: Callable[[str], str] | None,
    ) -> None:
        self.state = state
        self.lock = threading.Lock()
        self.loop = loop
        self.on_estop, self.on_rearm = on_estop, on_rearm
        self.token = None if _is_loopback(host) else secrets.token_urlsafe(16)
        self.browsers: list[tuple[RTCPeerConnection, dict[str, RelayTrack]]] = []
        self.frames = {camera: 0 for camera in state.cameras}
        self.server = ThreadingHTTPServer((host, port), self._handler())
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, name="viewer", daemon=True)
        shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
        self.url = f"http://{shown}:{self.server.server_address[1]}/"
        if self.token:
            self.url += f"?token={self.token}"

    def start(self) -> None:
        self.thread.start()

    async def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        for pc, _tracks in self.browsers:
            await pc.close()
        self.browsers.clear()

    # --- fed by the gateway (event loop) ---------------------------------------------------

    def update(self, **fields: Any) -> None:
        with self.lock:
            for key, value in fields.items():
                setattr(self.state, key, value)

    def on_video(self, camera: str, frame: av.VideoFrame) -> None:
        self.frames[camera] = self.frames.get(camera, 0) + 1
        for _pc, tracks in self.browsers:
            track = tracks.get(camera)
            if track is not None:
                track.offer(frame)

    # --- browsers' WebRTC (event loop) ------------------------------------------------------

    async def answer(self, sdp: str) -> str:
        while len(self.browsers) >= MAX_VIEWERS:
            old_pc, _ = self.browsers.pop(0)  # the oldest viewer makes room
            await old_pc.close()
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        tracks: dict[str, RelayTrack] = {}
        await pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
        offered = sum(1 for t in pc.getTransceivers() if t.kind == "video")
        for camera in self.state.cameras[:offered]:
            tracks[camera] = RelayTrack()
            pc.addTrack(tracks[camera])
        await pc.setLocalDescription(await pc.createAnswer())
        entry = (pc, tracks)
        self.browsers.append(entry)

        @pc.on("connectionstatechange")
        async def _gone() -> None:
            if pc.connectionState in ("failed", "closed") and entry in self.browsers:
                self.browsers.remove(entry)
                await pc.close()

        return pc.localDescription.sdp

    # --- HTTP (server threads) --------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            view = dict(self.state.__dict__)
        view["frames"] = dict(self.frames)
        view["can_rearm"] = self.on_rearm is not None
        return view

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        viewer = self

        class Handler(BaseHTTPRequestHandler):
            server_version = "rdv-viewer"

            def log_message(self, format: str, *args: Any) -> None:
                log.debug("viewer %s: " + format, self.client_address[0], *args)

            def do_GET(self) -> None:
                path = self._authorised_path()
                if path is None:
                    return
                if path == "/":
                    self._send(HTTPStatus.OK, PAGE.read_bytes(), "text/html; charset=utf-8")
                elif path == "/state":
                    self._json(HTTPStatus.OK, viewer.snapshot())
                else:
                    self._json(HTTPStatus.NOT_FOUND, {"error": f"no page at {path}"})

            def do_POST(self) -> None:
                path = self._authorised_path()
                if path is None:
                    return
                length = int(self.headers.get("Content-Length") or 0)
                if length > MAX_BODY:
                    self._json(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, {"error": "body too large"})
                    return
                body = self.rfile.read(length)
                if path == "/estop":
                    note = viewer._on_loop(viewer.on_estop, f"viewer {self.client_address[0]}")
                    self._json(HTTPStatus.OK, {"ok": True, "note": note})
                elif path == "/rearm" and viewer.on_rearm is not None:
                    note = viewer._on_loop(viewer.on_rearm, f"viewer {self.client_address[0]}")
                    self._json(HTTPStatus.OK, {"ok": True, "note": note})
                elif path == "/offer":
                    try:
                        offer = json.loads(body)
                        sdp = offer["sdp"]
                        if offer.get("type") != "offer" or not isinstance(sdp, str):
                            raise ValueError("not an offer")
                        answer = asyncio.run_coroutine_threadsafe(
                            viewer.answer(sdp), viewer.loop
                        ).result(timeout=15)
                    except (ValueError, KeyError, TypeError) as exc:
                        self._json(HTTPStatus.BAD_REQUEST, {"error": f"bad offer: {exc}"})
                        return
                    except Exception as exc:  # aiortc refused the SDP: the browser's problem
                        log.warning("viewer offer failed: %s", exc)
                        self._json(HTTPStatus.BAD_REQUEST, {"error": f"offer failed: {exc}"})
                        return
                    self._json(HTTPStatus.OK, {"type": "answer", "sdp": answer})
                else:
                    self._json(HTTPStatus.NOT_FOUND, {"error": f"nothing to post at {path}"})

            def _authorised_path(self) -> str | None:
                url = urlsplit(self.path)
                if viewer.token is not None:
                    given = parse_qs(url.query).get("token", [""])[0]
                    if not hmac.compare_digest(given, viewer.token):
                        self._json(HTTPStatus.FORBIDDEN, {"error": "missing or wrong token"})
                        return None
                return url.path

            def _json(self, status: HTTPStatus, data: Any) -> None:
                self._send(status, json.dumps(data).encode(), "application/json")

            def _send(self, status: HTTPStatus, body: bytes, kind: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                self.wfile.write(body)

        return Handler

    def _on_loop(self, action: Callable[[str], str], by: str) -> str:
        """Run a gateway action on its event loop and wait for its note."""

        async def call() -> str:
            return action(by)

        return asyncio.run_coroutine_threadsafe(call(), self.loop).result(timeout=5)


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
