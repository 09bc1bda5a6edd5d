"""What a desired record or a profile job names (BundleRef: a bundle and how to fetch it), and
the strict reading both records share: size and JSON limits, the record's head (schema, id), the
field checks, each raising ValueError naming the field, turned into one RecordError per record.

Standard library and edgebundle only (agents import it)."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, fields
from typing import Callable, TypeVar
from urllib.parse import urlparse

from edgebundle.cdc import CdcParams
from edgebundle.errors import EdgepackError, InputError
from edgebundle.jsonsafe import JsonError, loads
from edgebundle.manifest import Manifest, parse_version
from edgebundle.trust import parse_time

SIG_FIELD = "record_signature"
MAX_JSON_DEPTH = 8
_SHA = re.compile(r"^[0-9a-f]{64}$")
RECORD_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")  # update_id, job_id
RECORD_ID_TEXT = "1-64 letters, digits, '.', '_' or '-'"
_NAME = re.compile(r"^[^\x00-\x1f\x7f/\\]{1,128}$")
_ID = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}"
MODEL_NAME = re.compile(rf"^{_ID}$")  # a model on a device: topics, URLs and folders name it
TARGET = re.compile(rf"^(devices|groups)/{_ID}(/models/{_ID})?$")
_TOPIC = re.compile(r"^[^\x00+#]{1,512}$")
T = TypeVar("T")


class RecordError(InputError):
    """A desired record (or profile job) is malformed or refused. `update_id` is set when it could
    be read, so the refusal can be reported against that update."""

    def __init__(self, message: str, *, update_id: str | None = None, hint: str | None = None):
        super().__init__(message, hint=hint)
        self.update_id = update_id


@dataclass(frozen=True)
class Limits:
    """What an agent accepts from a record (endless-data defence); `[ota]` settings."""

    max_record_bytes: int = 1 << 20
    max_bundle_bytes: int = 1 << 30
    max_chunks: int = 16384
    max_chunk_bytes: int = 64 << 20


@dataclass(frozen=True)
class MqttTransfer:
    """Retained chunks on `{topic}/chunks/{i}`, each with its sha256."""

    topic: str
    chunk_size: int
    chunks: int
    chunk_sha256: tuple[str, ...]
    method: str = "mqtt"

    def to_dict(self) -> dict:
        return {"method": "mqtt", "topic": self.topic, "chunk_size": self.chunk_size, "chunks": self.chunks,
                "chunk_sha256": list(self.chunk_sha256)}


@dataclass(frozen=True)
class Patch:
    """A chunk encoded against chunks of an older bundle (edgebundle.patch), retained like a chunk
    on `{topic}/{sha256}`: a device holding every chunk in `bases` may fetch this instead."""

    chunk: str
    bases: tuple[str, ...]
    sha256: str
    size: int

    def to_dict(self) -> dict:
        return {"chunk": self.chunk, "from": list(self.bases), "sha256": self.sha256, "size": self.size}


@dataclass(frozen=True)
class CdcTransfer:
    """Content-defined chunks (edgebundle.cdc), each retained on `{topic}/{sha256}` where `topic`
    is `{root}/chunks`: shared by every version and model, so a device copies the chunks it holds
    in its own bundles (cut with `params`) and fetches only the others."""

    topic: str
    params: CdcParams
    chunk_sha256: tuple[str, ...]
    chunk_sizes: tuple[int, ...]
    patches: tuple[Patch, ...] = ()
    url: str | None = None  # the bundle file over HTTP(S)/file: missing chunks come as byte ranges of it
    method: str = "cdc"

    def chunk_topic(self, sha256: str) -> str:
        return f"{self.topic}/{sha256}"

    def offsets(self) -> list[int]:
        out, at = [], 0
        for n in self.chunk_sizes:
            out.append(at)
            at += n
        return out

    def to_dict(self) -> dict:
        d = {"method": "cdc", "topic": self.topic, "chunking": self.params.to_dict(),
             "chunk_sha256": list(self.chunk_sha256), "chunk_sizes": list(self.chunk_sizes)}
        if self.patches:
            d["patches"] = [p.to_dict() for p in self.patches]
        if self.url:
            d["url"] = self.url
        return d


@dataclass(frozen=True)
class UrlTransfer:
    """http(s):// with Range resume, or file://; only from sources the device's config allows."""

    url: str
    method: str = "url"

    def to_dict(self) -> dict:
        return {"method": "url", "url": self.url}


@dataclass(frozen=True)
class BundleRef:
    """The bundle a record names: what the fetchers need (sha256, size, transfer) and what the
    verified bundle's manifest must say (name, version). Desired and ProfileJob extend it."""

    name: str
    version: str
    sha256: str
    size: int
    transfer: MqttTransfer | CdcTransfer | UrlTransfer

    @property
    def bundle(self) -> "BundleRef":
        """Only the bundle a record names (what the fetchers read)."""
        return BundleRef(**{f.name: getattr(self, f.name) for f in fields(BundleRef)})

    def mismatch(self, manifest: Manifest, *, named_by: str) -> str | None:
        """Why the verified bundle is not the one this record names (None: it is)."""
        if (manifest.name, manifest.version) == (self.name, self.version):
            return None
        return f"the bundle is {manifest.name} {manifest.version}, {named_by} says {self.name} {self.version}"


def parse_bundle_ref(d: dict, *, limits: Limits, topic_prefix: str | None) -> BundleRef:
    """The bundle fields of a record (desired records and profile jobs alike), each checked;
    ValueError says which one is wrong."""
    name = text(d, "name", _NAME, "1-128 characters, no '/' or control characters")
    version = text(d, "version", None, "a semantic version")
    try:
        parse_version(version)
    except EdgepackError as e:
        raise ValueError(str(e).split("\n")[0]) from None
    sha = text(d, "sha256", _SHA, "64 lowercase hex digits")
    size = integer(d, "size", 1, limits.max_bundle_bytes, hint="[ota] max_bundle_bytes")
    transfer = _transfer(d.get("transfer"), sha=sha, size=size, limits=limits, topic_prefix=topic_prefix)
    return BundleRef(name=name, version=version, sha256=sha, size=size, transfer=transfer)


def parse_transfer(doc: dict, *, sha256: str, size: int,
                   limits: Limits = Limits()) -> MqttTransfer | CdcTransfer | UrlTransfer:
    """A transfer object from its JSON form (as in a record); ValueError naming the field."""
    return _transfer(doc, sha=sha256, size=size, limits=limits, topic_prefix=None)


# ---- reading a record: limits, head, errors ----

def load_record(payload: bytes, *, what: str, source: str, limits: Limits, size_hint: str = "") -> object:
    """A record's JSON document; RecordError when it is over the size limit or not JSON."""
    if len(payload) > limits.max_record_bytes:
        raise RecordError(f"{what} on {source} is {len(payload)} bytes; at most {limits.max_record_bytes} "
                          f"are accepted{size_hint}")
    try:
        return loads(payload, max_depth=MAX_JSON_DEPTH)
    except JsonError as e:
        raise RecordError(f"{what} on {source} is not valid JSON: {e}") from None


def checked(build: Callable[[object], T], doc, *, what: str, source: str, id_key: str, hint: str) -> T:
    """build(doc), with a field error turned into one RecordError naming the record (and its id,
    when that much could be read)."""
    rid = doc.get(id_key) if isinstance(doc, dict) else None
    rid = rid if isinstance(rid, str) and RECORD_ID.match(rid) else None
    try:
        return build(doc)
    except (ValueError, TypeError, KeyError, OverflowError) as e:
        msg = str(e) if isinstance(e, ValueError) else f"{type(e).__name__}: {e}"
        raise RecordError(f"malformed {what} on {source}: {msg}", update_id=rid, hint=hint) from None


def record_id(d, *, schema: str, what: str, id_key: str) -> str:
    """The head every record starts with: a JSON object of `schema`, with a well-formed id."""
    if not isinstance(d, dict):
        raise ValueError(f"a {what} is a JSON object")
    if d.get("schema") != schema:
        raise ValueError(f"schema {d.get('schema')!r}, expected {schema!r}")
    return text(d, id_key, RECORD_ID, RECORD_ID_TEXT)


def issued(d: dict) -> str | None:
    """`issued`, a UTC timestamp when present (replay protection)."""
    v = d.get("issued")
    if v is not None:
        parse_time(v, what="issued")
    return v


def signature(d: dict) -> dict | None:
    """`record_signature` as received (checked by the agent's RecordGate, not here)."""
    sig = d.get(SIG_FIELD)
    if sig is not None and not isinstance(sig, dict):
        raise ValueError(f"{SIG_FIELD} must be an object")
    return sig


# ---- field checks: each raises ValueError naming the field ----

def text(d: dict, key: str, pattern, what: str) -> str:
    v = d.get(key)
    if not isinstance(v, str) or (pattern is not None and not pattern.match(v)) or len(v) > 256:
        raise ValueError(f"{key} must be {what}, not {v!r:.80}")
    return v


def integer(d: dict, key: str, lo: int, hi: int, *, default: int | None = None, what: str | None = None,
            hint: str | None = None) -> int:
    what = what or key
    if key not in d and default is not None:
        return default
    v = d.get(key)
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError(f"{what} must be an integer, not {v!r:.80}")
    if not lo <= v <= hi:
        raise ValueError(f"{what} {v} is outside {lo}..{hi}" + (f" ({hint})" if hint else ""))
    return v


def number(d: dict, what: str, key: str, lo: float, hi: float, default: float) -> float:
    if key not in d:
        return default
    v = d[key]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ValueError(f"{what} must be a number, not {v!r:.80}")
    if not lo <= v <= hi:
        raise ValueError(f"{what} {v} is outside {lo:g}..{hi:g}")
    return float(v)


def section(d: dict, key: str, known: tuple[str, ...]) -> dict:
    v = d.get(key)
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise ValueError(f"{key} must be an object")
    unknown = set(v) - set(known)
    if unknown:
        raise ValueError(f"{key} has unknown field(s) {sorted(unknown)}; known: {list(known)}")
    return v


def _transfer(t, *, sha: str, size: int, limits: Limits,
              topic_prefix: str | None) -> MqttTransfer | CdcTransfer | UrlTransfer:
    if not isinstance(t, dict):
        raise ValueError("transfer must be an object")
    method = t.get("method")
    if method == "mqtt":
        return _mqtt_transfer(t, sha=sha, size=size, limits=limits, topic_prefix=topic_prefix)
    if method == "cdc":
        return _cdc_transfer(t, size=size, limits=limits, topic_prefix=topic_prefix)
    if method == "url":
        return UrlTransfer(url=_url(t.get("url")))
    raise ValueError(f"unknown transfer method {method!r:.40}; one of 'mqtt', 'cdc', 'url'")


def _url(url) -> str:
    if not isinstance(url, str) or len(url) > 2048 or any(ord(c) < 33 for c in url):
        raise ValueError("transfer.url must be a URL of at most 2048 characters without spaces")
    if urlparse(url).scheme not in ("http", "https", "file"):
        raise ValueError("transfer.url must be http://, https:// or file://")
    return url


def _mqtt_transfer(t: dict, *, sha: str, size: int, limits: Limits, topic_prefix: str | None) -> MqttTransfer:
    topic = t.get("topic")
    if not isinstance(topic, str) or not _TOPIC.match(topic):
        raise ValueError("transfer.topic must be a topic name without wildcards")
    want = f"{topic_prefix}/bundles/{sha}" if topic_prefix is not None else None
    if (want is not None and topic != want) or not topic.endswith(f"/bundles/{sha}"):
        raise ValueError(f"transfer.topic must be {want or '{root}/bundles/{sha256}'}, not {topic!r:.120}")
    return fixed_chunks(t, topic=topic, size=size, limits=limits)


def fixed_chunks(t: dict, *, topic: str, size: int, limits: Limits) -> MqttTransfer:
    """An mqtt transfer's chunk fields, checked against `size` (the topic is the caller's to check)."""
    csize = integer(t, "chunk_size", 1, limits.max_chunk_bytes, what="transfer.chunk_size")
    chunks = integer(t, "chunks", 1, limits.max_chunks, what="transfer.chunks", hint="[ota] max_chunks")
    if chunks != -(-size // csize):
        raise ValueError(f"transfer.chunks is {chunks}, but {size} bytes in chunks of {csize} make "
                         f"{-(-size // csize)}")
    hashes = t.get("chunk_sha256")
    if not isinstance(hashes, list) or len(hashes) != chunks or not all(
            isinstance(h, str) and _SHA.match(h) for h in hashes):
        raise ValueError("transfer.chunk_sha256 must list one 64-hex sha256 per chunk")
    return MqttTransfer(topic=topic, chunk_size=csize, chunks=chunks, chunk_sha256=tuple(hashes))


def _cdc_transfer(t: dict, *, size: int, limits: Limits, topic_prefix: str | None) -> CdcTransfer:
    topic = t.get("topic")
    want = f"{topic_prefix}/chunks" if topic_prefix is not None else None
    if not isinstance(topic, str) or not _TOPIC.match(topic) or (want is not None and topic != want) \
            or not topic.endswith("/chunks"):
        raise ValueError(f"transfer.topic must be {want or '{root}/chunks'}, not {topic!r:.120}")
    try:
        params = CdcParams.from_dict(t.get("chunking"))
    except ValueError as e:
        raise ValueError(f"transfer.chunking: {e}") from None
    hashes, sizes = t.get("chunk_sha256"), t.get("chunk_sizes")
    if not isinstance(hashes, list) or not 1 <= len(hashes) <= limits.max_chunks:
        raise ValueError(f"transfer.chunk_sha256 must list 1..{limits.max_chunks} chunks ([ota] max_chunks)")
    if not all(isinstance(h, str) and _SHA.match(h) for h in hashes):
        raise ValueError("transfer.chunk_sha256 must list one 64-hex sha256 per chunk")
    most = min(params.max_size, limits.max_chunk_bytes)
    if not isinstance(sizes, list) or len(sizes) != len(hashes) or not all(
            isinstance(n, int) and not isinstance(n, bool) and 1 <= n <= most for n in sizes):
        raise ValueError(f"transfer.chunk_sizes must list one size in 1..{most} per chunk")
    if sum(sizes) != size:
        raise ValueError(f"transfer.chunk_sizes add up to {sum(sizes)} bytes, the bundle is {size}")
    return CdcTransfer(topic=topic, params=params, chunk_sha256=tuple(hashes), chunk_sizes=tuple(sizes),
                       patches=_patches(t.get("patches"), dict(zip(hashes, sizes)), limits=limits),
                       url=_url(t["url"]) if t.get("url") is not None else None)


def _patches(v, sizes: dict[str, int], *, limits: Limits) -> tuple[Patch, ...]:
    """transfer.patches (optional): each for a listed chunk, smaller than it, from 1..4 bases."""
    if v is None:
        return ()
    if not isinstance(v, list) or len(v) > limits.max_chunks:
        raise ValueError(f"transfer.patches must be a list of at most {limits.max_chunks} patches")
    out = []
    for p in v:
        if not isinstance(p, dict) or set(p) != {"chunk", "from", "sha256", "size"}:
            raise ValueError("each of transfer.patches must have exactly chunk, from, sha256 and size")
        chunk, bases, sha, n = p["chunk"], p["from"], p["sha256"], p["size"]
        if not (isinstance(chunk, str) and chunk in sizes and isinstance(sha, str) and _SHA.match(sha)):
            raise ValueError("a patch's chunk must be one of transfer.chunk_sha256 and its sha256 64 hex digits")
        if not isinstance(bases, list) or not 1 <= len(bases) <= 4 or not all(
                isinstance(b, str) and _SHA.match(b) for b in bases):
            raise ValueError("a patch's from must list 1..4 chunk sha256s")
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n < sizes[chunk]:
            raise ValueError(f"a patch's size must be an integer in 1..{sizes[chunk] - 1} (less than its chunk)")
        out.append(Patch(chunk=chunk, bases=tuple(bases), sha256=sha, size=n))
    return tuple(out)
