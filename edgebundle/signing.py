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


def canonical_json(doc) -> bytes:
    """The bytes a JSON document is signed over: sorted keys, no whitespace, ASCII only, no NaN.
    Signer and verifier both canonicalize the parsed document, so the transport's formatting
    does not matter."""
    try:
        return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()
    except (TypeError, ValueError) as e:
        raise InputError(f"cannot canonicalize the document: {e}") from None


def signature_block(data: bytes, private_key) -> dict:
    """{"alg": "ed25519", "key_id", "sig"} over `data`."""
    return {"alg": ALG, "key_id": key_id(private_key.public_key()),
            "sig": base64.b64encode(private_key.sign(data)).decode()}


def sign(manifest_bytes: bytes, private_key, *, cert: dict | None = None) -> bytes:
    block = signature_block(manifest_bytes, private_key)
    if cert is not None:
        block["cert"] = cert
    return json.dumps(block, sort_keys=True).encode()


def verify(manifest_bytes: bytes, signature: bytes | None, public_keys: list) -> str:
    """Check `signature` against any of `public_keys`; returns the key id that matched."""
    if signature is None:
        raise VerificationError("the bundle is not signed", problems=["manifest.sig: missing"],
                                hint="sign it: edgepack sign BUNDLE --key KEY")
    try:
        doc = json.loads(signature)
    except ValueError as e:
        raise VerificationError(f"manifest.sig is malformed ({e})", problems=["manifest.sig: malformed"]) from None
    try:
        return verify_block(manifest_bytes, doc, public_keys, what="manifest.sig")
    except VerificationError as e:
        if "does not verify" in str(e):
            raise VerificationError(
                str(e).split("\n")[0], problems=["manifest.sig: bad signature or untrusted key"],
                hint="the bundle was changed after signing, or signed with a key this device does not trust") from None
        raise


def verify_block(data: bytes, block, public_keys: list, *, what: str = "signature") -> str:
    """Check a signature block over `data` against any of `public_keys`; returns the matching key id."""
    from cryptography.exceptions import InvalidSignature

    raw = decode_block(block, what=what)
    for pub in public_keys:
        try:
            pub.verify(raw, data)
            return key_id(pub)
        except InvalidSignature:
            continue
    raise VerificationError(
        f"the {what} (key {block.get('key_id')}) does not verify with any trusted key "
        f"({', '.join(key_id(k) for k in public_keys) or 'none'})",
        problems=[f"{what}: bad signature or untrusted key"])


def decode_block(block, *, what: str = "signature") -> bytes:
    """The raw signature bytes of a well-formed block; VerificationError otherwise."""
    try:
        if not isinstance(block, dict):
            raise ValueError("not an object")
        if block.get("alg") != ALG:
            raise ValueError(f"algorithm {block.get('alg')!r}")
        if not isinstance(block.get("sig"), str) or len(block["sig"]) > 200:
            raise ValueError("no signature string")
        raw = base64.b64decode(block["sig"], validate=True)
        if len(raw) != 64:
            raise ValueError("an Ed25519 signature is 64 bytes")
    except (ValueError, TypeError) as e:
        raise VerificationError(f"{what} is malformed ({e})", problems=[f"{what}: malformed"]) from None
    return raw


def public_key_from_raw(raw: bytes):
    _, ed25519 = _crypto()
    try:
        return ed25519.Ed25519PublicKey.from_public_bytes(raw)
    except (ValueError, TypeError) as e:
        raise VerificationError(f"not an Ed25519 public key: {e}") from None


def raw_public_key(public_key) -> bytes:
    serialization, _ = _crypto()
    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
