#!/usr/bin/env python3
"""A userspace link emulator: splices two interfaces and holds every frame for DELAY_MS in
each direction, dropping LOSS_PCT percent of them at random (independently, both ways; a
fixed seed). This kernel has no netem, so the NAT lab and the RTSP benchmark impair a link
with this. One Python loop: fine for a few thousand frames a second (a 1.5 Mbit/s video), not
for throughput. usage: delay.py IF_A IF_B DELAY_MS [LOSS_PCT]"""
import heapq
import random
import select
import socket
import sys
import time

ETH_P_ALL = 3
PACKET_OUTGOING = 4

a, b, delay = sys.argv[1], sys.argv[2], float(sys.argv[3]) / 1000
loss = float(sys.argv[4]) / 100 if len(sys.argv) > 4 else 0.0
rng = random.Random(1)
socks = {}
for name in (a, b):
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    s.bind((name, 0))
    s.setblocking(False)
    socks[name] = s
other = {a: socks[b], b: socks[a]}
queue = []  # (due, seq, out socket, frame)
seq = 0
print("ready", flush=True)
while True:
    timeout = max(0.0, queue[0][0] - time.monotonic()) if queue else None
    readable, _, _ = select.select(list(socks.values()), [], [], timeout)
    for s in readable:
        for _ in range(256):
            try:
                frame, addr = s.recvfrom(65535)
            except BlockingIOError:
                break
            if addr[2] == PACKET_OUTGOING or (loss and rng.random() < loss):
                continue
            seq += 1
            heapq.heappush(queue, (time.monotonic() + delay, seq, other[addr[0]], frame))
    now = time.monotonic()
    while queue and queue[0][0] <= now:
        _, _, out, frame = heapq.heappop(queue)
        try:
            out.send(frame)
        except OSError:
            pass
