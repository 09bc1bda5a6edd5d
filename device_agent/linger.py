"""Lingering close for connections the API refuses (all its slots taken), as Apache and nginx do:
after the 503 and a half-close, read and drop what the client still sends, then close. Closing
at once, with the client's body unread, resets the connection, and a client still sending its
body gets a broken pipe instead of the 503."""
from __future__ import annotations

import selectors
import socket
import threading
import time

# A refused client may send on for LINGER_S (Apache's short lingering close, its DoS-minded 2 s)
# and up to LINGER_BYTES (the default max_body_bytes: any body the agent would take) before its
# connection closes. At most LINGER_MAX refusals linger at once.
LINGER_S = 2.0
LINGER_BYTES = 16 << 20
LINGER_MAX = 32


class Lingering:
    """Refused connections, each drained until its client closes, LINGER_S have passed or it has
    sent LINGER_BYTES. One thread with one selector drains them all, started when a refusal comes
    and gone when none lingers, so a flood of refused clients holds one thread and at most
    LINGER_MAX sockets; the accept thread only hands sockets over and never waits."""

    def __init__(self):
        self._lock = threading.Lock()
        self._new: list[socket.socket] = []  # handed over, not yet picked up by the thread
        self._count = 0  # lingering now, picked up or not
        self._wake: socket.socket | None = None  # pokes the running thread; None: no thread runs

    def add(self, sock: socket.socket) -> bool:
        """Linger on `sock` (non-blocking, its 503 sent); False when LINGER_MAX already do."""
        with self._lock:
            if self._count >= LINGER_MAX or not self._poke():
                return False
            self._count += 1
            self._new.append(sock)
        return True

    def _poke(self) -> bool:
        """Wake the draining thread to pick up a socket, or start one; False if none can start."""
        if self._wake is not None:
            try:
                self._wake.send(b"\0")
            except BlockingIOError:  # poked already
                pass
            return True
        wake, woken = socket.socketpair()
        try:
            threading.Thread(target=self._run, args=(woken,), name="v2-api-linger", daemon=True).start()
        except RuntimeError:  # out of threads
            wake.close()
            woken.close()
            return False
        wake.setblocking(False)
        self._wake = wake
        return True

    def _run(self, woken: socket.socket) -> None:
        sel = selectors.DefaultSelector()
        sel.register(woken, selectors.EVENT_READ)  # data None: the wake-up socket
        buf = bytearray(1 << 16)
        while deadlines := self._pick_up(sel):
            for key, _ in sel.select(max(0.0, min(deadlines) - time.monotonic())):
                if key.data is None:
                    woken.recv(1 << 12)
                elif _drained(key, buf):
                    self._close(sel, key.fileobj)
            now = time.monotonic()
            for key in [k for k in sel.get_map().values() if k.data and k.data[0] <= now]:
                self._close(sel, key.fileobj)
        sel.close()
        woken.close()

    def _pick_up(self, sel: selectors.BaseSelector) -> list[float]:
        """Register the sockets handed over; their deadlines, or none (and the thread ends)."""
        with self._lock:
            for s in self._new:
                sel.register(s, selectors.EVENT_READ, [time.monotonic() + LINGER_S, LINGER_BYTES])
            self._new.clear()
            deadlines = [k.data[0] for k in sel.get_map().values() if k.data]
            if not deadlines:
                self._wake.close()
                self._wake = None
            return deadlines

    def _close(self, sel: selectors.BaseSelector, sock: socket.socket) -> None:
        sel.unregister(sock)
        sock.close()
        with self._lock:
            self._count -= 1


def _drained(key: selectors.SelectorKey, buf: bytearray) -> bool:
    """Read and drop what a lingering client sent; True when it is done: closed, reset, or sent
    all it may (key.data: [deadline, bytes it may still send])."""
    try:
        n = key.fileobj.recv_into(buf)
    except BlockingIOError:
        return False
    except OSError:
        return True
    key.data[1] -= n
    return n == 0 or key.data[1] <= 0
