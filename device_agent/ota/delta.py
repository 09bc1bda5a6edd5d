"""Delta updates: a bundle assembled from the chunks a device already holds plus those it fetches.

A `cdc` transfer lists the new bundle's content-defined chunks (sha256 and size, in order). The
slot's store cuts the bundles it holds (active and previous) with the record's parameters and
indexes their chunks by sha256 (cached per bundle). Each chunk found there is copied, re-hashed
on the way: a corrupt or vanished local copy is simply fetched instead. Only the rest is pulled
from `{root}/chunks/{sha256}`, once per distinct chunk; where the record offers a patch of a
missing chunk against chunks held here (edgebundle.patch), the smaller patch is fetched from the
same place and decoded instead (a base damaged here, or a patch that does not decode to the
chunk's sha256, falls back to the chunk). A record with a `url` has the missing chunks read as
byte ranges of the bundle there instead (device_agent.ota.ranges). The file is assembled in the same
bundle.part / chunks.done as a fixed-chunk download (a restart keeps and re-checks the chunks in
place), its sha256 computed as the prefix grows; verification and the signature check then run
exactly as for a full transfer. A device that holds nothing reusable fetches every chunk."""
from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Callable, Protocol

from device_agent.ota.ranges import fetch_ranges
from device_agent.ota.transfer import (Cancelled, MqttChunkFetcher, PartFile, Progress, Pull, TransferError,
                                       TransferPolicy, TransientError, check_space)
from edgebundle import patch
from edgebundle.cdc import CdcParams
from edgebundle.errors import EdgepackError
from edgeproto.bundleref import Patch
from edgeproto.desired import CdcTransfer, Desired

log = logging.getLogger("edgepack.agent.ota")
WINDOW_BYTES = 2 << 20  # chunks subscribed at once: about this many bytes (16..128 chunks)


class ChunkSource(Protocol):
    """What the device holds, by chunk sha256 (device_agent.store.Store.chunks)."""

    def chunks(self, params: CdcParams) -> dict[str, tuple[Path, int, int]]: ...


def fetch_delta(fetcher: MqttChunkFetcher, d: Desired, workdir: Path, *, local: ChunkSource | None,
                progress: Progress, cancelled: Callable[[], bool], policy: TransferPolicy | None = None) -> Path:
    """Assemble `d`'s bundle in `workdir` (see the module docstring); returns the file, whose
    sha256 is the record's. `progress(done, total, transfer)` reports bytes in place, with
    transfer = {"fetched": pulled over MQTT (chunks and patches), "reused": copied from held
    bundles, "patched": rebuilt from patches, "resumed": kept from before a restart} (this
    attempt's figures)."""
    t = d.transfer
    if not isinstance(t, CdcTransfer):
        raise TypeError("fetch_delta needs a cdc transfer")
    final = workdir / "bundle.edgepack"
    if final.is_file():
        return final
    sizes, hashes = list(t.chunk_sizes), list(t.chunk_sha256)
    part = PartFile(workdir, size=d.size, offsets=t.offsets(), lengths=sizes, hashes=hashes)
    stats = {"fetched": 0, "reused": 0, "patched": 0, "resumed": sum(sizes[i] for i in part.done)}
    report = lambda: progress(part.bytes_done, d.size, dict(stats))  # noqa: E731
    with part:
        held = _held(local, t.params)
        stats["reused"] = _copy_local(part, held, hashes, cancelled=cancelled, report=report)
        wanted: dict[str, list[int]] = {}  # distinct missing chunk -> every index it fills
        for i in range(len(hashes)):
            if i not in part.done:
                wanted.setdefault(hashes[i], []).append(i)
        length = {sha: sizes[ix[0]] for sha, ix in wanted.items()}
        check_space(workdir, sum(length.values()))

        def put(sha: str, data: bytes, fetched: int) -> None:
            for i in wanted.pop(sha):
                part.put(i, data)
            stats["fetched"] += fetched
            if fetched < len(data):  # rebuilt from a patch of `fetched` bytes
                stats["patched"] += len(data)
            report()

        if t.url:  # byte ranges of the bundle at a URL (device_agent.ota.ranges), no patches
            offsets = t.offsets()
            fetch_ranges(t.url, [(offsets[ix[0]], length[sha], sha) for sha, ix in wanted.items()],
                         store=lambda sha, data: put(sha, data, len(data)), policy=policy or TransferPolicy(),
                         cancelled=cancelled)
            report()
            return part.finish(final, sha256=d.sha256)
        patches = _usable(t.patches, wanted, held)
        if patches:
            _pull_patches(fetcher, t, patches, held, put=put, sizes=length, cancelled=cancelled)
        order = list(wanted)
        fetcher.pull(Pull(base=t.topic + "/", keys=tuple(range(len(order))), tail=order.__getitem__,
                          sha256=order.__getitem__, length=lambda k: length[order[k]],
                          store=lambda k, payload: put(order[k], payload, len(payload)),
                          max_len=t.params.max_size, tails={s: k for k, s in enumerate(order)},
                          window=_window(fetcher, t)),
                     cancelled=cancelled)
        report()
        return part.finish(final, sha256=d.sha256)


def _window(fetcher: MqttChunkFetcher, t: CdcTransfer) -> int:
    """Chunks subscribed at once: about WINDOW_BYTES of them, 16..128."""
    return max(fetcher.window, min(128, WINDOW_BYTES // t.params.avg_size))


def _usable(patches: tuple[Patch, ...], wanted: dict[str, list[int]],
            held: dict[str, tuple[Path, int, int]]) -> dict[str, Patch]:
    """Per missing chunk, the smallest patch whose bases this device holds."""
    out: dict[str, Patch] = {}
    for p in patches:
        if p.chunk in wanted and all(b in held for b in p.bases) and (
                p.chunk not in out or p.size < out[p.chunk].size):
            out[p.chunk] = p
    one: dict[str, Patch] = {}  # a record naming one patch for two chunks: the first (one key per topic)
    for c, p in out.items():
        if all(q.sha256 != p.sha256 for q in one.values()):
            one[c] = p
    return one


def _pull_patches(fetcher: MqttChunkFetcher, t: CdcTransfer, patches: dict[str, Patch],
                  held: dict[str, tuple[Path, int, int]], *, put: Callable[[str, bytes, int], None],
                  sizes: dict[str, int], cancelled: Callable[[], bool]) -> None:
    """Fetch each patch and decode it against the held bases; a chunk whose bases no longer hash
    right here, or whose patch does not decode to it, is left for the plain fetch."""
    order = list(patches.values())
    files: dict[Path, int] = {}

    def store(k: int, payload: bytes) -> None:
        p = order[k]
        source = [_read(files, *held[b]) for b in p.bases]
        if any(data is None or hashlib.sha256(data).hexdigest() != b for data, b in zip(source, p.bases)):
            log.warning("a base of chunk %s... does not match its hash here; fetching the chunk", p.chunk[:16])
            return
        try:
            data = patch.decode(payload, b"".join(source), size=sizes[p.chunk])
        except ValueError as e:
            log.warning("patch of chunk %s... does not decode (%s); fetching the chunk", p.chunk[:16], e)
            return
        if hashlib.sha256(data).hexdigest() != p.chunk:
            log.warning("patch of chunk %s... decodes to other bytes; fetching the chunk", p.chunk[:16])
            return
        put(p.chunk, data, len(payload))

    try:
        fetcher.pull(Pull(base=t.topic + "/", keys=tuple(range(len(order))), tail=lambda k: order[k].sha256,
                          sha256=lambda k: order[k].sha256, length=lambda k: order[k].size, store=store,
                          max_len=t.params.max_size, tails={p.sha256: k for k, p in enumerate(order)},
                          window=_window(fetcher, t)),
                     cancelled=cancelled)
    except (TransferError, TransientError) as e:  # a patch that is bad or gone: its chunk is published too
        log.warning("chunk patches: %s; fetching the chunks instead", str(e).splitlines()[0])
    finally:
        for fd in files.values():
            os.close(fd)


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
