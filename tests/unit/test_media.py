"""rdv's video receive path: frames released at their marker packet, raw RTP timestamps kept,
capture times matched with decoded frames. aiortc's own RtpPacket objects are fed in."""

from __future__ import annotations

from aiortc.jitterbuffer import JitterBuffer
from aiortc.rtp import RtpPacket

from services.webrtc_gateway.media import (
    RTP_WRAP,
    CaptureTimes,
    MarkerJitterBuffer,
    RtpTimestamps,
    check_aiortc,
)


def packet(seq: int, timestamp: int, marker: bool, data: bytes) -> RtpPacket:
    rtp = RtpPacket(payload_type=96, sequence_number=seq % 65536, timestamp=timestamp)
    rtp.marker = int(marker)
    rtp._data = data  # what aiortc's depayloader leaves on the packet
    return rtp


def frame_packets(first_seq: int, timestamp: int, parts: list[bytes]) -> list[RtpPacket]:
    return [
        packet(first_seq + i, timestamp, i == len(parts) - 1, part) for i, part in enumerate(parts)
    ]


def test_a_frame_is_released_at_its_marker_packet_where_stock_waits_for_the_next_frame() -> None:
    ours, stock = MarkerJitterBuffer(64, is_video=True), JitterBuffer(64, is_video=True)
    packets = frame_packets(100, 3000, [b"a", b"b", b"c"])
    for rtp in packets[:-1]:
        assert ours.add(rtp)[1] is None
        assert stock.add(rtp)[1] is None
    _, released = ours.add(packets[-1])
    assert released is not None and (released.data, released.timestamp) == (b"abc", 3000)
    assert stock.add(packets[-1])[1] is None  # stock: one frame interval later, at best
    _, stock_released = stock.add(packet(103, 6000, False, b"d"))
    assert stock_released is not None and stock_released.data == b"abc"


def test_frames_follow_each_other_and_reordering_waits_for_the_missing_packet() -> None:
    buffer = MarkerJitterBuffer(64, is_video=True)
    first = frame_packets(10, 1000, [b"1", b"2"])
    second = frame_packets(12, 4000, [b"x", b"y", b"z"])
    assert buffer.add(first[0])[1] is None
    assert buffer.add(first[1])[1].data == b"12"
    assert buffer.add(second[0])[1] is None
    assert buffer.add(second[2])[1] is None  # marker in, middle missing: never released torn
    released = buffer.add(second[1])[1]
    assert released is not None and released.data == b"xyz" and released.timestamp == 4000


def test_a_lost_marker_falls_back_to_the_next_frame_closing_it() -> None:
    buffer = MarkerJitterBuffer(64, is_video=True)
    unmarked = [packet(50, 9000, False, b"p"), packet(51, 9000, False, b"q")]
    for rtp in unmarked:
        assert buffer.add(rtp)[1] is None
    released = buffer.add(packet(52, 12000, False, b"r"))[1]
    assert released is not None and released.data == b"pq" and released.timestamp == 9000


def test_sequence_numbers_wrap() -> None:
    buffer = MarkerJitterBuffer(64, is_video=True)
    parts = frame_packets(65535, 5, [b"e", b"n", b"d"])  # 65535, 0, 1
    assert buffer.add(parts[0])[1] is None and buffer.add(parts[1])[1] is None
    assert buffer.add(parts[2])[1].data == b"end"


def test_decoded_pts_is_the_raw_rtp_timestamp_unwrapped() -> None:
    mapper = RtpTimestamps()
    assert mapper.map(RTP_WRAP - 6000) == RTP_WRAP - 6000
    assert mapper.map(RTP_WRAP - 3000) == RTP_WRAP - 3000
    assert mapper.map(0) == RTP_WRAP  # wrapped: keeps rising
    assert mapper.map(3000) % RTP_WRAP == 3000


def test_capture_times_match_decoded_frames_in_either_order_within_two_ticks() -> None:
    times = CaptureTimes()
    assert times.captured("front", 1000, 111) is None
    assert times.decoded("front", 1001, 999) == 111  # the decoder's pts one tick off
    assert times.decoded("front", 4000, 555) is None  # frame first, capture time after
    assert times.captured("front", 4000, 222) == 555
    assert times.decoded("side", 1000, 1) is None  # cameras are kept apart
    assert times.decoded("front", 7000, 1) is None and times.captured("front", 7003, 5) is None


def test_capture_memory_is_bounded() -> None:
    times = CaptureTimes(memory=3)
    for rtp in range(10):
        times.captured("front", rtp * 3000, rtp)
    assert times.decoded("front", 0, 0) is None  # forgotten
    assert times.decoded("front", 9 * 3000, 0) == 9


def test_this_aiortc_has_the_internals_rdv_sets() -> None:
    check_aiortc()  # raises with the missing name if an aiortc upgrade renamed one
