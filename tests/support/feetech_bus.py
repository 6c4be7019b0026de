"""An emulated Feetech STS3215 servo bus on a pseudo-terminal: the hardware of an SO101 arm, at
the lowest honest level, for tests that run LeRobot's own classes (or the Feetech SDK) unchanged.

The emulator opens a pty and answers Feetech protocol 0 on its master side, as six STS3215
servos on one half-duplex line would: PING (also broadcast), READ, WRITE, REG_WRITE + ACTION,
SYNC_READ and SYNC_WRITE, with little-endian words and sign-magnitude registers (Homing_Offset
bit 11, Goal/Present_Position bit 15) as LeRobot encodes them. Each servo keeps a 256-byte control
table (model number 777, firmware 3.10, limits, homing offset, operating mode, PID,
acceleration, return delay, torque enable, lock, goal and present position ...). With torque on,
a servo moves toward its goal at a bounded speed (`speed`, steps/s), clamped to its position
limits; with torque off it stays put unless a "hand" moves it (the control channel), which is
how a leader arm is moved. Present_Position = actual - Homing_Offset, as on the real servo.

Faults are injected through the control channel: drop the next N status packets, corrupt the
checksum of the next N, drop/corrupt at a random rate (seeded), or disconnect a motor (it stops
answering and ignores writes). Bad instruction packets (checksum, truncation, unknown
instruction) are ignored without a reply, like a servo does, and counted.

Run it alone: `python -m tests.support.feetech_bus --pty-link /tmp/arm` makes /tmp/arm a
symlink to the pty's slave (give it as `--robot.port=/tmp/arm`) and serves a JSON-lines control
socket at /tmp/arm.ctl (`{"cmd": "state"}`, `{"cmd": "fault", "drop": 3}`, ...; see `_control`).
It prints one line, `ready <slave> <control socket>`, then serves until SIGTERM/SIGINT.

Assumptions where the servo's manual is silent, chosen to match what LeRobot expects of real
arms: enabling torque sets Goal_Position to the present position (the arm does not jump);
`Lock` is stored but EEPROM writes are never refused; replies are sent at once (Return_Delay
is stored, not waited). This module must never open a real serial device or sleep inside a
reply; it is test support and must never be imported by services/.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import tty
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BROADCAST_ID = 0xFE
INST_PING, INST_READ, INST_WRITE, INST_REG_WRITE, INST_ACTION = 0x01, 0x02, 0x03, 0x04, 0x05
INST_SYNC_READ, INST_SYNC_WRITE = 0x82, 0x83
INSTRUCTIONS = {INST_PING, INST_READ, INST_WRITE, INST_REG_WRITE, INST_ACTION, INST_SYNC_READ,
                INST_SYNC_WRITE}  # fmt: skip

# STS3215 control table (address, size), the part LeRobot's FeetechMotorsBus uses.
REG = {
    "Firmware_Major_Version": (0, 1),
    "Firmware_Minor_Version": (1, 1),
    "Model_Number": (3, 2),
    "ID": (5, 1),
    "Baud_Rate": (6, 1),
    "Return_Delay_Time": (7, 1),
    "Response_Status_Level": (8, 1),
    "Min_Position_Limit": (9, 2),
    "Max_Position_Limit": (11, 2),
    "Max_Torque_Limit": (16, 2),
    "P_Coefficient": (21, 1),
    "D_Coefficient": (22, 1),
    "I_Coefficient": (23, 1),
    "Protection_Current": (28, 2),
    "Homing_Offset": (31, 2),
    "Operating_Mode": (33, 1),
    "Overload_Torque": (36, 1),
    "Torque_Enable": (40, 1),
    "Acceleration": (41, 1),
    "Goal_Position": (42, 2),
    "Goal_Velocity": (46, 2),
    "Torque_Limit": (48, 2),
    "Lock": (55, 1),
    "Present_Position": (56, 2),
    "Present_Velocity": (58, 2),
    "Present_Load": (60, 2),
    "Present_Voltage": (62, 1),
    "Present_Temperature": (63, 1),
    "Moving": (66, 1),
    "Present_Current": (69, 2),
    "Maximum_Acceleration": (85, 1),
}
SIGN_BITS = {"Homing_Offset": 11, "Goal_Position": 15, "Present_Position": 15,
             "Goal_Velocity": 15, "Present_Velocity": 15, "Present_Load": 10}  # fmt: skip
READ_ONLY = range(0, 5)  # firmware and model number: a write there changes nothing
LIVE = range(56, 72)  # present values: computed on every read, a write there changes nothing
MODEL_STS3215 = 777
FIRMWARE = (3, 10)
RESOLUTION = 4096
SO101_IDS = (1, 2, 3, 4, 5, 6)


def checksum(body: Iterable[int]) -> int:
    """Feetech checksum: the inverted low byte of the sum of ID, LENGTH and what follows them."""
    return ~sum(body) & 0xFF


def instruction_packet(servo_id: int, instruction: int, params: Iterable[int] = ()) -> bytes:
    """FF FF ID LEN INSTR PARAMS.. CHK, LEN = len(params) + 2."""
    params = list(params)
    body = [servo_id, len(params) + 2, instruction, *params]
    return bytes([0xFF, 0xFF, *body, checksum(body)])


def status_packet(servo_id: int, error: int, params: Iterable[int] = ()) -> bytes:
    """A servo's reply: FF FF ID LEN ERR PARAMS.. CHK."""
    return instruction_packet(servo_id, error, params)


def encode_sign_magnitude(value: int, sign_bit: int) -> int:
    magnitude = min(abs(int(value)), (1 << sign_bit) - 1)
    return ((1 << sign_bit) if value < 0 else 0) | magnitude


def decode_sign_magnitude(raw: int, sign_bit: int) -> int:
    magnitude = raw & ((1 << sign_bit) - 1)
    return -magnitude if raw & (1 << sign_bit) else magnitude


@dataclass
class Servo:
    """One STS3215: its control table plus the physical shaft angle (raw steps, a float)."""

    id: int
    speed: float = 3000.0  # steps/s, about 260 deg/s (STS3215 at 7.4 V: 0.222 s per 60 deg)
    actual: float = 2048.0
    table: bytearray = field(default_factory=lambda: bytearray(256))
    connected: bool = True
    hand: float | None = None  # where a hand is moving the shaft to (torque off), if anywhere
    updated_s: float | None = None  # when advance() last ran

    def __post_init__(self) -> None:
        defaults = {
            "Firmware_Major_Version": FIRMWARE[0],
            "Firmware_Minor_Version": FIRMWARE[1],
            "Model_Number": MODEL_STS3215,
            "ID": self.id,
            "Return_Delay_Time": 250,  # factory 500 us; LeRobot's configure_motors sets 0
            "Response_Status_Level": 1,
            "Min_Position_Limit": 0,
            "Max_Position_Limit": RESOLUTION - 1,
            "Max_Torque_Limit": 1000,
            "P_Coefficient": 32,
            "D_Coefficient": 32,
            "Protection_Current": 500,
            "Overload_Torque": 80,
            "Torque_Limit": 1000,
            "Present_Voltage": 74,
            "Present_Temperature": 30,
            "Maximum_Acceleration": 0,
            "Lock": 1,
        }
        for name, value in defaults.items():
            self.set(name, value)
        self.set("Goal_Position", round(self.actual))

    def get(self, name: str) -> int:
        address, size = REG[name]
        raw = int.from_bytes(self.table[address : address + size], "little")
        return decode_sign_magnitude(raw, SIGN_BITS[name]) if name in SIGN_BITS else raw

    def set(self, name: str, value: int) -> None:
        address, size = REG[name]
        raw = encode_sign_magnitude(value, SIGN_BITS[name]) if name in SIGN_BITS else int(value)
        self.table[address : address + size] = (raw & ((1 << (8 * size)) - 1)).to_bytes(
            size, "little"
        )

    def advance(self, now_s: float) -> None:
        """Move the shaft for the time since the last call: toward the goal (torque on) or the
        hand (torque off), at most `speed` steps/s."""
        dt = 0.0 if self.updated_s is None else max(0.0, now_s - self.updated_s)
        self.updated_s = now_s
        target = None
        if self.get("Torque_Enable"):
            low, high = self.get("Min_Position_Limit"), self.get("Max_Position_Limit")
            goal = self.get("Goal_Position")
            if low < high:
                goal = min(high, max(low, goal))
            target = goal + self.get("Homing_Offset")
        elif self.hand is not None:
            target = self.hand
        moved = 0.0
        if target is not None:
            error = target - self.actual
            moved = max(-self.speed * dt, min(self.speed * dt, error))
            self.actual = min(RESOLUTION - 1.0, max(0.0, self.actual + moved))
        present = round(self.actual) - self.get("Homing_Offset")
        self.set("Present_Position", max(-32767, min(32767, present)))
        self.set("Present_Velocity", round(moved / dt) if dt > 0 else 0)
        self.set("Moving", 1 if abs(moved) > 0 else 0)

    def read(self, address: int, length: int, now_s: float) -> bytes:
        self.advance(now_s)
        return bytes(self.table[address : address + length])

    def write(self, address: int, data: bytes, now_s: float) -> None:
        self.advance(now_s)  # time up to now ran under the old registers
        torque_before = self.get("Torque_Enable")
        for offset, value in enumerate(data):
            where = address + offset
            if where < len(self.table) and where not in READ_ONLY and where not in LIVE:
                self.table[where] = value
        if self.get("ID") != self.id:  # re-addressing is LeRobot's setup_motor, not emulated
            self.set("ID", self.id)
        if self.get("Torque_Enable") and not torque_before:
            # The shaft holds where it is when torque comes on, whatever the goal said.
            self.set("Goal_Position", round(self.actual) - self.get("Homing_Offset"))


@dataclass
class Faults:
    drop_next: int = 0  # status packets to swallow
    corrupt_next: int = 0  # status packets to send with a wrong checksum
    drop_rate: float = 0.0
    corrupt_rate: float = 0.0
    seed: int | None = None
    rng: random.Random = field(default_factory=random.Random)

    def fate(self) -> str:
        """'drop', 'corrupt' or 'send' for the next status packet."""
        if self.drop_next > 0:
            self.drop_next -= 1
            return "drop"
        if self.corrupt_next > 0:
            self.corrupt_next -= 1
            return "corrupt"
        if self.drop_rate and self.rng.random() < self.drop_rate:
            return "drop"
        if self.corrupt_rate and self.rng.random() < self.corrupt_rate:
            return "corrupt"
        return "send"


@dataclass
class Stats:
    packets: int = 0  # valid instruction packets
    bad_packets: int = 0  # bad checksum, bad length or unknown instruction: ignored
    replies: int = 0
    dropped: int = 0
    corrupted: int = 0
    by_instruction: dict[str, int] = field(default_factory=dict)


INSTRUCTION_NAMES = {INST_PING: "ping", INST_READ: "read", INST_WRITE: "write",
                     INST_REG_WRITE: "reg_write", INST_ACTION: "action",
                     INST_SYNC_READ: "sync_read", INST_SYNC_WRITE: "sync_write"}  # fmt: skip


class FeetechBus:
    """Servos on one line, served on a pty. `handle()` is the protocol, usable without a pty."""

    def __init__(
        self, ids: Iterable[int] = SO101_IDS, speed: float = 3000.0, seed: int | None = None
    ) -> None:
        self.servos = {servo_id: Servo(servo_id, speed=speed) for servo_id in ids}
        self.faults = Faults(seed=seed, rng=random.Random(seed))
        self.stats = Stats()
        self.lock = threading.Lock()
        self._pending: dict[int, tuple[int, bytes]] = {}  # REG_WRITE waiting for ACTION
        self._buffer = bytearray()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.master: int | None = None
        self.slave: int | None = None
        self.slave_name: str | None = None
        self.control_path: Path | None = None
        self._control_socket: socket.socket | None = None

    # --- protocol -------------------------------------------------------------------------
    def feed(self, data: bytes, now_s: float | None = None) -> bytes:
        """Bytes written by the host in; the bytes the servos answer out (faults applied)."""
        now_s = time.monotonic() if now_s is None else now_s
        out = bytearray()
        with self.lock:
            self._buffer.extend(data)
            for servo_id, instruction, params in self._packets():
                for reply in self._handle(servo_id, instruction, params, now_s):
                    out.extend(self._apply_fault(reply))
        return bytes(out)

    def _packets(self) -> Iterator[tuple[int, int, bytes]]:
        """Complete packets from the input buffer; junk before a header is skipped."""
        buffer = self._buffer
        while True:
            start = buffer.find(b"\xff\xff")
            if start < 0:
                del buffer[: max(0, len(buffer) - 1)]  # keep a lone trailing 0xFF
                return
            del buffer[:start]
            # A third 0xFF is not an ID the host can send: slide to the last header byte pair.
            while len(buffer) > 2 and buffer[2] == 0xFF:
                del buffer[0]
            if len(buffer) < 4:
                return
            length = buffer[3]
            if length < 2:
                self.stats.bad_packets += 1
                del buffer[:2]
                continue
            if len(buffer) < length + 4:
                return
            packet = bytes(buffer[: length + 4])
            if checksum(packet[2:-1]) != packet[-1] or packet[4] not in INSTRUCTIONS:
                self.stats.bad_packets += 1
                del buffer[:2]  # resynchronise on the next header
                continue
            del buffer[: length + 4]
            self.stats.packets += 1
            name = INSTRUCTION_NAMES[packet[4]]
            self.stats.by_instruction[name] = self.stats.by_instruction.get(name, 0) + 1
            yield packet[2], packet[4], packet[5:-1]

    def _handle(self, servo_id: int, instruction: int, params: bytes, now_s: float) -> list[bytes]:
        live = {i: s for i, s in self.servos.items() if s.connected}
        if instruction == INST_SYNC_WRITE and servo_id == BROADCAST_ID and len(params) >= 2:
            address, size = params[0], params[1]
            body = params[2:]
            for at in range(0, len(body) - size, size + 1):
                servo = live.get(body[at])
                if servo is not None:
                    servo.write(address, body[at + 1 : at + 1 + size], now_s)
            return []
        if instruction == INST_SYNC_READ and servo_id == BROADCAST_ID and len(params) >= 2:
            address, size = params[0], params[1]
            return [
                status_packet(i, 0, live[i].read(address, size, now_s))
                for i in params[2:]
                if i in live
            ]
        targets = list(live.values()) if servo_id == BROADCAST_ID else [live.get(servo_id)]
        replies = []
        for servo in targets:
            if servo is None:
                continue
            reply: bytes | None = status_packet(servo.id, 0)
            if instruction == INST_READ and len(params) == 2:
                reply = status_packet(servo.id, 0, servo.read(params[0], params[1], now_s))
            elif instruction == INST_WRITE and params:
                servo.write(params[0], params[1:], now_s)
            elif instruction == INST_REG_WRITE and params:
                self._pending[servo.id] = (params[0], bytes(params[1:]))
            elif instruction == INST_ACTION:
                address, data = self._pending.pop(servo.id, (0, b""))
                if data:
                    servo.write(address, data, now_s)
            elif instruction != INST_PING:
                reply = None  # malformed parameters: a servo stays silent
            # Broadcast instructions get no status, except PING, which every servo answers.
            if reply is not None and (servo_id != BROADCAST_ID or instruction == INST_PING):
                replies.append(reply)
        return replies

    def _apply_fault(self, reply: bytes) -> bytes:
        fate = self.faults.fate()
        if fate == "drop":
            self.stats.dropped += 1
            return b""
        self.stats.replies += 1
        if fate == "corrupt":
            self.stats.corrupted += 1
            return reply[:-1] + bytes([reply[-1] ^ 0x5A])
        return reply

    # --- state for tests and the control channel -------------------------------------------
    def state(self) -> dict[str, Any]:
        now_s = time.monotonic()
        with self.lock:
            motors = {}
            for servo_id, servo in self.servos.items():
                servo.advance(now_s)
                motors[str(servo_id)] = {
                    name.lower(): servo.get(name)
                    for name in ("Goal_Position", "Present_Position", "Torque_Enable",
                                 "Homing_Offset", "Min_Position_Limit", "Max_Position_Limit",
                                 "Operating_Mode", "P_Coefficient", "I_Coefficient",
                                 "D_Coefficient", "Acceleration", "Return_Delay_Time", "Lock")
                }  # fmt: skip
                motors[str(servo_id)]["actual"] = servo.actual
                motors[str(servo_id)]["connected"] = servo.connected
            stats = dict(vars(self.stats))
            stats["by_instruction"] = dict(self.stats.by_instruction)
            return {"motors": motors, "stats": stats}

    def set_fault(self, **fault: Any) -> None:
        with self.lock:
            self._set_fault(fault)

    def _set_fault(self, fault: dict[str, Any]) -> None:
        for name in ("drop_next", "corrupt_next"):
            if name in fault:
                setattr(self.faults, name, int(fault[name]))
        for name in ("drop_rate", "corrupt_rate"):
            if name in fault:
                setattr(self.faults, name, float(fault[name]))
        for servo_id in fault.get("disconnect", ()):
            self.servos[int(servo_id)].connected = False
        for servo_id in fault.get("reconnect", ()):
            self.servos[int(servo_id)].connected = True
        if fault.get("clear"):
            self.faults.drop_next = self.faults.corrupt_next = 0
            self.faults.drop_rate = self.faults.corrupt_rate = 0.0
            for servo in self.servos.values():
                servo.connected = True

    def move_by_hand(self, positions: dict[int, float]) -> None:
        """Shaft targets (raw steps) for servos with torque off, as a hand moving a leader arm."""
        now_s = time.monotonic()
        with self.lock:
            for servo_id, raw in positions.items():
                servo = self.servos[int(servo_id)]
                servo.advance(now_s)
                servo.hand = float(raw)

    def write_registers(self, servo_id: int, values: dict[str, int]) -> None:
        """Set registers by name as the factory or an earlier calibration left them."""
        now_s = time.monotonic()
        with self.lock:
            servo = self.servos[int(servo_id)]
            servo.advance(now_s)
            for name, value in values.items():
                servo.set(name, int(value))

    def _control(self, request: dict[str, Any]) -> dict[str, Any]:
        """One control-channel request. Commands:
        {"cmd": "state"} -> {"motors": {id: registers}, "stats": {...}}
        {"cmd": "fault", "drop_next": N, "corrupt_next": N, "drop_rate": p, "corrupt_rate": p,
         "disconnect": [ids], "reconnect": [ids], "clear": true}
        {"cmd": "hand", "positions": {id: raw}}      move torque-off shafts, as a hand would
        {"cmd": "registers", "id": ID, "values": {name: value}}   set registers by name"""
        command = request.get("cmd")
        if command == "state":
            return self.state()
        if command == "fault":
            self.set_fault(**{k: v for k, v in request.items() if k != "cmd"})
            return {"ok": True}
        if command == "hand":
            self.move_by_hand({int(k): float(v) for k, v in request["positions"].items()})
            return {"ok": True}
        if command == "registers":
            self.write_registers(int(request["id"]), request["values"])
            return {"ok": True}
        return {"error": f"unknown command {command!r}"}

    # --- serving on a pty ----------------------------------------------------------------------
    def start(self, pty_link: Path | None = None, control_path: Path | None = None) -> str:
        """Open the pty (raw mode) and serve it, plus the control socket, on daemon threads."""
        self.master, self.slave = os.openpty()
        tty.setraw(self.slave)  # no echo, no line discipline: 0xFF and CR pass untouched
        self.slave_name = os.ttyname(self.slave)
        if pty_link is not None:
            with contextlib.suppress(FileNotFoundError):
                pty_link.unlink()
            pty_link.symlink_to(self.slave_name)
        threads = [threading.Thread(target=self._serve_pty, name="feetech-pty", daemon=True)]
        if control_path is not None:
            self.control_path = control_path
            with contextlib.suppress(FileNotFoundError):
                control_path.unlink()
            self._control_socket = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self._control_socket.bind(str(control_path))
            self._control_socket.listen(8)
            threads.append(
                threading.Thread(target=self._serve_control, name="feetech-ctl", daemon=True)
            )
        self._threads = threads
        for thread in threads:
            thread.start()
        return self.slave_name

    def stop(self) -> None:
        self._stop.set()
        if self._control_socket is not None:
            with contextlib.suppress(OSError):
                self._control_socket.shutdown(socket.SHUT_RDWR)
            self._control_socket.close()
        for thread in self._threads:
            thread.join(timeout=5)
        for fd in (self.master, self.slave):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        if self.control_path is not None:
            with contextlib.suppress(FileNotFoundError):
                self.control_path.unlink()
        self.master = self.slave = None

    def _serve_pty(self) -> None:
        assert self.master is not None
        while not self._stop.is_set():
            ready, _, _ = select.select([self.master], [], [], 0.1)
            if not ready:
                continue
            try:
                data = os.read(self.master, 4096)
            except OSError:  # the slave side was closed by every holder: wait for the next
                time.sleep(0.01)
                continue
            reply = self.feed(data)
            if reply:
                with contextlib.suppress(OSError):
                    os.write(self.master, reply)

    def _serve_control(self) -> None:
        assert self._control_socket is not None
        while not self._stop.is_set():
            try:
                connection, _ = self._control_socket.accept()
            except OSError:
                return
            threading.Thread(
                target=self._control_connection, args=(connection,), daemon=True
            ).start()

    def _control_connection(self, connection: socket.socket) -> None:
        with connection, connection.makefile("rwb") as stream:
            for line in stream:
                try:
                    answer = self._control(json.loads(line))
                except (ValueError, KeyError, TypeError) as exc:  # bad request: say so, live on
                    answer = {"error": str(exc)}
                stream.write(json.dumps(answer).encode() + b"\n")
                stream.flush()


class BusControl:
    """Client of an emulator's control socket (another process)."""

    def __init__(self, path: Path | str) -> None:
        self.path = str(path)

    def request(self, **request: Any) -> dict[str, Any]:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(10)
            sock.connect(self.path)
            sock.sendall(json.dumps(request).encode() + b"\n")
            with sock.makefile("rb") as stream:
                answer = json.loads(stream.readline())
        if "error" in answer:
            raise RuntimeError(f"emulated bus: {answer['error']}")
        return answer

    def state(self) -> dict[str, Any]:
        return self.request(cmd="state")

    def fault(self, **fault: Any) -> None:
        self.request(cmd="fault", **fault)

    def hand(self, positions: dict[int, float]) -> None:
        self.request(cmd="hand", positions={str(k): v for k, v in positions.items()})

    def registers(self, servo_id: int, **values: int) -> None:
        self.request(cmd="registers", id=servo_id, values=values)


class EmulatedBusProcess:
    """`python -m tests.support.feetech_bus` as a child process, in its own temp dir; `stop()`
    ends exactly that process and removes the dir."""

    def __init__(
        self, name: str = "arm", *, python: str = sys.executable, args: Iterable[str] = ()
    ) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="rdv-fts-"))
        self.port = self.dir / name
        self.control = BusControl(self.dir / f"{name}.ctl")
        self.log = self.dir / f"{name}.log"
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                [python, "-m", "tests.support.feetech_bus", "--pty-link", str(self.port), *args],
                cwd=Path(__file__).resolve().parents[2],
                stdout=subprocess.PIPE,
                stderr=log,
            )
        assert self.process.stdout is not None
        ready, _, _ = select.select([self.process.stdout], [], [], 60)
        line = self.process.stdout.readline().decode() if ready else ""
        if not line.startswith("ready "):  # "ready <slave> <ctl>", else why it failed
            why = f"emulated bus did not start: {line}{self.log_text()}"
            self.stop()
            raise RuntimeError(why)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> EmulatedBusProcess:
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.support.feetech_bus",
        description="Emulated Feetech STS3215 bus (an SO101 arm's six servos) on a pty.",
    )
    parser.add_argument("--pty-link", type=Path, required=True,
                        help="symlink to create to the pty's slave (the arm's port)")  # fmt: skip
    parser.add_argument("--control", type=Path, default=None,
                        help="control socket path (default: <pty-link>.ctl)")  # fmt: skip
    parser.add_argument("--ids", default="1,2,3,4,5,6", help="servo ids (default: %(default)s)")
    parser.add_argument("--speed", type=float, default=3000.0,
                        help="top speed in steps/s (default: %(default)s)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=None, help="seed of the random faults")
    args = parser.parse_args(argv)
    bus = FeetechBus([int(i) for i in args.ids.split(",")], speed=args.speed, seed=args.seed)
    control = args.control or args.pty_link.with_name(args.pty_link.name + ".ctl")
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    slave = bus.start(args.pty_link, control)
    print(f"ready {slave} {control}", flush=True)
    try:
        while not stop.wait(0.5):
            pass
    finally:
        bus.stop()
        with contextlib.suppress(FileNotFoundError):
            args.pty_link.unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())
