"""How much a pure-Python thread slows a decode thread through the GIL, at several switch intervals.

    python -m benchmarks.gil [--images 600] [--intervals 0.005,0.001,0.0005,0.0002]

PIL releases the GIL for each C step of a decode (read, decode, convert, resize, copy out) and must win it back
after each; while another thread runs Python (Beam's, in a worker), each win waits for that thread to be asked
to drop the GIL, which happens after the switch interval. This prints the classify task's decode + resize rate
on one thread, alone and beside a thread that only runs Python, for each interval (EngineConfig's
gil_switch_interval_s sets it in a worker).
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from collections.abc import Sequence

from beam_infer.io.fetch import fetch_bytes
from beam_infer.tasks.classify import decode_resize
from benchmarks.data import dataset, read_records


def decode_rate(payloads: list[bytes]) -> float:
    start = time.perf_counter()
    for data in payloads:
        decode_resize(data, 224)
    return len(payloads) / (time.perf_counter() - start)


def rate_beside_python(payloads: list[bytes]) -> float:
    """The decode rate while another thread runs Python for as long as the decode lasts."""
    rate: list[float] = []
    worker = threading.Thread(target=lambda: rate.append(decode_rate(payloads)))
    worker.start()
    spins = 0
    while worker.is_alive():
        spins += 1  # pure Python: holds the GIL until asked to drop it
    worker.join()
    return rate[0]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=600)
    parser.add_argument("--intervals", default="0.005,0.001,0.0005,0.0002")
    args = parser.parse_args(argv)
    records = read_records(dataset("jpeg", 500, 375, args.images))
    payloads = [fetch_bytes(r["uri"]) for r in records]
    default = sys.getswitchinterval()
    try:
        for interval in (float(s) for s in args.intervals.split(",")):
            sys.setswitchinterval(interval)
            alone, beside = decode_rate(payloads), rate_beside_python(payloads)
            print(f"switch interval {interval * 1e3:g} ms: decode + resize {alone:,.0f} images/s alone, "
                  f"{beside:,.0f} beside a pure-Python thread ({beside / alone:.2f})", flush=True)
    finally:
        sys.setswitchinterval(default)


if __name__ == "__main__":
    main(sys.argv[1:])
