"""LiteRT's CompiledModel environments (edgeruntime/litert_compiled.py) log INFO lines from C++
destructors after Python has finished, and no API sets their log level. A program's entry point (the
agent, the CLI) calls quiet_native_exit() first thing: registered first, its handler runs after every
other exit handler and, when this process made such an environment, points fd 2 at /dev/null for what
is left (the interpreter's teardown: unraisable exceptions at shutdown go with it)."""
from __future__ import annotations

import atexit
import os
import sys

_registered = False


def quiet_native_exit() -> None:
    global _registered
    if not _registered:
        _registered = True
        atexit.register(silence)


def silence() -> None:
    compiled = sys.modules.get("edgeruntime.litert_compiled")
    if compiled is None or getattr(compiled, "_env", None) is None:
        return
    try:
        sys.stderr.flush()
        os.dup2(os.open(os.devnull, os.O_WRONLY), 2)
    except (OSError, ValueError):
        pass
