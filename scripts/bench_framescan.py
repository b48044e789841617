"""Micro-benchmark of the frame walker: 1M DataRows of ~100 bytes, fed in 256 KiB reads as the relay does.

Prints frames/s for the C accelerator (when compiled) and the pure-Python fallback.
Run: .venv/bin/python scripts/bench_framescan.py [--rows N] [--chunk BYTES]
"""

from __future__ import annotations

import argparse
import struct
import time
from collections.abc import Callable

from data_plane.postgres import framescan
from data_plane.postgres.framescan import ScanResult

Scan = Callable[[bytes | bytearray | memoryview, int, bytes, int], ScanResult]
MAX_FRAME = 1 << 30


def frame(msg_type: bytes, payload: bytes) -> bytes:
    return msg_type + struct.pack("!i", len(payload) + 4) + payload


def result_stream(rows: int) -> bytes:
    """RowDescription, `rows` DataRows of 100 bytes on the wire, CommandComplete, ReadyForQuery."""
    values = [b"%08d" % 0, b"x" * 40, b"y" * 30]  # three text columns
    payload = struct.pack("!h", len(values)) + b"".join(struct.pack("!i", len(v)) + v for v in values)
    row = frame(b"D", payload + b"z" * (100 - 5 - len(payload)))
    assert len(row) == 100
    return (
        frame(b"T", b"\x00\x01" + b"c\x00" + bytes(18))
        + row * rows
        + frame(b"C", b"SELECT %d\x00" % rows)
        + frame(b"Z", b"I")
    )


def relay(scan: Scan, stream: bytes, chunk: int) -> tuple[int, float]:
    """Frames seen and seconds spent, reading `chunk` bytes at a time and keeping the unconsumed tail."""
    pending = bytearray()
    frames = 0
    view = memoryview(stream)
    began = time.perf_counter()
    for low in range(0, len(stream), chunk):
        pending += view[low : low + chunk]
        end, events, trailing = scan(pending, 0, b"D", MAX_FRAME)
        frames += len(events) + trailing + sum(event[3] for event in events)
        del pending[:end]
    elapsed = time.perf_counter() - began
    assert not pending, "stream should end on a frame boundary"
    return frames, elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--chunk", type=int, default=256 * 1024)
    parser.add_argument("--repeat", type=int, default=3, help="best of N runs")
    args = parser.parse_args()

    stream = result_stream(args.rows)
    implementations: list[tuple[str, Scan | None]] = [
        ("c", framescan._framescan.scan_frames if framescan.ACCELERATED else None),
        ("python", framescan._scan_frames_py),
    ]
    print(f"{args.rows:,} DataRows, {len(stream) / 1e6:.1f} MB in {args.chunk // 1024} KiB reads")
    for name, scan in implementations:
        if scan is None:
            print(f"{name:>7}: not compiled (framescan.ACCELERATED is False)")
            continue
        frames, best = min((relay(scan, stream, args.chunk) for _ in range(args.repeat)), key=lambda run: run[1])
        assert frames == args.rows + 3
        print(f"{name:>7}: {frames / best / 1e6:7.1f} M frames/s  ({best * 1e3:7.1f} ms for {frames:,} frames)")


if __name__ == "__main__":
    main()
