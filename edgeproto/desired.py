"""The desired-model record (`edgepack.desired/1`) published retained by `edgepack push`:
strict parsing, and its Ed25519 signature.

Self-contained (standard library + edgebundle): the fleet side builds and signs records with it,
the agent parses and checks them. A record is a JSON object; a signed one carries

    "record_signature": {"alg": "ed25519", "key_id": "<16 hex>", "sig": "<base64>", "cert": {...}?}

over the canonical JSON (edgebundle.signing.canonical_json) of the record without that member.
`cert` is present when the signing key is a fleet key certified by a root key (edgebundle.trust).
Everything that changes what a device runs or how it judges a model is inside the signed bytes:
bundle, size, transfer, version, downgrade and interface-change permissions, probation and latency thresholds, the
target topic (`target`), `issued` and `update_id` (replay protection)."""
from __future__ import annotations

import math
import posixpath
import re
from dataclasses import dataclass, field
from urllib.parse import unquote, urlparse

from edgebundle import signing
from edgebundle.errors import EdgepackError, InputError
from edgebundle.jsonsafe import JsonError, loads
from edgebundle.manifest import parse_version
from edgebundle.trust import parse_time

SCHEMA = "edgepack.desired/1"
SIG_FIELD = "record_signature"
_SHA = re.compile(r"^[0-9a-f]{64}$")
_UPDATE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_NAME = re.compile(r"^[^\x00-\x1f\x7f/\\]{1,128}$")
_TARGET = re.compile(r"^(devices|groups)/[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_TOPIC = re.compile(r"^[^\x00+#]{1,512}$")
MAX_JSON_DEPTH = 8


class RecordError(InputError):
    """A desired record is malformed or refused. `update_id` is set when it could be read, so the
    refusal can be reported against that update."""

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
class Probation:
    seconds: float = 30.0  # probation ends after this long...
    requests: int = 200  # ...or after this many requests on the new model, whichever comes first
    max_error_rate: float = 0.02
    max_p95_ms: float | None = None


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
class UrlTransfer:
    """http(s):// with Range resume, or file://; only from sources the device's config allows."""

    url: str
    method: str = "url"

    def to_dict(self) -> dict:
        return {"method": "url", "url": self.url}


@dataclass(frozen=True)
class Desired:
    update_id: str
    name: str
    version: str
    sha256: str
    size: int
    transfer: MqttTransfer | UrlTransfer
    allow_downgrade: bool = False
    allow_interface_change: bool = False  # inputs/outputs may differ from the running model's
    probation: Probation = field(default_factory=Probation)
    staging_max_p95_ms: float | None = None
    issued: str | None = None  # UTC timestamp of the push (replay protection)
    target: str | None = None  # "devices/{id}" or "groups/{name}": the topic the record is meant for
    signature: dict | None = None  # record_signature as received (None: unsigned)
    source: str = ""  # the topic it came from (device or group)

    @classmethod
    def parse(cls, payload: bytes, *, source: str, limits: Limits = Limits(),
              topic_prefix: str | None = None) -> "Desired | None":
        """None for an empty (cleared) record; RecordError naming the field for anything else
        wrong: types, ranges, topic characters, sizes over `limits`."""
        if not payload:
            return None
        if len(payload) > limits.max_record_bytes:
            raise RecordError(f"desired record on {source} is {len(payload)} bytes; at most "
                              f"{limits.max_record_bytes} are accepted ([ota] max_record_bytes)")
        try:
            doc = loads(payload, max_depth=MAX_JSON_DEPTH)
        except JsonError as e:
            raise RecordError(f"desired record on {source} is not valid JSON: {e}") from None
        return cls.from_dict(doc, source=source, limits=limits, topic_prefix=topic_prefix)

    @classmethod
    def from_dict(cls, doc, *, source: str, limits: Limits = Limits(), topic_prefix: str | None = None) -> "Desired":
        uid = doc.get("update_id") if isinstance(doc, dict) else None
        uid = uid if isinstance(uid, str) and _UPDATE_ID.match(uid) else None
        try:
            return cls._from_dict(doc, source=source, limits=limits, topic_prefix=topic_prefix)
        except (ValueError, TypeError, KeyError, OverflowError) as e:
            msg = str(e) if isinstance(e, ValueError) else f"{type(e).__name__}: {e}"
            raise RecordError(f"malformed desired record on {source}: {msg}", update_id=uid,
                              hint="publish records with `edgepack push` (schema: docs/schemas/desired.schema.json)"
                              ) from None

    @classmethod
    def _from_dict(cls, d, *, source: str, limits: Limits, topic_prefix: str | None) -> "Desired":
        if not isinstance(d, dict):
            raise ValueError("a desired record is a JSON object")
        if d.get("schema") != SCHEMA:
            raise ValueError(f"schema {d.get('schema')!r}, expected {SCHEMA!r}")
        uid = _text(d, "update_id", _UPDATE_ID, "1-64 letters, digits, '.', '_' or '-'")
        name, version, sha, size, transfer = bundle_fields(d, limits=limits, topic_prefix=topic_prefix)
        allow_downgrade = d.get("allow_downgrade", False)
        if not isinstance(allow_downgrade, bool):
            raise ValueError("allow_downgrade must be true or false")
        allow_interface_change = d.get("allow_interface_change", False)
        if not isinstance(allow_interface_change, bool):
            raise ValueError("allow_interface_change must be true or false")
        p = _section(d, "probation", ("seconds", "requests", "max_error_rate", "max_p95_ms"))
        probation = Probation(seconds=_num(p, "probation.seconds", "seconds", 0.0, 86400.0, Probation.seconds),
                              requests=_int(p, "requests", 1, 10 ** 9, default=Probation.requests,
                                            what="probation.requests"),
                              max_error_rate=_num(p, "probation.max_error_rate", "max_error_rate", 0.0, 1.0,
                                                  Probation.max_error_rate),
                              max_p95_ms=_opt_ms(p, "probation.max_p95_ms"))
        st = _section(d, "staging", ("max_p95_ms",))
        issued = d.get("issued")
        if issued is not None:
            parse_time(issued, what="issued")
        target = d.get("target")
        if target is not None and (not isinstance(target, str) or not _TARGET.match(target)):
            raise ValueError("target must be 'devices/ID' or 'groups/NAME'")
        sig = d.get(SIG_FIELD)
        if sig is not None and not isinstance(sig, dict):
            raise ValueError(f"{SIG_FIELD} must be an object")
        return cls(update_id=uid, name=name, version=version, sha256=sha, size=size, transfer=transfer,
                   allow_downgrade=allow_downgrade, allow_interface_change=allow_interface_change,
                   probation=probation, staging_max_p95_ms=_opt_ms(st, "staging.max_p95_ms"),
                   issued=issued, target=target, signature=sig, source=source)

    def to_dict(self) -> dict:
        """The record as published (without its signature)."""
        d = {"schema": SCHEMA, "update_id": self.update_id, "name": self.name, "version": self.version,
             "sha256": self.sha256, "size": self.size, "transfer": self.transfer.to_dict(),
             "allow_downgrade": self.allow_downgrade,
             "probation": {"seconds": self.probation.seconds, "requests": self.probation.requests,
                           "max_error_rate": self.probation.max_error_rate,
                           "max_p95_ms": self.probation.max_p95_ms},
             "staging": {"max_p95_ms": self.staging_max_p95_ms}, "issued": self.issued}
        if self.allow_interface_change:  # only when set: records of older pushers stay byte-identical
            d["allow_interface_change"] = True
        if self.target is not None:
            d["target"] = self.target
        return d


def signed_bytes(doc: dict) -> bytes:
    """What a record signature covers: the canonical JSON of the record without its signature."""
    return signing.canonical_json({k: v for k, v in doc.items() if k != SIG_FIELD})


def sign_record(doc: dict, private_key, *, cert: dict | None = None) -> dict:
    """A copy of `doc` with `record_signature` (and the fleet key's certificate, when given)."""
    out = {k: v for k, v in doc.items() if k != SIG_FIELD}
    block = signing.signature_block(signed_bytes(out), private_key)
    if cert is not None:
        block["cert"] = cert
    out[SIG_FIELD] = block
    return out


def parse_transfer(doc: dict, *, sha256: str, size: int, limits: Limits = Limits()) -> "MqttTransfer | UrlTransfer":
    """A transfer object from its JSON form (as in a record); ValueError naming the field."""
    return _transfer(doc, sha=sha256, size=size, limits=limits, topic_prefix=None)


def resolve(device: "Desired | None", groups: list["Desired | None"]) -> "Desired | None":
    """Device beats group; among groups, the first in the agent's configured order wins."""
    if device is not None:
        return device
    return next((g for g in groups if g is not None), None)


def url_allowed(url: str, allowed: tuple[str, ...]) -> bool:
    """`url` is under one of the `allowed` prefixes: same scheme, host and port, and a path under
    the prefix's path (for file://, after resolving '..' and symbolic links)."""
    import os

    u = urlparse(url)
    for prefix in allowed:
        a = urlparse(prefix)
        if u.scheme != a.scheme or u.scheme not in ("http", "https", "file"):
            continue
        if u.scheme == "file":
            if u.netloc not in ("", "localhost") or u.query or u.fragment:
                continue
            from urllib.request import url2pathname

            base = os.path.realpath(url2pathname(a.path))
            path = os.path.realpath(url2pathname(u.path))
            if path == base or path.startswith(base.rstrip("/") + "/"):
                return True
            continue
        if (u.hostname or "").lower() != (a.hostname or "").lower() or _port(u) != _port(a) or u.username:
            continue
        path = posixpath.normpath("/" + unquote(u.path).lstrip("/"))
        base = posixpath.normpath("/" + unquote(a.path).lstrip("/"))
        if path == base or path.startswith(base.rstrip("/") + "/"):
            return True
    return False


def _port(u) -> int | None:
    try:
        return u.port or {"http": 80, "https": 443}.get(u.scheme)
    except ValueError:
        return -1


# ---- field checks: each raises ValueError naming the field ----

def _text(d: dict, key: str, pattern, what: str) -> str:
    v = d.get(key)
    if not isinstance(v, str) or (pattern is not None and not pattern.match(v)) or len(v) > 256:
        raise ValueError(f"{key} must be {what}, not {v!r:.80}")
    return v


def _int(d: dict, key: str, lo: int, hi: int, *, default: int | None = None, what: str | None = None,
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


def _num(d: dict, what: str, key: str, lo: float, hi: float, default: float) -> float:
    if key not in d:
        return default
    v = d[key]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ValueError(f"{what} must be a number, not {v!r:.80}")
    if not lo <= v <= hi:
        raise ValueError(f"{what} {v} is outside {lo:g}..{hi:g}")
    return float(v)


def _opt_ms(d: dict, what: str) -> float | None:
    v = d.get("max_p95_ms")
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not 0 < v <= 3.6e6:
        raise ValueError(f"{what} must be null or a number of milliseconds > 0, not {v!r:.80}")
    return float(v)


def _section(d: dict, key: str, known: tuple[str, ...]) -> dict:
    v = d.get(key)
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise ValueError(f"{key} must be an object")
    unknown = set(v) - set(known)
    if unknown:
        raise ValueError(f"{key} has unknown field(s) {sorted(unknown)}; known: {list(known)}")
    return v


def bundle_fields(d: dict, *, limits: Limits, topic_prefix: str | None) -> tuple:
    """The bundle a record names (desired records and profile jobs alike): name, version,
    sha256, size and how to fetch it, each checked. ValueError says which field is wrong."""
    name = _text(d, "name", _NAME, "1-128 characters, no '/' or control characters")
    version = _text(d, "version", None, "a semantic version")
    try:
        parse_version(version)
    except EdgepackError as e:
        raise ValueError(str(e).split("\n")[0]) from None
    sha = _text(d, "sha256", _SHA, "64 lowercase hex digits")
    size = _int(d, "size", 1, limits.max_bundle_bytes, hint="[ota] max_bundle_bytes")
    transfer = _transfer(d.get("transfer"), sha=sha, size=size, limits=limits, topic_prefix=topic_prefix)
    return name, version, sha, size, transfer


def _transfer(t, *, sha: str, size: int, limits: Limits, topic_prefix: str | None):
    if not isinstance(t, dict):
        raise ValueError("transfer must be an object")
    method = t.get("method")
    if method == "mqtt":
        topic = t.get("topic")
        if not isinstance(topic, str) or not _TOPIC.match(topic):
            raise ValueError("transfer.topic must be a topic name without wildcards")
        want = f"{topic_prefix}/bundles/{sha}" if topic_prefix is not None else None
        if (want is not None and topic != want) or not topic.endswith(f"/bundles/{sha}"):
            raise ValueError(f"transfer.topic must be {want or '{root}/bundles/{sha256}'}, not {topic!r:.120}")
        csize = _int(t, "chunk_size", 1, limits.max_chunk_bytes, what="transfer.chunk_size")
        chunks = _int(t, "chunks", 1, limits.max_chunks, what="transfer.chunks", hint="[ota] max_chunks")
        if chunks != -(-size // csize):
            raise ValueError(f"transfer.chunks is {chunks}, but {size} bytes in chunks of {csize} make "
                             f"{-(-size // csize)}")
        hashes = t.get("chunk_sha256")
        if not isinstance(hashes, list) or len(hashes) != chunks or not all(
                isinstance(h, str) and _SHA.match(h) for h in hashes):
            raise ValueError("transfer.chunk_sha256 must list one 64-hex sha256 per chunk")
        return MqttTransfer(topic=topic, chunk_size=csize, chunks=chunks, chunk_sha256=tuple(hashes))
    if method == "url":
        url = t.get("url")
        if not isinstance(url, str) or len(url) > 2048 or any(ord(c) < 33 for c in url):
            raise ValueError("transfer.url must be a URL of at most 2048 characters without spaces")
        if urlparse(url).scheme not in ("http", "https", "file"):
            raise ValueError("transfer.url must be http://, https:// or file://")
        return UrlTransfer(url=url)
    raise ValueError(f"unknown transfer method {method!r:.40}; one of 'mqtt', 'url'")


__all__ = ["SCHEMA", "SIG_FIELD", "Desired", "Limits", "MqttTransfer", "Probation", "RecordError", "UrlTransfer",
           "parse_transfer", "resolve", "sign_record", "signed_bytes", "url_allowed"]
