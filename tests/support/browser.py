"""Real headless Chromium for browser tests, driven over the DevTools protocol.

`Chromium` starts the Debian `chromium` in its own process group with a throw-away profile,
loopback WebRTC allowed (the gateways offer only 127.0.0.1 in tests), and stops that group and
removes the profile when done. `Page` evaluates JavaScript and takes screenshots. Nothing here
reaches beyond loopback: no extensions, no sync, no component updates.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from typing import Any

import cv2
import numpy as np
from websockets.sync.client import connect

FLAGS = [
    "--headless",
    "--no-sandbox",  # tests run as root in a container
    "--disable-gpu",
    "--no-first-run",
    "--disable-extensions",
    "--disable-sync",
    "--disable-component-update",
    "--disable-background-networking",
    "--allow-loopback-in-peer-connection",
    "--autoplay-policy=no-user-gesture-required",
    "--window-size=1280,800",
    "--remote-debugging-port=0",
]


def chromium_path() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


class Chromium:
    def __init__(self, url: str) -> None:
        path = chromium_path()
        if path is None:
            raise RuntimeError("chromium is not installed: run the README's setup as root")
        self.profile = tempfile.mkdtemp(prefix="rdv-chromium-")
        # TMPDIR too: Chromium puts its singleton socket in a fresh /tmp/org.chromium.* dir
        # that it never removes; inside the profile it goes when the profile goes.
        env = {**os.environ, "TMPDIR": self.profile}
        self.process = subprocess.Popen(
            [path, *FLAGS, f"--user-data-dir={self.profile}", url],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            start_new_session=True,  # its own group: the zygote and renderers go with it
        )  # fmt: skip
        self.devtools_port = self._devtools_port()

    def _devtools_port(self, timeout_s: float = 30.0) -> int:
        deadline = time.monotonic() + timeout_s
        assert self.process.stderr is not None
        while time.monotonic() < deadline:
            line = self.process.stderr.readline()
            found = re.search(r"DevTools listening on ws://127\.0\.0\.1:(\d+)/", line)
            if found:
                return int(found.group(1))
            if not line and self.process.poll() is not None:
                break
        self.close()
        raise RuntimeError("chromium did not open its DevTools port")

    def page(self, url_prefix: str) -> Page:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.devtools_port}/json/list") as reply:
            targets = json.load(reply)
        for target in targets:
            if target.get("type") == "page" and target.get("url", "").startswith(url_prefix):
                return Page(target["webSocketDebuggerUrl"])
        raise RuntimeError(f"no page at {url_prefix} among {[t.get('url') for t in targets]}")

    def close(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)
        if self.process.stderr is not None:
            self.process.stderr.close()
        shutil.rmtree(self.profile, ignore_errors=True)


class Page:
    def __init__(self, websocket_url: str) -> None:
        self.socket = connect(websocket_url, max_size=64 * 1024 * 1024)
        self.ids = itertools.count(1)

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        request_id = next(self.ids)
        self.socket.send(json.dumps({"id": request_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.socket.recv(timeout=30))
            if message.get("id") == request_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]

    def js(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def screenshot(self) -> np.ndarray:
        data = base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"])
        return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)

    def close(self) -> None:
        self.socket.close()
