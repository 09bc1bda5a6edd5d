"""One network thread for many MQTT clients (the fleet simulator runs hundreds in one process).

paho's own loop (`loop_start`) costs a thread per client and uses select(), which cannot watch a
descriptor above 1024. `NetLoop` drives any number of paho clients from one thread through paho's
external-loop API: an epoll selector over their sockets, `loop_read` when one is readable,
`loop_write` for the ones paho asks to write (publish() from any thread registers the socket),
`loop_misc` once a second (keep-alive), and reconnects with per-client back-off. Connects are
rate-limited per pass, so a thousand clients starting together do not stall the loop.

Callbacks (on_message, on_connect) run on the loop thread: they must not block (no
publish_wait/subscribe_wait there)."""
from __future__ import annotations

import logging
import selectors
import socket
import threading
import time
from dataclasses import dataclass

log = logging.getLogger("edgepack.netloop")


@dataclass
class _Entry:
    client: object  # paho.mqtt.client.Client
    min_backoff: float
    max_backoff: float
    backoff: float = 0.0
    next_try: float = 0.0
    down_until: float = 0.0  # held off the network (simulated outage)
    stopping: bool = False


class NetLoop:
    def __init__(self, *, connects_per_pass: int = 50, name: str = "netloop"):
        self.connects_per_pass = connects_per_pass
        self._sel = selectors.DefaultSelector()
        self._lock = threading.Lock()
        self._entries: dict[int, _Entry] = {}  # id(client) -> entry
        self._writers: set[int] = set()  # clients paho wants written
        self._armed: dict[int, object] = {}  # id(client) -> socket registered for writing
        self._socks: dict[int, object] = {}  # id(client) -> socket registered for reading
        self._calls: list = []  # functions to run on the loop thread
        self._idle: set[int] = set()  # clients without a socket (to connect when due)
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    # ---- clients join and leave ----
    def add(self, client, *, min_backoff: float = 1.0, max_backoff: float = 30.0) -> None:
        """`client` has had connect_async(); the loop connects it (and reconnects it) from now on."""
        e = _Entry(client, min_backoff=max(min_backoff, 0.1), max_backoff=max(max_backoff, min_backoff))
        client.on_socket_open = self._opened
        client.on_socket_close = self._closed
        client.on_socket_register_write = self._want_write
        client.on_socket_unregister_write = self._no_write
        with self._lock:
            self._entries[id(client)] = e
            self._idle.add(id(client))
        self._wake()

    def remove(self, client, *, timeout: float = 5.0) -> None:
        """Disconnect cleanly (DISCONNECT sent, so no Last Will) and forget the client."""
        done = threading.Event()

        def go():
            e = self._entries.get(id(client))
            if e is not None:
                e.stopping = True
            if client.socket() is not None:
                client.disconnect()
                client.loop_write()
            self._forget(client)
            with self._lock:
                self._entries.pop(id(client), None)
                self._idle.discard(id(client))
            done.set()

        self.call(go)
        if threading.current_thread() is not self._thread:
            done.wait(timeout)

    def drop(self, client, seconds: float) -> None:
        """Cut the client's connection without a DISCONNECT (the broker publishes its Last Will)
        and keep it off the network for `seconds`: a device losing its link."""
        def go():
            e = self._entries.get(id(client))
            if e is None:
                return
            e.down_until = time.monotonic() + seconds
            sock = client.socket()
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                client.loop_read()  # reads EOF: paho closes and reports the lost connection
        self.call(go)

    def call(self, fn) -> None:
        with self._lock:
            self._calls.append(fn)
        self._wake()

    def stop(self) -> None:
        self._stop.set()
        self._wake()
        self._thread.join(10)

    @property
    def clients(self) -> int:
        return len(self._entries)

    # ---- paho's external-loop callbacks (any thread) ----
    def _opened(self, client, userdata, sock) -> None:
        with self._lock:
            self._socks[id(client)] = sock
            self._idle.discard(id(client))
            try:
                self._sel.register(sock, selectors.EVENT_READ, client)
            except (KeyError, ValueError):
                pass

    def _closed(self, client, userdata, sock) -> None:
        e = self._entries.get(id(client))
        if e is not None:  # the next connect waits: a broker that refuses us is not hammered
            e.backoff = min(max(e.backoff * 2, e.min_backoff), e.max_backoff)
            e.next_try = time.monotonic() + e.backoff
        self._forget(client)
        with self._lock:
            if id(client) in self._entries:
                self._idle.add(id(client))

    def connected(self, client) -> None:
        """The broker accepted the client (CONNACK): the back-off starts over."""
        e = self._entries.get(id(client))
        if e is not None:
            e.backoff = 0.0
            e.next_try = 0.0

    def _forget(self, client) -> None:
        with self._lock:
            sock = self._socks.pop(id(client), None)
            self._armed.pop(id(client), None)
            self._writers.discard(id(client))
            if sock is not None:
                try:
                    self._sel.unregister(sock)
                except (KeyError, ValueError):
                    pass

    def _want_write(self, client, userdata, sock) -> None:
        with self._lock:
            self._writers.add(id(client))
        if threading.current_thread() is not self._thread:
            self._wake()

    def _no_write(self, client, userdata, sock) -> None:
        with self._lock:
            self._writers.discard(id(client))

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except (BlockingIOError, OSError):
            pass  # a wake-up is already pending

    # ---- the loop ----
    def _run(self) -> None:
        next_misc = 0.0
        while not self._stop.is_set():
            try:
                self._pass()
                now = time.monotonic()
                self._connect(now)
                if now >= next_misc:
                    next_misc = now + 1.0
                    self._misc()
            except Exception:  # one bad client must not stop every other one
                log.exception("network loop pass failed")
                time.sleep(0.05)

    def _pass(self) -> None:
        with self._lock:
            calls, self._calls = self._calls, []
            want = set(self._writers)
        for fn in calls:
            fn()
        # sockets paho wants written: watch them for EVENT_WRITE until paho says it is done
        for cid in want - self._armed.keys():
            with self._lock:
                sock = self._socks.get(cid)
                if sock is None:
                    continue
                key = self._sel.get_map().get(sock.fileno()) if sock.fileno() >= 0 else None
                if key is None:
                    continue
                self._sel.modify(sock, selectors.EVENT_READ | selectors.EVENT_WRITE, key.data)
                self._armed[cid] = sock
        for cid in list(self._armed.keys() - want):
            with self._lock:
                sock = self._armed.pop(cid, None)
                key = self._sel.get_map().get(sock.fileno()) if sock is not None and sock.fileno() >= 0 else None
                if key is not None:
                    self._sel.modify(sock, selectors.EVENT_READ, key.data)
        for key, mask in self._sel.select(timeout=0.2):
            c = key.data
            if c is None:
                try:
                    while self._wake_r.recv(4096):
                        pass
                except (BlockingIOError, OSError):
                    pass
                continue
            if mask & selectors.EVENT_READ:
                c.loop_read()
            if mask & selectors.EVENT_WRITE and c.socket() is not None:
                c.loop_write()

    def _misc(self) -> None:
        for e in list(self._entries.values()):
            if e.client.socket() is not None:
                e.client.loop_misc()  # keep-alive pings, and a broker that stopped answering

    def _connect(self, now: float) -> None:
        if not self._idle:
            return
        started = 0
        with self._lock:
            idle = [self._entries[i] for i in self._idle if i in self._entries]
        for e in idle:
            if started >= self.connects_per_pass:
                self._wake()  # more to connect: straight into the next pass
                return
            c = e.client
            if c.socket() is not None or e.stopping or now < e.next_try or now < e.down_until:
                continue
            started += 1
            try:
                c.reconnect()  # a blocking TCP connect: quick on a LAN, bounded by paho's connect timeout
            except (OSError, ValueError) as err:  # broker down or refusing: back off
                e.backoff = min(max(e.backoff * 2, e.min_backoff), e.max_backoff)
                e.next_try = now + e.backoff
                log.debug("connect failed (%s); next try in %.1f s", err, e.backoff)
