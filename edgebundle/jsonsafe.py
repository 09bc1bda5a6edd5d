"""JSON from untrusted peers: bounded size and nesting, strict numbers, one error type.

`json.loads` recurses once per nesting level, so a body of 100k `[` raises RecursionError deep
inside the decoder; it also accepts NaN/Infinity. `loads` checks the nesting depth first with a
vectorised scan (strings removed with one regex, then a cumulative sum over the brackets), so
the check costs milliseconds even for a 16 MiB body."""
from __future__ import annotations

import json
import re
from functools import lru_cache

_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')


@lru_cache(maxsize=1)
def _steps():
    """+1 for [ and {, -1 for ] and }: numpy loads on the first parse, not with every command that
    imports the protocol (`edgepack --help` answers without it)."""
    import numpy as np

    step = np.zeros(256, np.int8)
    step[[ord("["), ord("{")]] = 1
    step[[ord("]"), ord("}")]] = -1
    return np, step


class JsonError(ValueError):
    """The text is not acceptable JSON (syntax, size, depth or a non-finite number)."""


def depth(data: bytes) -> int:
    """Maximum nesting depth of arrays/objects in JSON text (strings are skipped)."""
    stripped = _STRING.sub(b"", data)
    np, step = _steps()
    steps = step[np.frombuffer(stripped, np.uint8)]
    return int(np.cumsum(steps, dtype=np.int64).max()) if steps.size else 0


def _no_constants(name: str):
    raise JsonError(f"{name} is not a JSON number")


def loads(data: bytes | str, *, max_depth: int = 32, max_bytes: int | None = None, allow_nan: bool = False):
    """Parse JSON text from an untrusted source; JsonError says what is wrong."""
    if isinstance(data, str):
        data = data.encode("utf-8", "surrogatepass")
    if max_bytes is not None and len(data) > max_bytes:
        raise JsonError(f"{len(data)} bytes is over the limit of {max_bytes}")
    d = depth(data)
    if d > max_depth:
        raise JsonError(f"nested {d} levels deep; at most {max_depth} are accepted")
    try:
        return json.loads(data, **({} if allow_nan else {"parse_constant": _no_constants}))
    except JsonError:
        raise
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise JsonError(str(e)) from None


__all__ = ["JsonError", "depth", "loads"]
