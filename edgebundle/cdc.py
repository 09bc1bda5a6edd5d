"""Content-defined chunks of a bundle file (FastCDC, through pyfastcdc).

Cut points follow the content, not fixed offsets: a changed tensor changes only the chunks around
it, and every other chunk of a new version is one a device already holds in its previous bundle
(model members are stored uncompressed for this, see archive.py). The pusher cuts the new bundle;
a device cuts the bundles it holds with the same parameters (named in the desired record) to find
what it can copy instead of fetching.

Chunk sizes scale with the bundle (about 500-1000 chunks): each chunk costs ~360 bytes besides its
payload (its sha256 and size in the signed record, SUBSCRIBE/SUBACK/PUBLISH/PUBACK/UNSUBSCRIBE
with a 83-character topic), so 2 KiB chunks would add ~14 % to a full transfer and 16 KiB ~2 %,
while bigger chunks fetch more unchanged bytes around a change (docs/benchmarks.md, delta_updates).
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

from edgebundle.errors import BundleError

MIN_AVG = 2 << 10
MAX_AVG = 1 << 20
TARGET_CHUNKS = 128  # a bundle of N bytes is cut into chunks of about N / 128, within the bounds (docs/benchmarks.md:
# 512 fetched 1.3 % instead of 2.2 % of MobileNetV2 fp32 after a head retrain, but every chunk costs agent CPU)


@dataclass(frozen=True)
class CdcParams:
    """FastCDC's size bounds (bytes): what a pusher and a device must agree on to cut alike."""

    min_size: int
    avg_size: int
    max_size: int

    @classmethod
    def for_size(cls, size: int) -> "CdcParams":
        avg = MIN_AVG
        while avg * 2 <= min(size // TARGET_CHUNKS, MAX_AVG):
            avg *= 2
        return cls(min_size=avg // 4, avg_size=avg, max_size=avg * 8)

    def suits(self, size: int) -> bool:
        """Whether these bounds (a previous version's) still cut `size` bytes into a sensible number
        of chunks: reusing them keeps the new version's chunks comparable with the old one's."""
        return self == CdcParams.for_size(size) or 64 <= size // self.avg_size <= 4 * TARGET_CHUNKS

    @property
    def key(self) -> str:
        return f"{self.min_size}-{self.avg_size}-{self.max_size}"

    def to_dict(self) -> dict:
        return {"min_size": self.min_size, "avg_size": self.avg_size, "max_size": self.max_size}

    @classmethod
    def from_dict(cls, d) -> "CdcParams":
        """ValueError naming the field when the bounds are not ones FastCDC takes."""
        if not isinstance(d, dict):
            raise ValueError("chunking parameters must be an object")
        vals = {}
        for key, lo, hi in (("min_size", 64, 1 << 20), ("avg_size", 256, 4 << 20), ("max_size", 1024, 16 << 20)):
            v = d.get(key)
            if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
                raise ValueError(f"{key} must be an integer in {lo}..{hi}, not {v!r:.40}")
            vals[key] = v
        if not vals["min_size"] <= vals["avg_size"] <= vals["max_size"]:
            raise ValueError("chunking needs min_size <= avg_size <= max_size")
        return cls(**vals)


@dataclass(frozen=True)
class Chunk:
    sha256: str
    offset: int
    size: int


def chunk_file(path: str | os.PathLike, params: CdcParams, *, whole=None) -> list[Chunk]:
    """The file's content-defined chunks, in order, each with its sha256 (one pass, mmap'd).
    `whole` (a hashlib object) is fed every chunk in order too: the whole file's hash from the
    same pass, for a caller that needs both."""
    try:
        from pyfastcdc import FastCDC
    except ImportError:
        raise BundleError("content-defined chunking needs the pyfastcdc package",
                          hint="pip install 'pyfastcdc>=0.3,<0.4' (part of the agent and packager extras)") from None
    if os.path.getsize(path) == 0:
        return []
    cdc = FastCDC(params.avg_size, min_size=params.min_size, max_size=params.max_size)
    chunks = []
    for c in cdc.cut_file(os.fspath(path)):
        if whole is not None:
            whole.update(c.data)
        chunks.append(Chunk(hashlib.sha256(c.data).hexdigest(), c.offset, c.length))
    return chunks


__all__ = ["CdcParams", "Chunk", "chunk_file", "MIN_AVG", "MAX_AVG"]
