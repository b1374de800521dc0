#!/usr/bin/python3
"""Records real RTSP conversations as fuzz seeds: a TCP proxy in front of an RTSP server that
writes what each side sent (requests; responses and interleaved frames) to one file per
connection and direction, cut to the first 64 KiB.
Usage: capture.py UPSTREAM_PORT OUT_DIR. Prints "ready PORT"; stop it with Ctrl-C."""
import itertools
import os
import socket
import sys
import threading

UPSTREAM = ("127.0.0.1", int(sys.argv[1]))
OUT = sys.argv[2]
LIMIT = 64 * 1024
counter = itertools.count()


def pump(src, dst, path):
    kept = bytearray()
    try:
        while data := src.recv(65536):
            dst.sendall(data)
            if len(kept) < LIMIT:
                kept += data[: LIMIT - len(kept)]
    except OSError:
        pass
    finally:
        with open(path, "wb") as f:
            f.write(kept)
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


listener = socket.socket()
listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listener.bind(("127.0.0.1", 0))
listener.listen(8)
print(f"ready {listener.getsockname()[1]}", flush=True)
while True:
    client, _ = listener.accept()
    server = socket.create_connection(UPSTREAM)
    n = next(counter)
    for a, b, name in ((client, server, "client"), (server, client, "server")):
        path = os.path.join(OUT, f"capture-{n}-{name}")
        threading.Thread(target=pump, args=(a, b, path), daemon=True).start()
