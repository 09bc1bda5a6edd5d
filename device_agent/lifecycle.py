"""What the agent is doing right now, told to the status topic, the HTTP API, the log and systemd.

    starting -> loading model -> (building engine) -> serving -> stopping
                              \\-> no model (nothing to load, or it failed: waits for an update)

systemd (`Type=notify`, deploy/systemd/edgepack-agent.service) hears READY=1 once the model
serves (or the agent knowingly serves none), STATUS= lines at every change, EXTEND_TIMEOUT_USEC
while a slow start (a TensorRT engine build: minutes on a Jetson) makes progress, WATCHDOG=1
while the agent is healthy, and STOPPING=1. The protocol is a datagram on the unix socket named
by $NOTIFY_SOCKET, written here by hand (no systemd library); without it every call is a no-op.
"""
from __future__ import annotations

import logging
import os
import socket
import threading
import time
from enum import Enum
from typing import Callable

log = logging.getLogger("edgepack.agent")


class AgentState(str, Enum):
    STARTING = "starting"
    LOADING = "loading model"
    BUILDING = "building engine"
    SERVING = "serving"
    NO_MODEL = "no model"
    STOPPING = "stopping"


READY_STATES = (AgentState.SERVING, AgentState.NO_MODEL)


class SdNotify:
    """sd_notify(3) by hand: one datagram per message to $NOTIFY_SOCKET (a path, or '@name' in the
    abstract namespace). Errors are logged once and never raised: systemd is not the agent's job."""

    def __init__(self, env: dict | None = None):
        env = os.environ if env is None else env
        addr = env.get("NOTIFY_SOCKET") or None
        if addr and addr.startswith("@"):
            addr = "\0" + addr[1:]
        self.addr = addr
        self._sock: socket.socket | None = None
        self._warned = False
        usec = env.get("WATCHDOG_USEC")
        pid = env.get("WATCHDOG_PID")
        ok = usec and usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid()))
        self.watchdog_s = int(usec) / 1e6 if ok else None

    @property
    def enabled(self) -> bool:
        return self.addr is not None

    def send(self, *lines: str) -> bool:
        if not self.addr:
            return False
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto("\n".join(lines).encode(), self.addr)
            return True
        except OSError as e:
            if not self._warned:
                self._warned = True
                log.warning("cannot notify systemd at %s: %s", self.addr.replace("\0", "@"), e)
            return False

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


class Lifecycle:
    """Holds the agent's state; on each change logs it, calls `on_change` (the retained status) and
    tells systemd. `healthy` decides whether the watchdog is petted: a stuck or broken agent stops
    petting and systemd restarts it (Restart=on-failure)."""

    def __init__(self, *, notify: SdNotify | None = None, on_change: Callable[[], None] = lambda: None,
                 healthy: Callable[[], bool] = lambda: True, clock: Callable[[], float] = time.monotonic):
        self.notify = notify or SdNotify()
        self.on_change, self.healthy, self.clock = on_change, healthy, clock
        self.state = AgentState.STARTING
        self.detail: str | None = None
        self._since = clock()
        self._ready_sent = False
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def set(self, state: AgentState, detail: str | None = None) -> None:
        if state == self.state and detail == self.detail:
            return
        self.state, self.detail, self._since = state, detail, self.clock()
        text = state.value + (f": {detail}" if detail else "")
        log.info("agent %s", text, extra={"fields": {"state": state.value, **({"detail": detail} if detail else {})}})
        lines = [f"STATUS={text}"]
        if state in READY_STATES and not self._ready_sent:
            self._ready_sent = True
            lines.insert(0, "READY=1")
        if state is AgentState.STOPPING:
            lines.insert(0, "STOPPING=1")
        self.notify.send(*lines)
        self.on_change()

    def describe(self) -> dict:
        return {"state": self.state.value, "detail": self.detail,
                "for_s": round(self.clock() - self._since, 1)}

    def slow_phase(self, state: AgentState, detail: str, *, every_s: float = 15.0,
                   extend_s: float = 120.0) -> "_SlowPhase":
        """`with lifecycle.slow_phase(...)`: the state for a step that may take minutes; logs progress
        every `every_s` and asks systemd for `extend_s` more start-up time each time."""
        return _SlowPhase(self, state, detail, every_s, extend_s)

    # ---- watchdog ----
    def start_watchdog(self) -> None:
        """Pet at half the WatchdogSec period while healthy (no-op when systemd set no watchdog)."""
        if not self.notify.watchdog_s:
            return
        t = threading.Thread(target=self._watchdog, args=(self.notify.watchdog_s / 2,), name="sd-watchdog",
                             daemon=True)
        t.start()
        self._threads.append(t)

    def _watchdog(self, period: float) -> None:
        sick = False
        while not self._stop.wait(period):
            try:
                ok = self.state is not AgentState.STOPPING and self.healthy()
            except Exception:  # a broken health check is a broken agent
                ok = False
            if ok:
                self.notify.send("WATCHDOG=1")
                if sick:
                    log.info("agent healthy again: petting the systemd watchdog")
            elif not sick:
                log.error("agent unhealthy: no longer petting the systemd watchdog (it will restart the agent)")
            sick = not ok

    def close(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=2)
        self.notify.close()


class _SlowPhase:
    def __init__(self, life: Lifecycle, state: AgentState, detail: str, every_s: float, extend_s: float):
        self.life, self.state, self.detail, self.every_s, self.extend_s = life, state, detail, every_s, extend_s
        self._done = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "_SlowPhase":
        self.life.set(self.state, self.detail)
        self.life.notify.send(f"EXTEND_TIMEOUT_USEC={int(self.extend_s * 1e6)}")
        self._thread = threading.Thread(target=self._tick, name="slow-phase", daemon=True)
        self._thread.start()
        return self

    def _tick(self) -> None:
        t0 = time.monotonic()
        while not self._done.wait(self.every_s):
            elapsed = time.monotonic() - t0
            log.info("%s: %s, %.0f s so far (first start only; later starts use the cache)", self.state.value,
                     self.detail, elapsed, extra={"fields": {"state": self.state.value, "elapsed_s": round(elapsed)}})
            self.life.notify.send(f"EXTEND_TIMEOUT_USEC={int(self.extend_s * 1e6)}",
                                  f"STATUS={self.state.value}: {self.detail} ({elapsed:.0f} s)")

    def __exit__(self, *exc) -> None:
        self._done.set()
        if self._thread:
            self._thread.join(timeout=2)
