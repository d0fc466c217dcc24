"""Stalled uploads against `wherefrom serve`: `python -m bench.api_stall [-n 100] [--read-timeout 5]`.

Opens N connections that each send a JSON upload's head and start a 60 KiB chunk, sending what the
socket takes at once, then stall: first without
the token (the server should answer 401 at once, unread), then with it (WHEREFROM_API_MAX_UPLOADS of
them are received and dropped with 408 after the read timeout, the rest get 503). Prints the
server's RSS growth while they are open and how long until the server has closed every one.
"""

from __future__ import annotations

import argparse
import collections
import selectors
import socket
import tempfile
import time
from urllib.parse import urlsplit

from bench.api import TOKEN, start_server


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        kb = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return kb / 1024


def stall(base: str, n: int, token: bool) -> list[socket.socket]:
    address = urlsplit(base)
    auth = f"Authorization: Bearer {TOKEN}\r\n" if token else ""
    head = (f"POST /corpora/stall/documents HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n{auth}"
            "Transfer-Encoding: chunked\r\n\r\nf000\r\n").encode()
    socks = []
    for _ in range(n):
        sock = socket.create_connection((address.hostname, address.port))
        sock.sendall(head)
        sock.setblocking(False)
        try:
            sock.send(b" " * 0xF000)  # what the socket takes now; a 401 may already have closed it
        except OSError:
            pass
        socks.append(sock)
    return socks


def until_closed(socks: list[socket.socket], pid: int) -> tuple[float, float, collections.Counter]:
    """Seconds until the server closed the last one, its peak RSS meanwhile, and the statuses it sent."""
    started, peak = time.perf_counter(), rss_mb(pid)
    selector, answers = selectors.DefaultSelector(), {}
    for sock in socks:
        selector.register(sock, selectors.EVENT_READ)
        answers[sock] = b""
    while selector.get_map():
        for key, _ in selector.select(timeout=0.05):
            try:
                chunk = key.fileobj.recv(65536)
            except ConnectionResetError:  # closed with our unread body bytes in its buffer
                chunk = b""
            answers[key.fileobj] += chunk
            if not chunk:
                selector.unregister(key.fileobj)
                key.fileobj.close()
        peak = max(peak, rss_mb(pid))
    statuses = collections.Counter(a[9:12].decode() or "no answer" for a in answers.values())
    return time.perf_counter() - started, peak, statuses


def measure(pid: int, base: str, n: int, token: bool) -> str:
    before = rss_mb(pid)
    socks = stall(base, n, token)
    closed, peak, statuses = until_closed(socks, pid)
    who = "authenticated" if token else "unauthenticated"
    return (f"{n} stalled {who} uploads: peak RSS +{peak - before:.1f} MB, all closed by the server "
            f"{closed:.2f} s after the last head was sent; answers {dict(statuses)}")


def run(n: int, read_timeout: float) -> None:
    with tempfile.TemporaryDirectory() as data_dir:
        proc, base = start_server(data_dir, WHEREFROM_API_READ_TIMEOUT=str(read_timeout))
        try:
            print(f"server RSS at start: {rss_mb(proc.pid):.1f} MB (read timeout {read_timeout:g} s)")
            for token in (False, True):
                print(measure(proc.pid, base, n, token))
        finally:
            proc.terminate()
            proc.wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("-n", type=int, default=100, help="stalled connections per phase")
    parser.add_argument("--read-timeout", type=float, default=5.0, help="WHEREFROM_API_READ_TIMEOUT for the server")
    args = parser.parse_args()
    run(args.n, args.read_timeout)
