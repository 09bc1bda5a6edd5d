"""Delta updates: a bundle assembled from the chunks a device already holds plus those it fetches.

A `cdc` transfer lists the new bundle's content-defined chunks (sha256 and size, in order). The
slot's store cuts the bundles it holds (active and previous) with the record's parameters and
indexes their chunks by sha256 (cached per bundle). Each chunk found there is copied, re-hashed
on the way: a corrupt or vanished local copy is simply fetched instead. Only the rest is pulled
from `{root}/chunks/{sha256}`, once per distinct chunk. The file is assembled in the same
bundle.part / chunks.done as a fixed-chunk download (a restart keeps and re-checks the chunks in
place), its sha256 computed as the prefix grows; verification and the signature check then run
exactly as for a full transfer. A device that holds nothing reusable fetches every chunk."""
from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Callable, Protocol

from device_agent.ota.transfer import Cancelled, MqttChunkFetcher, PartFile, Progress, Pull, check_space
from edgebundle.cdc import CdcParams
from edgebundle.errors import EdgepackError
from edgeproto.desired import CdcTransfer, Desired

log = logging.getLogger("edgepack.agent.ota")
WINDOW_BYTES = 2 << 20  # chunks subscribed at once: about this many bytes (16..128 chunks)


class ChunkSource(Protocol):
    """What the device holds, by chunk sha256 (device_agent.store.Store.chunks)."""

    def chunks(self, params: CdcParams) -> dict[str, tuple[Path, int, int]]: ...


def fetch_delta(fetcher: MqttChunkFetcher, d: Desired, workdir: Path, *, local: ChunkSource | None,
                progress: Progress, cancelled: Callable[[], bool]) -> Path:
    """Assemble `d`'s bundle in `workdir` (see the module docstring); returns the file, whose
    sha256 is the record's. `progress(done, total, transfer)` reports bytes in place, with
    transfer = {"fetched": pulled over MQTT, "reused": copied from held bundles, "resumed": kept
    from before a restart} (this attempt's figures)."""
    t = d.transfer
    if not isinstance(t, CdcTransfer):
        raise TypeError("fetch_delta needs a cdc transfer")
    final = workdir / "bundle.edgepack"
    if final.is_file():
        return final
    sizes, hashes = list(t.chunk_sizes), list(t.chunk_sha256)
    part = PartFile(workdir, size=d.size, offsets=t.offsets(), lengths=sizes, hashes=hashes)
    stats = {"fetched": 0, "reused": 0, "resumed": sum(sizes[i] for i in part.done)}
    report = lambda: progress(part.bytes_done, d.size, dict(stats))  # noqa: E731
    with part:
        stats["reused"] = _copy_local(part, _held(local, t.params), hashes, cancelled=cancelled, report=report)
        wanted: dict[str, list[int]] = {}  # distinct missing chunk -> every index it fills
        for i in range(len(hashes)):
            if i not in part.done:
                wanted.setdefault(hashes[i], []).append(i)
        order = list(wanted)
        check_space(workdir, sum(sizes[wanted[s][0]] for s in order))

        def store(k: int, payload: bytes) -> None:
            for i in wanted[order[k]]:
                part.put(i, payload)
            stats["fetched"] += len(payload)
            report()

        window = max(fetcher.window, min(128, WINDOW_BYTES // t.params.avg_size))
        fetcher.pull(Pull(base=t.topic + "/", keys=tuple(range(len(order))), tail=order.__getitem__,
                          sha256=order.__getitem__, length=lambda k: sizes[wanted[order[k]][0]], store=store,
                          max_len=t.params.max_size, tails={s: k for k, s in enumerate(order)}, window=window),
                     cancelled=cancelled)
        report()
        return part.finish(final, sha256=d.sha256)


def _held(local: ChunkSource | None, params: CdcParams) -> dict[str, tuple[Path, int, int]]:
    """The local view, or nothing when it cannot be had (no pyfastcdc, unreadable bundles): the
    update then fetches every chunk rather than failing."""
    if local is None:
        return {}
    try:
        return local.chunks(params)
    except (EdgepackError, OSError) as e:
        log.warning("cannot index the bundles held here (%s); fetching every chunk", str(e).splitlines()[0])
        return {}


def _copy_local(part: PartFile, held: dict[str, tuple[Path, int, int]], hashes: list[str], *,
                cancelled: Callable[[], bool], report: Callable[[], None]) -> int:
    """Copy every missing chunk the device holds, in order; returns the bytes copied. A chunk
    whose bytes no longer hash right (a damaged bundle, a file gone) is left to fetch."""
    files: dict[Path, int] = {}
    copied = 0
    try:
        for i, sha in enumerate(hashes):
            if i in part.done or sha not in held:
                continue
            if cancelled():
                raise Cancelled("update cancelled")
            path, offset, size = held[sha]
            data = _read(files, path, offset, size)
            if data is None or hashlib.sha256(data).hexdigest() != sha:
                log.warning("chunk %s... of %s does not match its hash here; fetching it", sha[:16], path.name)
                continue
            part.put(i, data)
            copied += size
            if i % 64 == 0:
                report()
    finally:
        for fd in files.values():
            os.close(fd)
    return copied


def _read(files: dict[Path, int], path: Path, offset: int, size: int) -> bytes | None:
    try:
        if path not in files:
            files[path] = os.open(path, os.O_RDONLY)
        return os.pread(files[path], size, offset)
    except OSError:
        return None
