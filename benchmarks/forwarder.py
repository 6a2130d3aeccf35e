"""The cheapest extra network path: a process that moves bytes between TCP ports and does nothing else.

benchmarks/relay.py puts one in front of a pair of nodes to measure what any process standing
on the path costs (one more loopback crossing each way and one more process to wake) apart
from what our relay adds to that (routing, dial-back, metering, asyncio). Each direction of
each connection is a thread blocked in `os.splice` through a pipe: the bytes never enter
Python, and a chunk costs two splice calls and one thread wake.

Run: `python -m benchmarks.forwarder LISTEN:TARGET [LISTEN:TARGET ...]` (loopback ports); it
prints `ready` once every port listens and runs until killed.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import threading

CHUNK = 1 << 16


def pump(source: socket.socket, sink: socket.socket) -> None:
    """Bytes from `source` to `sink` until `source` ends, then end `sink`'s sending side."""
    read_end, write_end = os.pipe()
    try:
        while True:
            n = os.splice(source.fileno(), write_end, CHUNK)
            if n == 0:
                break
            while n:
                n -= os.splice(read_end, sink.fileno(), n)
    except OSError:
        pass
    finally:
        os.close(read_end)
        os.close(write_end)
        try:
            sink.shutdown(socket.SHUT_WR)
        except OSError:
            pass


def serve(listener: socket.socket, target: int) -> None:
    while True:
        dialler, _ = listener.accept()
        try:
            upstream = socket.create_connection(("127.0.0.1", target))
        except OSError:
            dialler.close()
            continue
        for sock in (dialler, upstream):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for source, sink in ((dialler, upstream), (upstream, dialler)):
            threading.Thread(target=pump, args=(source, sink), daemon=True).start()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pairs", nargs="+", metavar="LISTEN:TARGET", help="forward loopback port LISTEN to loopback port TARGET")
    args = parser.parse_args()
    threads = []
    for pair in args.pairs:
        listen, target = (int(port) for port in pair.split(":"))
        listener = socket.create_server(("127.0.0.1", listen))
        threads.append(threading.Thread(target=serve, args=(listener, target), daemon=True))
    for thread in threads:
        thread.start()
    print("ready", flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit(0)
