#!/usr/bin/env python3
"""Link delay for scripts/testnet.sh, where the kernel has no netem qdisc.

Runs in the test network's router namespace. iptables sends every forwarded packet to
NFQUEUE queue 0; this holds each one for the delay of the link it came in on plus the
delay of the link it goes out on (each with uniform jitter, as netem draws it), then
accepts it. Per (in, out) pair of links packets leave in the order they came, so jitter
never reorders a TCP stream (netem with a rate behaves the same way). Loss, partitions
and rate limits are not done here: iptables and tbf do those in the kernel.

The link table is a file of lines `IFNAME DELAY_US JITTER_US`; SIGHUP re-reads it.
Only the metadata of each packet crosses to user space (NFQNL_COPY_META), and GSO
packets come whole (NFQA_CFG_F_GSO), so a packet costs one small message each way.

Usage: testnet-delay.py LINKS_FILE [QUEUE]
"""

import heapq
import os
import random
import select
import signal
import socket
import struct
import sys
import time

NETLINK_NETFILTER = 12
NFNL_SUBSYS_QUEUE = 3
NFQNL_MSG_PACKET = 0
NFQNL_MSG_VERDICT = 1
NFQNL_MSG_CONFIG = 2
NFQA_PACKET_HDR = 1
NFQA_VERDICT_HDR = 2
NFQA_IFINDEX_INDEV = 5
NFQA_IFINDEX_OUTDEV = 6
NFQA_CFG_CMD = 1
NFQA_CFG_PARAMS = 2
NFQA_CFG_QUEUE_MAXLEN = 3
NFQA_CFG_MASK = 4
NFQA_CFG_FLAGS = 5
NFQNL_CFG_CMD_BIND = 1
NFQNL_COPY_META = 1
NFQA_CFG_F_GSO = 1 << 2
NLM_F_REQUEST = 1
NLM_F_ACK = 4
NLMSG_ERROR = 2
NF_ACCEPT = 1
SOL_NETLINK = 270
NETLINK_NO_ENOBUFS = 5
# Packets held at once, like netem's `limit`; past it the kernel drops.
QUEUE_MAXLEN = 65536


def attr(kind, payload):
    """One netlink attribute, padded to 4 bytes."""
    raw = struct.pack("=HH", 4 + len(payload), kind) + payload
    return raw + b"\0" * (-len(raw) % 4)


def message(kind, queue, attrs, flags=NLM_F_REQUEST, seq=0):
    """A netfilter-queue netlink message: nlmsghdr, nfgenmsg, attributes."""
    body = struct.pack("=BBH", socket.AF_UNSPEC, 0, socket.htons(queue)) + b"".join(attrs)
    header = struct.pack("=IHHII", 16 + len(body), (NFNL_SUBSYS_QUEUE << 8) | kind, flags, seq, 0)
    return header + body


def attributes(data, offset, end):
    """The attributes of one message, by type (the nested flag bits cleared)."""
    found = {}
    while offset + 4 <= end:
        length, kind = struct.unpack_from("=HH", data, offset)
        if length < 4:
            break
        found[kind & 0x3FFF] = data[offset + 4 : offset + length]
        offset += (length + 3) & ~3
    return found


def read_links(path):
    """IFNAME DELAY_US JITTER_US lines -> {ifindex: (delay_s, jitter_s)}."""
    links = {}
    with open(path) as f:
        for line in f:
            parts = line.split()
            if len(parts) != 3 or parts[0].startswith("#"):
                continue
            try:
                index = socket.if_nametoindex(parts[0])
            except OSError:
                continue
            links[index] = (int(parts[1]) / 1e6, int(parts[2]) / 1e6)
    return links


def configure(sock, queue):
    seq = 1
    requests = [
        [attr(NFQA_CFG_CMD, struct.pack("!BxH", NFQNL_CFG_CMD_BIND, socket.AF_INET))],
        [
            attr(NFQA_CFG_PARAMS, struct.pack("!IB", 0, NFQNL_COPY_META)),
            attr(NFQA_CFG_QUEUE_MAXLEN, struct.pack("!I", QUEUE_MAXLEN)),
            attr(NFQA_CFG_MASK, struct.pack("!I", NFQA_CFG_F_GSO)),
            attr(NFQA_CFG_FLAGS, struct.pack("!I", NFQA_CFG_F_GSO)),
        ],
    ]
    for attrs in requests:
        sock.send(message(NFQNL_MSG_CONFIG, queue, attrs, NLM_F_REQUEST | NLM_F_ACK, seq))
        reply = sock.recv(65536)
        _, kind, _, _, _ = struct.unpack_from("=IHHII", reply, 0)
        if kind == NLMSG_ERROR:
            (err,) = struct.unpack_from("=i", reply, 16)
            if err != 0:
                sys.exit(f"testnet-delay: binding NFQUEUE {queue} failed: {os.strerror(-err)}")
        seq += 1


def main():
    if len(sys.argv) not in (2, 3):
        sys.exit(__doc__.strip().splitlines()[-1])
    links_path = sys.argv[1]
    queue = int(sys.argv[2]) if len(sys.argv) == 3 else 0
    links = read_links(links_path)
    reload = [False]
    signal.signal(signal.SIGHUP, lambda *_: reload.__setitem__(0, True))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))

    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
    sock.bind((0, 0))
    try:
        sock.setsockopt(socket.SOL_SOCKET, 33, 64 << 20)  # SO_RCVBUFFORCE
    except OSError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 20)
    sock.setsockopt(SOL_NETLINK, NETLINK_NO_ENOBUFS, 1)
    configure(sock, queue)
    sock.setblocking(False)
    print(f"testnet-delay: queue {queue}, {len(links)} links", flush=True)

    held = []  # (release time, packet id)
    last = {}  # (in, out) -> last release time
    rng = random.Random(os.getpid())
    seq = 0
    while True:
        if reload[0]:
            reload[0] = False
            links = read_links(links_path)
        now = time.monotonic()
        timeout = max(0.0, held[0][0] - now) if held else 1.0
        try:
            ready, _, _ = select.select([sock], [], [], timeout)
        except InterruptedError:
            ready = []
        if ready:
            while True:
                try:
                    data = sock.recv(65536)
                except BlockingIOError:
                    break
                except OSError:
                    break
                offset = 0
                now = time.monotonic()
                while offset + 16 <= len(data):
                    length, kind, _, _, _ = struct.unpack_from("=IHHII", data, offset)
                    if length < 16:
                        break
                    if kind == (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET:
                        a = attributes(data, offset + 20, offset + length)
                        hdr = a.get(NFQA_PACKET_HDR)
                        if hdr is not None:
                            (pid,) = struct.unpack_from("!I", hdr, 0)
                            ins = struct.unpack("!I", a[NFQA_IFINDEX_INDEV])[0] if NFQA_IFINDEX_INDEV in a else 0
                            outs = struct.unpack("!I", a[NFQA_IFINDEX_OUTDEV])[0] if NFQA_IFINDEX_OUTDEV in a else 0
                            delay = 0.0
                            for index in (ins, outs):
                                d, j = links.get(index, (0.0, 0.0))
                                if d or j:
                                    delay += max(0.0, d + rng.uniform(-j, j))
                            release = max(now + delay, last.get((ins, outs), 0.0))
                            last[(ins, outs)] = release
                            heapq.heappush(held, (release, pid))
                    offset += (length + 3) & ~3
        now = time.monotonic()
        while held and held[0][0] <= now:
            _, pid = heapq.heappop(held)
            seq += 1
            verdict = attr(NFQA_VERDICT_HDR, struct.pack("!II", NF_ACCEPT, pid))
            try:
                sock.send(message(NFQNL_MSG_VERDICT, queue, [verdict], NLM_F_REQUEST, seq))
            except OSError as e:
                print(f"testnet-delay: verdict for packet {pid}: {e}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
