"""The small JSON state files of the OTA gatekeepers (records.json: accepted records; trust.json:
key generations). Read leniently: a missing or damaged file never stops the agent, it only loses
what the file remembered (said in the log). Written atomically: a failed write (disk full) keeps
the state in memory, and the next change writes it again."""
from __future__ import annotations

import json
import logging
from pathlib import Path

from device_agent.store import atomic_write

log = logging.getLogger("edgepack.agent.ota")


def read_state(path: Path | None, keys: tuple[str, ...], *, otherwise: str) -> dict | None:
    """The file's `keys`; None when there is no file (or no path), or it is damaged: then the log
    says what happens `otherwise`."""
    if path is None:
        return None
    try:
        doc = json.loads(path.read_text())
        return {k: doc[k] for k in keys}
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.error("cannot read %s (%s); %s", path, e, otherwise)
        return None


def write_state(path: Path | None, doc: dict, *, what: str, indent: int | None = None) -> None:
    if path is None:
        return
    try:
        atomic_write(path, json.dumps(doc, indent=indent).encode())
    except OSError as e:
        log.error("cannot persist %s to %s: %s", what, path, e)
