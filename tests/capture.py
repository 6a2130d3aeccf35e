"""Capture the TCP payload bytes on some interfaces, per flow, until stdin closes.

Usage (inside the namespace that owns the interfaces):
    python -m tests.capture OUT.json IFACE...
Prints `ready` once listening; on EOF of stdin writes {flow: hex of its payload bytes, in
arrival order} to OUT.json and exits. A raw AF_PACKET socket sees every frame the
interface carries, both ways: here, what a relay forwards to and from the nodes behind it.
Retransmitted segments may repeat bytes; nothing here depends on their absence.
"""

from __future__ import annotations

import json
import select
import socket
import struct
import sys
import threading

ETH_P_ALL = 0x0003


def payload(frame: bytes) -> tuple[str, bytes] | None:
    """(flow "src:port>dst:port", TCP payload) of an Ethernet IPv4 TCP frame, else None."""
    if len(frame) < 14 + 20 or frame[12:14] != b"\x08\x00":
        return None
    ip = frame[14:]
    header = (ip[0] & 0x0F) * 4
    if ip[9] != 6:
        return None
    total = struct.unpack("!H", ip[2:4])[0]
    tcp = ip[header:total]
    if len(tcp) < 20:
        return None
    sport, dport = struct.unpack("!HH", tcp[:4])
    offset = (tcp[12] >> 4) * 4
    data = tcp[offset:]
    if not data:
        return None
    return f"{socket.inet_ntoa(ip[12:16])}:{sport}>{socket.inet_ntoa(ip[16:20])}:{dport}", bytes(data)


def main(out: str, interfaces: list[str]) -> None:
    sockets = []
    for name in interfaces:
        raw = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        raw.bind((name, 0))
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        sockets.append(raw)
    flows: dict[str, bytearray] = {}
    stop = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
    print("ready", flush=True)
    while not stop.is_set():
        readable, _, _ = select.select(sockets, [], [], 0.1)
        for raw in readable:
            frame, address = raw.recvfrom(65536)
            if address[2] == socket.PACKET_OUTGOING and len(interfaces) > 1:
                pass  # both directions are wanted: outgoing frames are the relay's sends
            found = payload(frame)
            if found is not None:
                flows.setdefault(found[0], bytearray()).extend(found[1])
    with open(out, "w") as f:
        json.dump({flow: data.hex() for flow, data in flows.items()}, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
