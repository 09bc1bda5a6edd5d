"""A child process that keeps a slow import (TensorFlow: 5-10 s) between conversion steps.

A worker module (tflite_worker, onnx2tf_worker) runs a step either one-shot (`python -m MODULE
REQUEST`) or served (`python -m MODULE --serve`: request paths on its stdin, one line back on its
stdout when each step is done). `ask` hands a request to the module's served child, starting one as
needed: a new one for a changed environment, after MAX_STEPS steps (what a converter keeps between
steps is let go now and then), or after the last one died. A step that kills the child fails that
step only. The child leaves after IDLE_S without a request, when the build's process goes (its
stdin closes), or after a step that left it holding more than KEEP_BYTES (a big model's conversion:
onnx2tf's child kept 4.7 GB after MPNet's, for the rest of the build). Each step writes its own log
(stdout and stderr, the native libraries' too)."""
from __future__ import annotations

import atexit
import os
import select
import subprocess
import sys
import threading
from pathlib import Path
from typing import Callable

IDLE_S = 300
MAX_STEPS = 25
KEEP_BYTES = int(os.environ.get("EDGEPACK_SERVED_KEEP_BYTES") or 2 << 30)  # the variable: for the tests
# Changed between calls without changing what a child does: no new child for them. Most are set by
# TensorFlow's import, in the build's process too once it has converted in-process (the child sets
# them again on its own import).
_VOLATILE = frozenset({"PYTEST_CURRENT_TEST", "TF_CPP_MIN_LOG_LEVEL", "TF2_BEHAVIOR", "KMP_INIT_AT_FORK",
                       "KMP_DUPLICATE_LIB_OK", "ENABLE_RUNTIME_UPTIME_TELEMETRY", "TPU_ML_PLATFORM",
                       "TPU_ML_PLATFORM_VERSION", "HDF5_PLUGIN_PATH"})


class Server:
    """One served child: one request at a time, a path in, a line back when the step is done."""

    def __init__(self, module: str, env: dict):
        self.key, self.steps, self.leaving = env_key(env), 0, False
        self.proc = subprocess.Popen([sys.executable, "-m", module, "--serve"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     env=env, cwd=Path.home() if Path.home().is_dir() else "/")

    def ask(self, request: Path, timeout_s: float):
        """0 when the step is done, the child's exit code when it died in the step, "timeout" when it ran
        out of time; None when it was not there to take the request (it had left, idle)."""
        try:
            self.proc.stdin.write(f"{request}\n".encode())
            self.proc.stdin.flush()
        except OSError:  # it had died (idle, or killed)
            return None
        try:
            ready, _, _ = select.select([self.proc.stdout], [], [], timeout_s)
            if not ready:
                self.close(kill=True)
                return "timeout"
            line = self.proc.stdout.readline()
            if line:
                self.leaving = line.strip() == b"done leaving"  # it holds too much: it exits now
                return 0
        except BaseException:  # interrupted between request and reply: a later reply would be this one's
            self.close(kill=True)
            raise
        code = self.proc.wait()
        return None if code == 0 else code  # 0: it was leaving (idle) as the request came, and never read it

    def close(self, kill: bool = False) -> None:
        if kill:
            self.proc.kill()
        else:
            try:
                self.proc.stdin.close()  # it leaves at end of input
            except OSError:
                pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


servers: dict[str, Server] = {}  # module -> its child
_locks: dict[str, threading.Lock] = {}
_guard = threading.Lock()


def env_key(env: dict) -> tuple:
    return tuple(sorted((k, v) for k, v in env.items() if k not in _VOLATILE))


def ask(module: str, request: Path, env: dict, *, timeout_s: float):
    """Run a request in `module`'s served child (see Server.ask for the answer); None when another
    thread is using that child, or it could not take the request: the caller runs the step one-shot."""
    with _guard:
        lock = _locks.setdefault(module, threading.Lock())
    if not lock.acquire(blocking=False):
        return None
    try:
        for _ in range(2):  # a child that left while idle is started again once
            server = servers.get(module)
            if server is None or server.key != env_key(env) or server.proc.poll() is not None \
                    or server.steps >= MAX_STEPS:
                if server is not None:
                    server.close()
                server = servers[module] = Server(module, env)
            code = server.ask(request, timeout_s)
            server.steps += 1
            if code is None:
                servers.pop(module, None)
                continue
            if server.leaving:
                servers.pop(module, None)
                server.close()
            if code != 0:
                servers.pop(module, None)  # it died (or was killed): the next step starts a fresh one
            return code
        return None
    finally:
        lock.release()


@atexit.register
def _close_all() -> None:
    for server in list(servers.values()):
        server.close()


def loop(handle: Callable[[Path], None], log_of: Callable[[Path], Path], *, keep_bytes: int | None = None) -> int:
    """The child's side: requests from stdin until it closes or stays quiet for IDLE_S; each step's
    output (Python's and the native libraries', through fds 1 and 2) goes to `log_of(request)`, and it
    runs in the request's folder. It leaves after a step that left it holding more than `keep_bytes`
    (KEEP_BYTES unless the child says less)."""
    from edgeruntime.timing import rss_bytes

    reply = os.fdopen(os.dup(1), "w")
    while True:
        ready, _, _ = select.select([sys.stdin], [], [], IDLE_S)
        line = sys.stdin.readline() if ready else ""
        if not line:
            return 0
        path = Path(line.strip())
        sys.stdout.flush()
        sys.stderr.flush()
        with open(log_of(path), "wb") as log:
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)
        os.chdir(path.parent)
        handle(path)
        os.chdir("/")  # not holding the build's folder, which goes when the build ends
        _forget_autograph()
        sys.stdout.flush()
        sys.stderr.flush()
        trim()  # what the step let go, given back before it is weighed
        leaving = (rss_bytes() or 0) > (KEEP_BYTES if keep_bytes is None else min(keep_bytes, KEEP_BYTES))
        reply.write("done leaving\n" if leaving else "done\n")
        reply.flush()
        if leaving:  # the parent lets this child go and starts a fresh one for its next request
            os._exit(0)  # not through the libraries' exit handlers: one that fails must not look like a crash


def trim(*, collect: bool = True) -> None:
    """Give what this process no longer holds back to the system: cycles Python's collector would reach
    late (graph-surgeon graphs hold whole models; `collect`), and the freed blocks glibc keeps in its
    heap. A full collection costs 0.2-0.5 s in a process with TensorFlow's objects in it (a test
    worker); glibc's trim alone ~0 s."""
    import ctypes
    import gc

    if collect:
        gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _forget_autograph() -> None:
    """TensorFlow's autograph writes each function it converts to `__autograph_generated_file*.py` in
    the temp dir and removes them when the process exits: a child that stays up removes the step's
    now, so a finished build leaves nothing in TMPDIR (their code is loaded; only tracebacks read them)."""
    for name in [n for n in sys.modules if n.startswith("__autograph_generated_file")]:
        path = getattr(sys.modules.pop(name), "__file__", None)
        if path:
            try:
                os.remove(path)
            except OSError:
                pass
