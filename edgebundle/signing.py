"""Ed25519 signatures over a bundle's manifest.json bytes.

The manifest hashes every other file, so one signature covers the whole bundle. The
signature lives in the `manifest.sig` member as JSON:
    {"alg": "ed25519", "key_id": "<first 16 hex of sha256(raw public key)>", "sig": "<base64>"}
Keys are PEM files (PKCS#8 private, SubjectPublicKeyInfo public)."""
from __future__ import annotations

import base64
import hashlib
import json
import os
from pathlib import Path

from edgebundle.errors import InputError, VerificationError

ALG = "ed25519"


def _crypto():
    try:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:
        raise InputError("signing needs the 'cryptography' package", hint="pip install cryptography") from None
    return serialization, ed25519


def generate_keys(private_path: str | os.PathLike, public_path: str | os.PathLike) -> str:
    """Write a new key pair (private key mode 0600, never overwritten); returns the key id."""
    serialization, ed25519 = _crypto()
    private_path, public_path = Path(private_path), Path(public_path)
    for p in (private_path, public_path):
        if p.exists():
            raise InputError(f"{p} already exists; refusing to overwrite a key")
    key = ed25519.Ed25519PrivateKey.generate()
    priv = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
    private_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(priv)
    pub = key.public_key()
    public_path.write_bytes(pub.public_bytes(serialization.Encoding.PEM,
                                             serialization.PublicFormat.SubjectPublicKeyInfo))
    return key_id(pub)


def key_id(public_key) -> str:
    serialization, _ = _crypto()
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def load_private_key(path: str | os.PathLike):
    serialization, ed25519 = _crypto()
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as e:
        raise InputError(f"cannot read private key {path}: {e}",
                         hint="create one with: edgepack keys generate") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise InputError(f"{path} is not an Ed25519 private key")
    return key


def load_public_key(path: str | os.PathLike):
    serialization, ed25519 = _crypto()
    try:
        key = serialization.load_pem_public_key(Path(path).read_bytes())
    except (OSError, ValueError) as e:
        raise InputError(f"cannot read public key {path}: {e}") from None
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise InputError(f"{path} is not an Ed25519 public key")
    return key


def sign(manifest_bytes: bytes, private_key) -> bytes:
    sig = private_key.sign(manifest_bytes)
    return json.dumps({"alg": ALG, "key_id": key_id(private_key.public_key()),
                       "sig": base64.b64encode(sig).decode()}, sort_keys=True).encode()


def verify(manifest_bytes: bytes, signature: bytes | None, public_keys: list) -> str:
    """Check `signature` against any of `public_keys`; returns the key id that matched."""
    from cryptography.exceptions import InvalidSignature

    if signature is None:
        raise VerificationError("the bundle is not signed", problems=["manifest.sig: missing"],
                                hint="sign it: edgepack sign BUNDLE --key KEY")
    try:
        doc = json.loads(signature)
        raw = base64.b64decode(doc["sig"], validate=True)
        if doc.get("alg") != ALG:
            raise ValueError(f"algorithm {doc.get('alg')!r}")
    except (ValueError, KeyError, TypeError) as e:
        raise VerificationError(f"manifest.sig is malformed ({e})", problems=["manifest.sig: malformed"]) from None
    for pub in public_keys:
        try:
            pub.verify(raw, manifest_bytes)
            return key_id(pub)
        except InvalidSignature:
            continue
    raise VerificationError(
        f"the signature (key {doc.get('key_id')}) does not verify with any trusted key "
        f"({', '.join(key_id(k) for k in public_keys) or 'none'})",
        problems=["manifest.sig: bad signature or untrusted key"],
        hint="the bundle was changed after signing, or signed with a key this device does not trust")
