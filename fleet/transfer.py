"""How a bundle travels to the devices: one function per transfer mode, each reading and hashing
the bundle file once and returning the Prepared bundle a desired record is made from (fleet.records).

- `plain`: fixed-size chunks retained on the bundle's own topic (`publish_chunks` sends them);
- `by_url`: the devices download the bundle from a URL, nothing is published;
- `delta`: content-defined chunks shared by every version and model (fleet.delta): only those the
  broker does not retain yet are published, or with a URL the devices read them as byte ranges there.

Every device re-checks every hash and the signature, so the pusher checks structure and manifest
only (edgebundle.archive.open_bundle) and hashes while it reads."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from pathlib import Path

from edgebundle.archive import Bundle, open_bundle, sha256_file
from edgebundle.errors import InputError
from edgeproto.broker import BrokerConfig
from edgeproto.desired import MqttTransfer, UrlTransfer
from edgeproto.mqtt import MqttClient
from edgeproto.topics import Topics
from fleet import delta as cdc
from fleet.conn import parse_json, publish_retained
from fleet.records import Prepared

DEFAULT_CHUNK = 1 << 20


@dataclass(frozen=True)
class TransferSpec:
    """How the bundle goes: from `url` (http(s):// or file://) or as MQTT chunks of `chunk_size`
    bytes; `delta`: as content-defined chunks instead (with `url`: byte ranges of the bundle there)."""

    url: str | None = None
    chunk_size: int = DEFAULT_CHUNK
    delta: bool = False

    def check(self) -> None:
        if self.chunk_size < 1024 or self.chunk_size > (64 << 20):
            raise InputError("--chunk-size must be between 1 KiB and 64 MiB")


def plain(b: Bundle, topics: Topics, *, chunk_size: int = DEFAULT_CHUNK) -> Prepared:
    """Fixed-size MQTT chunks: the whole-file and per-chunk sha256 in one pass."""
    size = b.path.stat().st_size
    whole, hashes = hashlib.sha256(), []
    with open(b.path, "rb") as f:
        while chunk := f.read(chunk_size):
            whole.update(chunk)
            hashes.append(hashlib.sha256(chunk).hexdigest())
    sha = whole.hexdigest()
    return _prepared(b, sha256=sha, size=size,
                     transfer=MqttTransfer(topic=topics.bundle(sha), chunk_size=chunk_size,
                                           chunks=(size + chunk_size - 1) // chunk_size, chunk_sha256=tuple(hashes)))


def by_url(b: Bundle, *, url: str) -> Prepared:
    """The devices download the bundle from `url`: its sha256, nothing to publish."""
    return _prepared(b, sha256=sha256_file(b.path), size=b.path.stat().st_size, transfer=UrlTransfer(url=url))


def delta(b: Bundle, topics: Topics, *, previous: cdc.ModelIndex | None, url: str | None = None) -> Prepared:
    """Content-defined chunks, cut alike with `previous` (the model's retained index) when its
    parameters still suit; the whole-file sha256 from the same pass. With `url`: the chunks are
    byte ranges of the bundle there, not retained."""
    size, whole = b.path.stat().st_size, hashlib.sha256()
    transfer = cdc.cdc_transfer(b.path, topics.root, size=size, previous=previous, whole=whole)
    if url:
        transfer = replace(transfer, url=url)
    return _prepared(b, sha256=whole.hexdigest(), size=size, transfer=transfer)


def prepare(bundle: Path, topics: Topics, *, url: str | None = None, chunk_size: int = DEFAULT_CHUNK,
            indexes: dict[str, cdc.ModelIndex] | None = None, model: str | None = None) -> Prepared:
    """The bundle opened (structure and manifest) and prepared by its mode: `indexes` (every
    model's retained chunk index) makes it a delta, cut alike with the previous version of `model`
    (default: the bundle's name); else `url`, else plain MQTT chunks."""
    TransferSpec(url=url, chunk_size=chunk_size, delta=indexes is not None).check()
    b = open_bundle(bundle)
    if indexes is not None:
        return delta(b, topics, previous=indexes.get(model or b.manifest.name), url=url)
    return by_url(b, url=url) if url else plain(b, topics, chunk_size=chunk_size)


def publish_chunks(client: MqttClient, p: Prepared, window: int = 64) -> None:
    """A plain transfer's chunks, retained, with a bounded number in flight (memory stays flat for
    big bundles)."""
    transfer = p.transfer
    with open(p.path, "rb") as f:
        chunks = iter(lambda: f.read(transfer.chunk_size), b"")
        publish_retained(client, ((Topics.chunk(transfer.topic, i), c) for i, c in enumerate(chunks)), window=window)


def running_bundles(table, *, device: str | None, group: str | None, model: str | None) -> dict[str, str | None]:
    """Target device -> sha256 of the bundle it runs for `model` (None: unknown), from retained
    status (a FleetTable): what a delta costs each device, and what its patches go against."""
    out: dict[str, str | None] = {}
    for e in table.entries(group=group):
        if device is None or e.status.device_id == device:
            m = e.status.for_model(model).model
            out[e.status.device_id] = m.bundle_sha256 if m else None
    if device is not None:
        out.setdefault(device, None)
    return out


def with_patches(broker: BrokerConfig, p: Prepared, indexes: dict[str, cdc.ModelIndex],
                 running) -> tuple[Prepared, dict[str, bytes]]:
    """A delta `p` with chunk patches against the bundles the devices run (fleet.patches), and
    their bytes."""
    from fleet.patches import add_patches

    lists = {sha: b for ix in indexes.values() for sha, b in ix.bundles.items()}
    t, patches = add_patches(broker, p.path, p.transfer, lists, running)
    return replace(p, transfer=t), patches


def _prepared(b: Bundle, *, sha256: str, size: int, transfer) -> Prepared:
    from edgebundle.interface import interface_hash

    m = b.manifest
    return Prepared(path=b.path, name=m.name, version=m.version, sha256=sha256, size=size, transfer=transfer,
                    interface=interface_hash(m), bundle_signature=parse_json(b.signature) if b.signature else None)


__all__ = ["DEFAULT_CHUNK", "TransferSpec", "by_url", "delta", "plain", "prepare", "publish_chunks",
           "running_bundles", "with_patches"]
