"""`python -m tests.gcs serve [--latency-ms 40] [--bucket NAME …]`: fake-gcs-server behind a FaultProxy for
benchmarks; prints the proxy's URL (the value for STORAGE_EMULATOR_HOST) and serves until Ctrl-C."""

from __future__ import annotations

import argparse
import signal
import threading

from tests.gcs.proxy import FaultProxy
from tests.gcs.server import GcsServer


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.gcs", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve until Ctrl-C")
    serve.add_argument("--latency-ms", type=float, default=0.0, help="added to every request")
    serve.add_argument("--bucket", action="append", default=[], help="a bucket to create (repeatable)")
    args = parser.parse_args(argv)
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):  # also when started in the background, where SIGINT is ignored
        signal.signal(signum, lambda *_: stop.set())
    with GcsServer() as server, FaultProxy(server.url, latency_s=args.latency_ms / 1000) as proxy:
        for bucket in args.bucket:
            server.make_bucket(bucket)
        print(proxy.url, flush=True)
        stop.wait()


if __name__ == "__main__":
    main()
