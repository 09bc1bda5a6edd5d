"""Helpers for the fault matrix (tests/test_faults.py, benchmarks/fault_matrix.py): what "back
serving a verified model" and "models lost" mean, checked on the device's data directory.

- serving a verified model: /v2/health/ready is 200, the model it serves is the bundle active.json
  names, and that bundle's hashes and signature check out;
- models lost: bundles the device needs (the active one, and the previous one kept for rollback)
  that are missing or no longer verify."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

FAULT_SEEDS = int(os.environ.get("EDGEPACK_FAULT_SEEDS", "1"))
UPDATE_STATES = ["downloading", "verifying", "staging", "switching", "probation"]
FINAL = ("committed", "failed", "rolled_back")
LIBFAKETIME = next((p for p in ("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1",
                                "/usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1",
                                "/usr/lib/faketime/libfaketime.so.1") if os.path.exists(p)), None)


def update_record(data_dir: Path) -> dict:
    try:
        return json.loads((Path(data_dir) / "update.json").read_text())
    except (OSError, ValueError):
        return {}


def ended(data_dir: Path, update_id: str) -> str | None:
    return update_record(data_dir).get("ended", {}).get(update_id)


def _verifies(path: Path, pubkeys: list) -> bool:
    from edgebundle.archive import verify_signed
    from edgebundle.errors import EdgepackError

    try:
        verify_signed(path, pubkeys)
        return True
    except (EdgepackError, OSError):
        return False


def check_device(agent, data_dir: Path, pubkey: Path) -> dict:
    """The figures for one run: serving a verified model (bool), models lost (int), version."""
    from edgebundle.signing import load_public_key

    keys = [load_public_key(pubkey)]
    data_dir = Path(data_dir)
    active = json.loads((data_dir / "active.json").read_text()) if (data_dir / "active.json").exists() else {}
    meta = agent.metadata()
    ready = agent._get("/v2/health/ready") == 200
    serving = bool(ready and meta and active.get("bundle")
                   and meta["parameters"]["bundle_sha256"] == active.get("sha256")
                   and _verifies(data_dir / active["bundle"], keys))
    needed = [active.get("bundle")] + [(update_record(data_dir).get("previous") or {}).get("bundle")]
    lost = sum(1 for rel in needed if rel and not _verifies(data_dir / rel, keys))
    return {"serving_verified": serving, "models_lost": lost, "version": meta["versions"][0] if meta else None}


def report(**row) -> None:
    path = os.environ.get("EDGEPACK_FAULT_REPORT")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")


def fill_disk(path: Path) -> Path:
    """Take every free byte of the file system holding `path`: the next write gets a real ENOSPC."""
    filler = Path(path) / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        for n in (1 << 16, 4096, 1):
            block = b"\0" * n
            while True:
                try:
                    os.write(fd, block)
                except OSError:
                    break
    finally:
        os.close(fd)
    return filler


def free_bytes(path: Path) -> int:
    return shutil.disk_usage(path).free
