"""Write and read bundle files safely.

A bundle is a flat ZIP archive (see docs/bundle-format.md). Reading never trusts
the archive: member names must be plain file names, links and directories are
refused, sizes are capped, every member must be listed in the manifest with its
sha256 and size, and hashes are checked while the bytes stream out.
"""
from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
import stat
import struct
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
import zlib
from typing import Callable, Iterable

from edgebundle.errors import BundleError, OutputError, VerificationError
from edgebundle.manifest import FileEntry, Manifest

MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"  # reserved: detached signature over manifest.json bytes
MAX_MANIFEST_BYTES = 4 << 20
MAX_MEMBER_BYTES = 2 << 30  # an edge model over 2 GiB is a mistake or an attack
MAX_MEMBERS = 64
# Zip bombs: the members may together inflate to at most this many times the archive's size
# (plus a small allowance for tiny bundles). Models barely compress; golden arrays of zeros do,
# but they are small.
MAX_EXPANSION = 16
EXPANSION_SLACK = 16 << 20
# What a malformed archive can make zipfile/zlib raise while reading it.
_ZIP_ERRORS = (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError,
               ValueError, struct.error, OverflowError)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_CHUNK = 1 << 20
# Written uncompressed: model files (and the golden arrays, whose inputs rarely change) barely
# compress, and deflate would let one changed tensor reshuffle every byte after it, so a delta
# update (edgebundle.cdc) could reuse nothing past the change. Manifest, tokenizer, labels: deflated.
STORED_SUFFIXES = (".tflite", ".onnx", ".npz", ".onnx.data")  # weights: stored, so deltas find them


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def write_bundle(
    dest: str | os.PathLike,
    manifest: Manifest,
    files: dict[str, str | os.PathLike],
    *,
    signer: Callable[[bytes], bytes] | None = None,
) -> Manifest:
    """Write `files` plus the manifest (with their hashes filled in) to `dest`; `signer`
    maps the manifest bytes to a signature (edgebundle.signing.sign).

    Atomic: the archive is written to a temporary file in the same directory,
    flushed to disk, then renamed, so an interrupted build leaves no bundle.
    """
    dest = Path(dest)
    for name in files:
        _check_name(name)
        if name in (MANIFEST, SIGNATURE):
            raise BundleError(f"{name!r} is reserved for the bundle's own use")
    entries = {name: FileEntry(sha256_file(p), os.path.getsize(p)) for name, p in files.items()}
    manifest = manifest.with_files(entries)
    Manifest.from_dict(manifest.to_dict())  # refuse to write what we could not read back
    manifest_bytes = manifest.to_json()
    signature = signer(manifest_bytes) if signer is not None else None
    _write_zip(dest, manifest_bytes, signature, {name: (lambda p=p: open(p, "rb")) for name, p in files.items()})
    return manifest


def file_mode() -> int:
    """The mode open() would give a new file: 0666 less the process umask (0644 under umask 022).
    Read from /proc (setting the umask to read it is not thread-safe); elsewhere the dance."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def _write_zip(dest: Path, manifest_bytes: bytes, signature: bytes | None, members: dict) -> None:
    """Write the archive to a temporary file next to `dest`, fsync, rename. `members` maps a
    name to a callable opening its content for reading (streamed, never fully in memory)."""
    tmp = None
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
        with os.fdopen(fd, "wb") as raw:
            os.fchmod(raw.fileno(), file_mode())  # mkstemp's 0600 would keep web servers and CI artifacts out
            with zipfile.ZipFile(raw, "w", compression=zipfile.ZIP_DEFLATED) as zf:
                zf.writestr(_info(MANIFEST), manifest_bytes)
                if signature is not None:
                    zf.writestr(_info(SIGNATURE), signature)
                for name, opener in sorted(members.items()):
                    with opener() as src, zf.open(_info(name), "w", force_zip64=True) as out:
                        for block in iter(lambda: src.read(_CHUNK), b""):
                            out.write(block)
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(tmp, dest)
    except BaseException as e:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError) and e.errno in _NO_ROOM:
            raise _no_room(dest, e) from None
        raise


_NO_ROOM = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}


def _no_room(dest: Path, e: OSError) -> OutputError:
    try:
        free = f"{shutil.disk_usage(dest.parent).free / 1e6:,.0f} MB are free there now"
    except OSError:
        free = "check the space there"
    return OutputError(f"cannot write {dest.name} in {dest.parent}: {e.strerror or e} (nothing was left behind)",
                       hint=f"{free}; free some, or write the bundles elsewhere (-o DIR)")


def _info(name: str) -> zipfile.ZipInfo:
    zi = zipfile.ZipInfo(name, date_time=(2020, 1, 1, 0, 0, 0))  # reproducible archives
    zi.compress_type = zipfile.ZIP_STORED if name.endswith(STORED_SUFFIXES) else zipfile.ZIP_DEFLATED
    zi.external_attr = (stat.S_IFREG | 0o644) << 16
    return zi


def _check_name(name: str) -> None:
    if not _NAME.match(name) or ".." in name:
        raise BundleError(
            f"bundle member name {name!r} is not allowed",
            hint="members are plain file names (letters, digits, '.', '_', '-'), no folders",
        )


@dataclass
class Bundle:
    """An opened bundle whose structure and manifest were checked.

    File contents are verified when read (`read`, `extract`), not on open, so
    inspecting a large bundle stays cheap.
    """

    path: Path
    manifest: Manifest
    manifest_bytes: bytes
    signature: bytes | None

    def read(self, name: str) -> bytes:
        """Read one member fully, verifying its size and sha256."""
        with zipfile.ZipFile(self.path) as zf:
            buf = bytearray()
            self._stream(zf, name, buf.extend)
            return bytes(buf)

    def extract(self, dest_dir: str | os.PathLike, names: Iterable[str] | None = None) -> dict[str, Path]:
        """Extract members into `dest_dir`, hashing as they stream; a bad member is
        deleted and raises VerificationError. Returns name -> path."""
        names = list(names) if names is not None else sorted(self.manifest.files)
        with _zip(self.path) as zf:
            return {name: self._extract_one(zf, name, Path(dest_dir)) for name in names}

    def verify(self, *, extract_to: str | os.PathLike | None = None, extract: Iterable[str] = ()) -> dict[str, Path]:
        """Check every member's size and sha256 in one pass; the members named in `extract` are
        written to `extract_to` on the way (so nothing is inflated and hashed twice). Raises
        VerificationError listing every problem; returns name -> extracted path."""
        wanted = set(extract)
        problems: list[str] = []
        out: dict[str, Path] = {}
        with _zip(self.path) as zf:
            for name in sorted(self.manifest.files):
                try:
                    if name in wanted and extract_to is not None:
                        out[name] = self._extract_one(zf, name, Path(extract_to))
                    else:
                        self._stream(zf, name, lambda _b: None)
                except VerificationError as e:
                    problems.append(str(e).split("\n")[0])
        if problems:
            raise VerificationError(
                f"{self.path.name}: {len(problems)} file(s) do not match the manifest",
                problems=problems,
                hint="the bundle was modified or damaged after it was built; rebuild or re-download it",
            )
        return out

    def _extract_one(self, zf: zipfile.ZipFile, name: str, dest_dir: Path) -> Path:
        dest_dir.mkdir(parents=True, exist_ok=True)
        target = dest_dir / name  # name was checked against _NAME on open
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=dest_dir)  # its own: two
        tmp = Path(tmp)  # processes may extract the same bundle into a shared cache at once
        try:
            with os.fdopen(fd, "wb") as f:
                os.fchmod(f.fileno(), file_mode())
                self._stream(zf, name, f.write)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return target

    def _stream(self, zf: zipfile.ZipFile, name: str, sink) -> None:
        entry = self.manifest.files.get(name)
        if entry is None:
            raise BundleError(f"{name!r} is not listed in the bundle's manifest")
        h = hashlib.sha256()
        n = 0
        try:
            src = zf.open(name)
        except _ZIP_ERRORS + (OSError,) as e:
            raise VerificationError(f"{name}: archive data is corrupt ({type(e).__name__}: {e})",
                                    problems=[f"{name}: corrupt"]) from None
        with src:
            while True:
                try:  # only reading the archive is guarded: a full disk in `sink` stays an OSError
                    block = src.read(_CHUNK)
                except _ZIP_ERRORS + (OSError,) as e:
                    raise VerificationError(f"{name}: archive data is corrupt ({type(e).__name__}: {e})",
                                            problems=[f"{name}: corrupt"]) from None
                if not block:
                    break
                n += len(block)
                if n > entry.size:
                    raise VerificationError(
                        f"{name}: more bytes than the manifest's {entry.size}",
                        problems=[f"{name}: size exceeds manifest"],
                    )
                h.update(block)
                sink(block)
        if n != entry.size:
            raise VerificationError(f"{name}: {n} bytes, manifest says {entry.size}",
                                    problems=[f"{name}: size mismatch"])
        if h.hexdigest() != entry.sha256:
            raise VerificationError(
                f"{name}: sha256 {h.hexdigest()[:16]}... does not match the manifest's {entry.sha256[:16]}...",
                problems=[f"{name}: sha256 mismatch"],
                hint="the bundle was modified or damaged after it was built; rebuild or re-download it",
            )


def _zip(path: Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except OSError as e:
        raise BundleError(f"cannot read bundle {path.name}: {e}") from None
    except _ZIP_ERRORS as e:
        raise BundleError(f"{path.name} is not an edgepack bundle (not a readable ZIP archive: {e})") from None


def open_bundle(path: str | os.PathLike) -> Bundle:
    """Open a bundle and check its structure and manifest (not yet the file hashes)."""
    path = Path(path)
    if not path.is_file():
        raise BundleError(f"bundle {str(path)!r} does not exist or is not a file")
    zf = _zip(path)
    try:
        with zf:
            return _open(zf, path)
    except _ZIP_ERRORS + (OSError,) as e:
        raise BundleError(f"{path.name}: the ZIP structure is damaged ({type(e).__name__}: {e})") from None


def _open(zf: zipfile.ZipFile, path: Path) -> Bundle:
    infos = zf.infolist()
    if len(infos) > MAX_MEMBERS:
        raise BundleError(f"{path.name} has {len(infos)} members; at most {MAX_MEMBERS} are allowed")
    seen: set[str] = set()
    for zi in infos:
        _check_member(zi, path.name)
        if zi.filename in seen:
            raise BundleError(f"{path.name}: member {zi.filename!r} appears twice")
        seen.add(zi.filename)
    if MANIFEST not in seen:
        raise BundleError(f"{path.name} has no {MANIFEST}; it is not an edgepack bundle")
    total = sum(zi.file_size for zi in infos)
    allowed = MAX_EXPANSION * path.stat().st_size + EXPANSION_SLACK
    if total > allowed:
        raise BundleError(f"{path.name}: its members claim {total} bytes; an archive of {path.stat().st_size} "
                          f"bytes that expands past {allowed} is refused (a zip bomb?)",
                          hint="this file was not made by edgepack, or was tampered with")
    if zf.getinfo(MANIFEST).file_size > MAX_MANIFEST_BYTES:
        raise BundleError(f"{path.name}: manifest.json is larger than {MAX_MANIFEST_BYTES} bytes")
    with zf.open(MANIFEST) as f:
        manifest_bytes = f.read(MAX_MANIFEST_BYTES + 1)
    if len(manifest_bytes) > MAX_MANIFEST_BYTES:
        raise BundleError(f"{path.name}: manifest.json is larger than {MAX_MANIFEST_BYTES} bytes")
    manifest = Manifest.from_json(manifest_bytes)
    signature = None
    if SIGNATURE in seen:
        with zf.open(SIGNATURE) as f:
            signature = f.read(4096)
    members = seen - {MANIFEST, SIGNATURE}
    listed = set(manifest.files)
    problems = [f"{n}: in the archive but not in the manifest" for n in sorted(members - listed)]
    problems += [f"{n}: in the manifest but missing from the archive" for n in sorted(listed - members)]
    for n in sorted(members & listed):
        _check_name(n)
        if zf.getinfo(n).file_size != manifest.files[n].size:
            problems.append(f"{n}: archive says {zf.getinfo(n).file_size} bytes, manifest {manifest.files[n].size}")
    if problems:
        raise VerificationError(
            f"{path.name}: archive does not match its manifest ({len(problems)} problem(s))",
            problems=problems,
            hint="the bundle was altered after it was built; rebuild it",
        )
    return Bundle(path=path, manifest=manifest, manifest_bytes=manifest_bytes, signature=signature)


def _check_member(zi: zipfile.ZipInfo, bundle_name: str) -> None:
    name = zi.filename
    ftype = stat.S_IFMT(zi.external_attr >> 16)  # 0 when the archiver recorded no file type
    if not _NAME.match(name) or ".." in name:
        raise BundleError(
            f"{bundle_name}: unsafe member name {name!r} (absolute path, '..' or a folder); refused",
            hint="this file was not made by edgepack, or was tampered with")
    if zi.is_dir():
        raise BundleError(f"{bundle_name}: member {name!r} is a directory; bundles are flat")
    if ftype == stat.S_IFLNK:
        raise BundleError(f"{bundle_name}: member {name!r} is a symbolic link; refused")
    if ftype and ftype != stat.S_IFREG:
        raise BundleError(f"{bundle_name}: member {name!r} is not a regular file; refused")
    if zi.file_size > MAX_MEMBER_BYTES:
        raise BundleError(f"{bundle_name}: member {name!r} claims {zi.file_size} bytes, over the limit")


def verify_bundle(path: str | os.PathLike) -> Bundle:
    """Open a bundle and re-check every file's size and sha256 against the manifest.

    Raises VerificationError listing every problem found, not just the first."""
    bundle = open_bundle(path)
    bundle.verify()
    return bundle


def sign_bundle(path: str | os.PathLike, private_key, *, cert: dict | None = None) -> bytes:
    """Add (or replace) the signature over manifest.json; rewrites the archive atomically.
    The manifest and files are checked first: a damaged bundle is never signed. `cert` (the
    key's certificate from a root key, edgebundle.trust) travels inside the signature."""
    from edgebundle import signing

    bundle = verify_bundle(path)
    signature = signing.sign(bundle.manifest_bytes, private_key, cert=cert)
    with zipfile.ZipFile(path) as zin:
        _write_zip(Path(path), bundle.manifest_bytes, signature,
                   {name: (lambda n=name: zin.open(n)) for name in bundle.manifest.files})
    return signature


def verify_signed(path: str | os.PathLike, public_keys: list) -> tuple[Bundle, str]:
    """verify_bundle plus the signature against `public_keys`; returns (bundle, key id)."""
    from edgebundle import signing

    bundle = verify_bundle(path)
    return bundle, signing.verify(bundle.manifest_bytes, bundle.signature, public_keys)
