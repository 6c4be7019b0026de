"""The emulated Feetech bus (tests/support/feetech_bus.py) against its own protocol, without
LeRobot: exact packets and checksums through `feed()`, then the real Feetech SDK (scservo_sdk,
which LeRobot drives) over the pty, then the runnable process and its control socket."""

from __future__ import annotations

import time

import pytest

from tests.support.feetech_bus import (
    BROADCAST_ID,
    INST_ACTION,
    INST_PING,
    INST_READ,
    INST_REG_WRITE,
    INST_SYNC_READ,
    INST_SYNC_WRITE,
    INST_WRITE,
    MODEL_STS3215,
    REG,
    EmulatedBusProcess,
    FeetechBus,
    checksum,
    decode_sign_magnitude,
    encode_sign_magnitude,
    instruction_packet,
    status_packet,
)

GOAL, PRESENT = REG["Goal_Position"][0], REG["Present_Position"][0]
TORQUE, OFFSET = REG["Torque_Enable"][0], REG["Homing_Offset"][0]


def word(value: int) -> list[int]:
    return [value & 0xFF, value >> 8]


def split_status(data: bytes) -> list[bytes]:
    """Status packets in a reply stream (each FF FF ID LEN ...)."""
    packets = []
    while data:
        assert data[:2] == b"\xff\xff", data
        size = data[3] + 4
        packets.append(data[:size])
        data = data[size:]
    return packets


def test_ping_answers_a_status_packet_with_the_right_checksum() -> None:
    bus = FeetechBus()
    # The packet scservo_sdk sends for ping(1): FF FF 01 02 01 FB.
    assert instruction_packet(1, INST_PING) == bytes([0xFF, 0xFF, 1, 2, 1, 0xFB])
    assert bus.feed(instruction_packet(1, INST_PING), now_s=0.0) == status_packet(1, 0)
    assert status_packet(1, 0) == bytes([0xFF, 0xFF, 1, 2, 0, 0xFC])


def test_read_returns_model_and_firmware_little_endian() -> None:
    bus = FeetechBus()
    reply = bus.feed(instruction_packet(3, INST_READ, [3, 2]), now_s=0.0)
    assert reply == status_packet(3, 0, word(MODEL_STS3215))
    assert reply[5] | reply[6] << 8 == 777
    firmware = bus.feed(instruction_packet(3, INST_READ, [0, 2]), now_s=0.0)
    assert list(firmware[5:7]) == [3, 10]


def test_write_is_acknowledged_and_read_back() -> None:
    bus = FeetechBus()
    assert bus.feed(instruction_packet(2, INST_WRITE, [21, 16]), now_s=0.0) == status_packet(2, 0)
    assert bus.feed(instruction_packet(2, INST_READ, [21, 1]), now_s=0.0)[5] == 16
    # Model number and present position are read-only: the write is acknowledged, ignored.
    bus.feed(instruction_packet(2, INST_WRITE, [3, 0, 0]), now_s=0.0)
    assert bus.servos[2].get("Model_Number") == MODEL_STS3215


def test_bad_checksum_truncated_and_unknown_instructions_get_no_reply() -> None:
    bus = FeetechBus()
    good = instruction_packet(1, INST_PING)
    assert bus.feed(good[:-1] + bytes([good[-1] ^ 1]), now_s=0.0) == b""
    assert bus.feed(instruction_packet(1, 0x42), now_s=0.0) == b""
    assert bus.stats.bad_packets == 2
    # Junk before a header is skipped, a packet split across writes is answered once whole.
    assert bus.feed(b"\x00\x13" + good[:3], now_s=0.0) == b""
    assert bus.feed(good[3:], now_s=0.0) == status_packet(1, 0)


def test_broadcast_ping_is_answered_by_every_servo_in_id_order() -> None:
    bus = FeetechBus()
    packets = split_status(bus.feed(instruction_packet(BROADCAST_ID, INST_PING), now_s=0.0))
    assert [p[2] for p in packets] == [1, 2, 3, 4, 5, 6]
    assert all(checksum(p[2:-1]) == p[-1] for p in packets)


def test_sync_read_answers_listed_ids_in_the_order_asked() -> None:
    bus = FeetechBus()
    reply = bus.feed(instruction_packet(BROADCAST_ID, INST_SYNC_READ, [PRESENT, 2, 5, 1, 9]), 0.0)
    packets = split_status(reply)
    assert [p[2] for p in packets] == [5, 1]  # 9 is not on the bus: no answer
    assert all(p[5] | p[6] << 8 == 2048 for p in packets)


def test_sync_write_sets_goals_without_a_reply_and_torque_moves_at_bounded_speed() -> None:
    bus = FeetechBus(speed=1000.0)
    assert bus.feed(instruction_packet(1, INST_WRITE, [TORQUE, 1]), now_s=0.0)
    params = [GOAL, 2, 1, *word(3048), 2, *word(1048)]
    assert bus.feed(instruction_packet(BROADCAST_ID, INST_SYNC_WRITE, params), now_s=0.0) == b""
    assert bus.servos[1].get("Goal_Position") == 3048 and bus.servos[2].get("Goal_Position") == 1048
    # Torque on for 1 only: after 0.5 s it has moved 500 steps (speed 1000/s); 2 has not moved.
    read = instruction_packet(BROADCAST_ID, INST_SYNC_READ, [PRESENT, 2, 1, 2])
    first, second = split_status(bus.feed(read, now_s=0.5))
    assert first[5] | first[6] << 8 == 2548
    assert second[5] | second[6] << 8 == 2048
    first, _ = split_status(bus.feed(read, now_s=5.0))
    assert first[5] | first[6] << 8 == 3048  # arrived, no overshoot


def test_goal_is_clamped_to_the_position_limits() -> None:
    bus = FeetechBus(speed=1e6)
    bus.write_registers(1, {"Min_Position_Limit": 1000, "Max_Position_Limit": 3000})
    bus.feed(instruction_packet(1, INST_WRITE, [TORQUE, 1]), now_s=0.0)
    bus.feed(instruction_packet(1, INST_WRITE, [GOAL, *word(4000)]), now_s=0.0)
    reply = bus.feed(instruction_packet(1, INST_READ, [PRESENT, 2]), now_s=1.0)
    assert reply[5] | reply[6] << 8 == 3000


def test_homing_offset_is_sign_magnitude_and_present_is_actual_minus_offset() -> None:
    assert encode_sign_magnitude(-100, 11) == (1 << 11) | 100
    assert decode_sign_magnitude((1 << 11) | 100, 11) == -100
    bus = FeetechBus()
    bus.feed(instruction_packet(4, INST_WRITE, [OFFSET, *word(encode_sign_magnitude(-100, 11))]))
    reply = bus.feed(instruction_packet(4, INST_READ, [PRESENT, 2]), now_s=0.0)
    assert reply[5] | reply[6] << 8 == 2148  # actual 2048 - (-100)


def test_torque_on_holds_where_the_shaft_is_whatever_the_goal_said() -> None:
    bus = FeetechBus(speed=1e6)
    bus.feed(instruction_packet(1, INST_WRITE, [GOAL, *word(100)]), now_s=0.0)
    bus.feed(instruction_packet(1, INST_WRITE, [TORQUE, 1]), now_s=0.0)
    reply = bus.feed(instruction_packet(1, INST_READ, [PRESENT, 2]), now_s=1.0)
    assert reply[5] | reply[6] << 8 == 2048


def test_reg_write_takes_effect_on_action() -> None:
    bus = FeetechBus()
    assert bus.feed(instruction_packet(3, INST_REG_WRITE, [21, 8]), 0.0) == status_packet(3, 0)
    assert bus.servos[3].get("P_Coefficient") == 32
    assert bus.feed(instruction_packet(BROADCAST_ID, INST_ACTION), 0.0) == b""
    assert bus.servos[3].get("P_Coefficient") == 8


def test_injected_faults_drop_corrupt_and_disconnect() -> None:
    bus = FeetechBus()
    ping = instruction_packet(1, INST_PING)
    bus.set_fault(drop_next=1, corrupt_next=1)
    assert bus.feed(ping, 0.0) == b""
    corrupt = bus.feed(ping, 0.0)
    assert corrupt[:-1] == status_packet(1, 0)[:-1] and corrupt[-1] != status_packet(1, 0)[-1]
    assert bus.feed(ping, 0.0) == status_packet(1, 0)
    bus.set_fault(disconnect=[3])
    sync_read = instruction_packet(BROADCAST_ID, INST_SYNC_READ, [PRESENT, 2, 1, 2, 3, 4])
    assert [p[2] for p in split_status(bus.feed(sync_read, 0.0))] == [1, 2, 4]
    bus.feed(instruction_packet(3, INST_WRITE, [21, 1]), 0.0)
    assert bus.servos[3].get("P_Coefficient") == 32  # a disconnected servo hears nothing
    bus.set_fault(clear=True)
    assert len(split_status(bus.feed(sync_read, 0.0))) == 4
    assert (bus.stats.dropped, bus.stats.corrupted) == (1, 1)


def test_random_fault_rate_is_seeded() -> None:
    def fates(seed: int) -> list[bytes]:
        bus = FeetechBus(seed=seed)
        bus.set_fault(corrupt_rate=0.3)
        return [bus.feed(instruction_packet(1, INST_PING), 0.0) for _ in range(50)]

    assert fates(7) == fates(7)
    assert 0 < sum(reply != status_packet(1, 0) for reply in fates(7)) < 50


def test_a_hand_moves_a_torque_off_shaft() -> None:
    bus = FeetechBus(speed=1e6)
    bus.move_by_hand({2: 1000})
    reply = bus.feed(instruction_packet(2, INST_READ, [PRESENT, 2]), now_s=time.monotonic() + 1)
    assert reply[5] | reply[6] << 8 == 1000


# --- the real Feetech SDK (the one LeRobot drives) over the pty --------------------------------

scs = pytest.importorskip("scservo_sdk", reason="feetech-servo-sdk is in rdv's dev extra")


@pytest.fixture
def sdk():
    bus = FeetechBus(speed=1e5)
    port_name = bus.start()
    port = scs.PortHandler(port_name)
    assert port.openPort()
    handler = scs.PacketHandler(0)
    try:
        yield bus, port, handler
    finally:
        port.closePort()
        bus.stop()


def test_sdk_pings_reads_and_writes_over_the_pty(sdk) -> None:
    _bus, port, handler = sdk
    model, result, error = handler.ping(port, 1)
    assert (model, result, error) == (MODEL_STS3215, scs.COMM_SUCCESS, 0)
    assert handler.write1ByteTxRx(port, 1, TORQUE, 1) == (scs.COMM_SUCCESS, 0)
    assert handler.write2ByteTxRx(port, 1, GOAL, 3000) == (scs.COMM_SUCCESS, 0)
    deadline = time.monotonic() + 10
    position = 0
    while time.monotonic() < deadline and position != 3000:
        position, result, _ = handler.read2ByteTxRx(port, 1, PRESENT)
        assert result == scs.COMM_SUCCESS
    assert position == 3000


def test_sdk_group_sync_read_and_write(sdk) -> None:
    _bus, port, handler = sdk
    writer = scs.GroupSyncWrite(port, handler, GOAL, 2)
    for servo_id in range(1, 7):
        assert writer.addParam(servo_id, word(1000 + servo_id))
    assert writer.txPacket() == scs.COMM_SUCCESS
    reader = scs.GroupSyncRead(port, handler, GOAL, 2)
    for servo_id in range(1, 7):
        reader.addParam(servo_id)
    assert reader.txRxPacket() == scs.COMM_SUCCESS
    assert [reader.getData(i, GOAL, 2) for i in range(1, 7)] == [1001 + i for i in range(6)]


def test_sdk_sees_corrupt_replies_timeouts_and_a_missing_motor(sdk) -> None:
    bus, port, handler = sdk
    bus.set_fault(corrupt_next=1)
    assert handler.ping(port, 2)[1] == scs.COMM_RX_CORRUPT
    assert handler.ping(port, 2)[1] == scs.COMM_SUCCESS
    bus.set_fault(drop_next=1)
    assert handler.ping(port, 2)[1] == scs.COMM_RX_TIMEOUT
    bus.set_fault(disconnect=[5])
    reader = scs.GroupSyncRead(port, handler, PRESENT, 2)
    for servo_id in range(1, 7):
        reader.addParam(servo_id)
    assert reader.txRxPacket() == scs.COMM_RX_TIMEOUT
    bus.set_fault(clear=True)
    port.ser.reset_input_buffer()  # replies of 1..4 that arrived after the failed read
    assert reader.txRxPacket() == scs.COMM_SUCCESS


# --- the runnable process and its control socket ---------------------------------------------


def test_process_serves_a_linked_pty_and_a_control_socket() -> None:
    with EmulatedBusProcess("arm") as process:
        assert process.port.is_symlink()
        port = scs.PortHandler(str(process.port))
        assert port.openPort()
        try:
            handler = scs.PacketHandler(0)
            assert handler.ping(port, 6)[:2] == (MODEL_STS3215, scs.COMM_SUCCESS)
            process.control.fault(drop_next=1)
            assert handler.ping(port, 6)[1] == scs.COMM_RX_TIMEOUT
            process.control.registers(6, Homing_Offset=-5)
            state = process.control.state()
            assert state["motors"]["6"]["homing_offset"] == -5
            assert state["stats"]["dropped"] == 1
            with pytest.raises(RuntimeError, match="unknown command"):
                process.control.request(cmd="nonsense")
        finally:
            port.closePort()
        directory, pid = process.dir, process.process.pid
    assert process.process.poll() is not None and not directory.exists(), pid
