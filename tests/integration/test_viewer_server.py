"""The viewer page server on its own: loopback without a token, any other address only with
the printed token, bad requests refused, stop and re-arm handed to the gateway's loop."""

from __future__ import annotations

import asyncio
import json
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest

from services.webrtc_gateway.viewer import Viewer, ViewerState
from tests.support.broker import free_port

pytestmark = pytest.mark.integration


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield loop
    loop.call_soon_threadsafe(loop.stop)
    thread.join(timeout=5)
    loop.close()


def serve(loop, host: str, role: str, calls: list[str]) -> Viewer:
    def estop(by: str) -> str:
        calls.append(f"estop {by}")
        return "held"

    def rearm(by: str) -> str:
        calls.append(f"rearm {by}")
        return "re-armed"

    viewer = Viewer(ViewerState(role=role, station=f"{role}-1", cameras=("front",)), host,
                    free_port(), loop, estop, rearm if role == "robot" else None)  # fmt: skip
    viewer.start()
    return viewer


def close(loop, viewer: Viewer) -> None:
    asyncio.run_coroutine_threadsafe(viewer.close(), loop).result(timeout=10)


def fetch(url: str, data: bytes | None = None) -> tuple[int, dict | str]:
    request = urllib.request.Request(url, data=data, method="POST" if data is not None else "GET")
    try:
        with urllib.request.urlopen(request, timeout=10) as reply:
            body = reply.read().decode()
            status = reply.status
    except urllib.error.HTTPError as error:
        body, status = error.read().decode(), error.code
    try:
        return status, json.loads(body)
    except json.JSONDecodeError:
        return status, body


def test_loopback_page_needs_no_token_and_serves_page_and_state(loop) -> None:
    calls: list[str] = []
    viewer = serve(loop, "127.0.0.1", "teleop", calls)
    try:
        assert "token" not in viewer.url
        status, page = fetch(viewer.url)
        assert status == 200 and "RTCPeerConnection" in page and 'id="estop"' in page
        assert "src=" not in page and "https://" not in page and "http://" not in page  # no CDN
        viewer.update(session_state="live", peer="robot-1", rtt_ms=0.4)
        status, view = fetch(viewer.url + "state")
        assert status == 200 and view["session_state"] == "live" and view["peer"] == "robot-1"
        assert view["can_rearm"] is False
        assert fetch(viewer.url + "estop", b"")[1] == {"ok": True, "note": "held"}
        assert calls == ["estop viewer 127.0.0.1"]
        assert fetch(viewer.url + "rearm", b"")[0] == 404  # only a robot's page re-arms
        assert fetch(viewer.url + "nothing")[0] == 404
        assert fetch(viewer.url + "offer", b"{not json")[0] == 400
        assert fetch(viewer.url + "offer", json.dumps({"type": "answer", "sdp": "x"}).encode())[
            0] == 400  # fmt: skip
        assert fetch(viewer.url + "offer", b"x" * 100_000)[0] == 413
    finally:
        close(loop, viewer)


def test_other_addresses_require_the_printed_token(loop) -> None:
    calls: list[str] = []
    viewer = serve(loop, "0.0.0.0", "robot", calls)
    try:
        assert "?token=" in viewer.url
        base, token = viewer.url.split("?token=")
        assert fetch(base)[0] == 403
        assert fetch(base + "state?token=wrong")[0] == 403
        assert fetch(base + "estop", b"")[0] == 403 and calls == []
        assert fetch(viewer.url)[0] == 200
        status, view = fetch(f"{base}state?token={token}")
        assert status == 200 and view["can_rearm"] is True
        assert fetch(f"{base}rearm?token={token}", b"")[1]["note"] == "re-armed"
        assert calls == ["rearm viewer 127.0.0.1"]
    finally:
        close(loop, viewer)
