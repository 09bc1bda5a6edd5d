"""Chunk patches: a new chunk encoded against bytes the device already holds (the chunks of the
same region in its running bundle), so a chunk in which a few hundred bytes changed costs those
bytes on the link, not the whole chunk.

A patch is raw DEFLATE with a preset dictionary (zlib, so the agent needs nothing beyond the
standard library), cut into segments of SEGMENT bytes of output because DEFLATE only looks back
32 KiB: each segment names the slice of the source (the concatenated base chunks) it was
compressed against, chosen by the encoder around where that segment sat in the old version.

    "EPZ1" | u16 segments | per segment: u32 dict_start, u32 dict_len, u32 out_len, u32 comp_len
           | the compressed streams, in order

The record carries the patch's sha256 and the new chunk's sha256: the device checks the patch
before decoding it and the decoded chunk before using it, and fetches the chunk itself when a base
it needs is missing or damaged here."""
from __future__ import annotations

import bisect
import struct
import zlib

MAGIC = b"EPZ1"
SEGMENT = 16 << 10
WINDOW = 32 << 10  # DEFLATE's look-back: the most of a dictionary that can be used
_HEAD = struct.Struct("<4sH")
_SEG = struct.Struct("<IIII")


def encode(new: bytes, source: bytes, *, anchor: int) -> bytes:
    """`new` against `source`, where source[anchor] is thought to be where new[0] was (the
    encoder looks up to 8 KiB either side of each segment's spot)."""
    segs, streams = [], []
    for start in range(0, len(new), SEGMENT) or [0]:
        out = new[start:start + SEGMENT]
        lo = max(0, min(anchor + start - (WINDOW - SEGMENT) // 2, len(source) - WINDOW))
        hi = min(len(source), lo + WINDOW)
        z = zlib.compressobj(9, zlib.DEFLATED, -15, 9, zdict=source[lo:hi]) if hi > lo else \
            zlib.compressobj(9, zlib.DEFLATED, -15, 9)
        comp = z.compress(out) + z.flush()
        segs.append((lo, hi - lo, len(out), len(comp)))
        streams.append(comp)
    return _HEAD.pack(MAGIC, len(segs)) + b"".join(_SEG.pack(*s) for s in segs) + b"".join(streams)


def decode(patch: bytes, source: bytes, *, size: int) -> bytes:
    """The chunk of `size` bytes; ValueError when the patch is not one for this source and size
    (never more than `size` bytes are inflated)."""
    if len(patch) < _HEAD.size or patch[:4] != MAGIC:
        raise ValueError("not a chunk patch")
    _, count = _HEAD.unpack_from(patch)
    at = _HEAD.size + count * _SEG.size
    if count == 0 or count > size // SEGMENT + 1 or at > len(patch):
        raise ValueError("chunk patch header is damaged")
    out = []
    left = size
    for i in range(count):
        lo, n, out_len, comp_len = _SEG.unpack_from(patch, _HEAD.size + i * _SEG.size)
        if lo + n > len(source) or n > WINDOW or out_len > left or at + comp_len > len(patch):
            raise ValueError("chunk patch segment is out of bounds")
        z = zlib.decompressobj(-15, zdict=source[lo:lo + n]) if n else zlib.decompressobj(-15)
        try:  # out_len + 1: a max_length of 0 would mean no limit, and one byte more shows a long stream
            data = z.decompress(patch[at:at + comp_len], out_len + 1)
        except zlib.error as e:
            raise ValueError(f"chunk patch does not inflate: {e}") from None
        if len(data) != out_len or not z.eof or z.unconsumed_tail:
            raise ValueError("chunk patch segment has the wrong length")
        out.append(data)
        left -= out_len
        at += comp_len
    if left or at != len(patch):
        raise ValueError("chunk patch does not make a chunk of the size the record says")
    return b"".join(out)


def plan(new: list[tuple[str, int]], old: list[tuple[str, int]], *, margin: int = 4 << 10,
         most: int = 4) -> dict[str, tuple[tuple[str, ...], int]]:
    """For each chunk of `new` that `old` lacks (both: (sha256, size) in file order), the old
    chunks around where it sat (at most `most`, contiguous) and the anchor in their concatenation:
    {new sha256: (base sha256s, anchor)}. Where it sat is its offset moved by the shift of the
    nearest chunk both files share (a member that grew before it moves everything after it)."""
    old_at, at = [], 0
    for _, n in old:
        old_at.append(at)
        at += n
    old_end = at
    where: dict[str, list[int]] = {}  # every offset of each old chunk (zero tensors repeat)
    for (sha, _), o in zip(old, old_at):
        where.setdefault(sha, []).append(o)
    new_at, at = [], 0
    for _, n in new:
        new_at.append(at)
        at += n
    shared = [i for i, (sha, _) in enumerate(new) if sha in where]
    out: dict[str, tuple[tuple[str, ...], int]] = {}
    for i, (sha, n) in enumerate(new):
        if sha in where or sha in out or not old:
            continue
        k = bisect.bisect_left(shared, i)
        j = shared[k - 1] if k else (shared[k] if k < len(shared) else None)
        shift = 0
        if j is not None:  # where that chunk sat in the old file (its occurrence nearest its new offset)
            shift = min(where[new[j][0]], key=lambda o: abs(o - new_at[j])) - new_at[j]
        lo, hi = max(0, new_at[i] + shift - margin), min(old_end, new_at[i] + n + shift + margin)
        if lo >= hi:
            continue
        a = max(0, bisect.bisect_right(old_at, lo) - 1)
        b = bisect.bisect_left(old_at, hi)
        while b - a > most:  # keep the middle
            a, b = (a + 1, b) if (b - a) % 2 == 0 else (a, b - 1)
        out[sha] = (tuple(s for s, _ in old[a:b]), new_at[i] + shift - old_at[a])
    return out


__all__ = ["decode", "encode", "plan", "MAGIC", "SEGMENT"]
