"""A local MQTT broker for one machine (the demo): Mosquitto when installed, else amqtt.

Listens on 127.0.0.1 only and allows anonymous clients, so it must never be reachable from
another machine; a real deployment runs the broker config in deploy/mosquitto/. Mosquitto is
exec'd (supervisord then manages the broker's own pid); amqtt runs in this process.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import shutil
import signal
import sys
from pathlib import Path

from services import exits

log = logging.getLogger("rdv.local_broker")
MOSQUITTO_PATHS = ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto")
EXIT_CANTCREAT = 73  # sysexits.h: the config cannot be written (disk full?): retried, backing off


def find_mosquitto() -> str | None:
    found = shutil.which("mosquitto")
    return found or next((p for p in MOSQUITTO_PATHS if os.access(p, os.X_OK)), None)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m services.local_broker",
        description="Run a local MQTT broker on 127.0.0.1 for stations on this machine.",
    )
    parser.add_argument(
        "--port",
        type=int,
        default=int(os.environ.get("RDV_BROKER_PORT", "18830")),
        help="TCP port (default: $RDV_BROKER_PORT or %(default)s)",
    )
    parser.add_argument(
        "--kind",
        choices=("auto", "mosquitto", "amqtt"),
        default="auto",
        help="auto: Mosquitto when installed, else the embedded amqtt (default: %(default)s)",
    )
    parser.add_argument(
        "--run-dir",
        default=os.environ.get("RDV_RUN_DIR", "."),
        help="where the generated Mosquitto config goes (default: $RDV_RUN_DIR or .)",
    )
    return parser


def write_if_changed(path: Path, text: str) -> None:
    """Write `text` to `path` unless it already holds it, atomically: a restart on a full disk
    finds the config it wrote before, and a failed write never leaves a truncated file."""
    try:
        if path.read_text() == text:
            return
    except OSError:
        pass  # missing or unreadable: write it
    temp = path.with_name(f".{path.name}.tmp")
    try:
        temp.write_text(text)
        temp.replace(path)
    finally:
        with contextlib.suppress(OSError):  # never hide why the write failed
            temp.unlink(missing_ok=True)


def run_mosquitto(binary: str, port: int, run_dir: Path) -> int:
    """Exec Mosquitto (never returns) or return an exit code when its config cannot be written."""
    conf = run_dir / "local-mosquitto.conf"
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_if_changed(conf, mosquitto_config(port))
    except OSError as exc:
        log.error("cannot write the broker config %s: %s", conf, exc.strerror or exc)
        return EXIT_CANTCREAT
    print(f"local_broker: Mosquitto on 127.0.0.1:{port}", file=sys.stderr, flush=True)
    os.execv(binary, [binary, "-c", str(conf)])
    return 0  # not reached: execv replaces this process


def mosquitto_config(port: int) -> str:
    return (
        "# written by services.local_broker: loopback only, anonymous, for one machine\n"
        f"listener {port} 127.0.0.1\n"
        "allow_anonymous true\n"
        "persistence false\n"
        "log_dest stderr\n"
        "log_type error\nlog_type warning\nlog_type notice\n"
        "max_packet_size 131072\n"
    )


def run_amqtt(port: int) -> int:
    from amqtt.broker import Broker

    logging.getLogger("transitions").setLevel(logging.WARNING)
    config = {
        "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{port}"}},
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
    }

    async def serve() -> None:
        broker = Broker(config)
        await broker.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        print(f"local_broker: amqtt (MQTT 3.1.1) on 127.0.0.1:{port}", file=sys.stderr, flush=True)
        await stop.wait()
        await asyncio.wait_for(broker.shutdown(), timeout=3)

    try:
        asyncio.run(serve())
    except Exception as exc:  # amqtt wraps a taken port in its own BrokerError
        log.error("cannot start the embedded broker on 127.0.0.1:%d: %s", port, exc)
        return 78  # a configuration problem: supervisord must not restart it in a storm
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s local_broker %(message)s")
    mosquitto = find_mosquitto() if args.kind in ("auto", "mosquitto") else None
    if args.kind == "mosquitto" and mosquitto is None:
        log.error("Mosquitto is not installed (apt-get install mosquitto), or use --kind amqtt")
        return 78
    if mosquitto is not None:
        return run_mosquitto(mosquitto, args.port, Path(args.run_dir))
    return run_amqtt(args.port)


if __name__ == "__main__":
    sys.exit(exits.final(main()))
