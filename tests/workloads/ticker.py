"""Test workload: appends ``time_ns app site pid token`` to a shared file every 10 ms.

``time_ns`` is CLOCK_MONOTONIC, which is one clock for every process on the machine (network
namespaces share it), so ticks written by agents in different "sites" can be compared and
``tests/harness/history.py`` can rebuild each instance's lifetime and count overlaps.

Usage: ``python ticker.py HISTORY_FILE [--interval 0.01] [--fail-on SITE[,SITE]]``; the
identity comes from the ``HARMONY_*`` variables the agent sets (CONTRACT section 4).
Standard library only; SIGTERM ends it at once (the default action) unless
``--term-delay`` asks it to linger, like a database flushing on shutdown.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ticker")
    parser.add_argument("history")
    parser.add_argument("--interval", type=float, default=0.01)
    parser.add_argument("--fail-on", default="", help="comma-separated sites where it crashes")
    parser.add_argument(
        "--term-delay", type=float, default=0.0, help="keep ticking this long after SIGTERM"
    )
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    app = os.environ.get("HARMONY_APP", "?")
    site = os.environ.get("HARMONY_SITE", "?")
    token = os.environ.get("HARMONY_FENCING_TOKEN", "0")
    if site in {s for s in args.fail_on.split(",") if s}:
        print(f"ticker: configured to fail on {site}", flush=True)
        return 3
    pid = os.getpid()
    stop_at: list[float] = []
    if args.term_delay > 0:
        signal.signal(signal.SIGTERM, lambda *_: stop_at.append(time.monotonic() + args.term_delay))
    fd = os.open(args.history, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    print(f"ticker: {app} on {site} pid {pid} token {token}", flush=True)
    next_at = time.monotonic()
    while not stop_at or time.monotonic() < stop_at[0]:
        # One small O_APPEND write per tick: atomic with respect to the other writers.
        os.write(fd, f"{time.monotonic_ns()} {app} {site} {pid} {token}\n".encode())
        next_at += args.interval
        delay = next_at - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        else:
            next_at = time.monotonic()
    return 0


if __name__ == "__main__":
    sys.exit(main())
