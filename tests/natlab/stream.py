#!/usr/bin/env python3
"""A live byte stream for the NAT lab's path-change benchmark (tests/natlab.rs,
bench_path_types_and_path_change_hiccups).

serve DIR PORT RATE
    An HTTP/1.0 server on 127.0.0.1:PORT that sends the files of DIR at RATE bytes/s: CHUNK
    bytes at a time on a fixed schedule, as a live source (a camera, a broadcast) does, so a
    stall of the path shows as a gap at the reader, not as a fuller buffer. Prints "ready".
get PORT PATH
    `GET PATH HTTP/1.0` to 127.0.0.1:PORT; reads the body as it arrives and prints
    `bytes=N sha256=HEX`, then the wall-clock time of every read, one a line (seconds since
    midnight UTC, as in the tunnel's log lines). Exits 1 on a short body.
"""
import hashlib
import os
import socket
import socketserver
import sys
import time

CHUNK = 8192


def serve(root, port, rate):
    class Handler(socketserver.StreamRequestHandler):
        def handle(self):
            words = self.rfile.readline(65536).decode("latin-1").split()
            while self.rfile.readline(65536) not in (b"\r\n", b"\n", b""):
                pass
            name = os.path.basename(words[1]) if len(words) > 1 else ""
            try:
                with open(os.path.join(root, name), "rb") as f:
                    body = f.read()
            except OSError:
                self.wfile.write(b"HTTP/1.0 404 Not Found\r\nContent-Length: 0\r\n\r\n")
                return
            self.wfile.write(f"HTTP/1.0 200 OK\r\nContent-Length: {len(body)}\r\n\r\n".encode())
            start = time.monotonic()
            for off in range(0, len(body), CHUNK):
                wait = start + off / rate - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                self.wfile.write(body[off:off + CHUNK])

    class Server(socketserver.ThreadingTCPServer):
        allow_reuse_address = True
        daemon_threads = True

    with Server(("127.0.0.1", port), Handler) as server:
        print("ready", flush=True)
        server.serve_forever()


def get(port, path):
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(f"GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        data = sock.recv(65536)
        if not data:
            sys.exit(f"no response head: {head!r}")
        head += data
    head, body = head.split(b"\r\n\r\n", 1)
    length = next(int(l.split(b":")[1]) for l in head.split(b"\r\n")
                  if l.lower().startswith(b"content-length:"))
    wall = time.time() - time.monotonic()
    digest, got = hashlib.sha256(body), len(body)
    reads = [time.monotonic()]
    while got < length:
        data = sock.recv(65536)
        if not data:
            break
        reads.append(time.monotonic())
        digest.update(data)
        got += len(data)
    print(f"bytes={got} sha256={digest.hexdigest()}")
    print("\n".join(f"{(wall + t) % 86400:.4f}" for t in reads), flush=True)
    sys.exit(0 if got == length else 1)


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(sys.argv[2], int(sys.argv[3]), float(sys.argv[4]))
    else:
        get(int(sys.argv[2]), sys.argv[3])
