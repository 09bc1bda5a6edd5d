"""`edgepack keys | sign`: signing keys and bundles."""
from __future__ import annotations

import json
from pathlib import Path

import click


@click.group()
def keys() -> None:
    """Signing keys (Ed25519)."""


@keys.command("generate")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=Path("."), show_default=True)
@click.option("--name", default="edgepack", show_default=True, help="Writes NAME.key (private) and NAME.pub.")
def keys_generate(out_dir, name):
    """Create a key pair: keep NAME.key secret, give NAME.pub to devices (--trusted-key)."""
    from edgebundle.signing import generate_keys

    kid = generate_keys(out_dir / f"{name}.key", out_dir / f"{name}.pub")
    click.echo(f"key id {kid}\nprivate: {out_dir / (name + '.key')} (mode 0600)\npublic:  {out_dir / (name + '.pub')}")


@keys.command("certify")
@click.argument("fleet_pub", type=click.Path(exists=True, path_type=Path))
@click.option("--root-key", required=True, type=click.Path(exists=True, path_type=Path),
              help="The root private key (kept offline).")
@click.option("--serial", type=int, required=True,
              help="Key generation: devices refuse keys of a lower generation once they saw a higher one.")
@click.option("--not-after", type=click.DateTime(formats=["%Y-%m-%d", "%Y-%m-%dT%H:%M:%S"]),
              help="Expiry (UTC); devices refuse the key after it (mind their clocks).")
@click.option("--out", "out_path", type=click.Path(path_type=Path), help="Default: FLEET_PUB with .cert.")
def keys_certify(fleet_pub, root_key, serial, not_after, out_path):
    """Certify a fleet key with the root key: devices that trust the root (--root-key) trust it."""
    from datetime import timezone

    from edgebundle.signing import load_private_key, load_public_key
    from edgebundle.trust import certify

    cert = certify(load_public_key(fleet_pub), load_private_key(root_key), serial=serial,
                   not_after=not_after.replace(tzinfo=timezone.utc) if not_after else None)
    out_path = out_path or fleet_pub.with_suffix(".cert")
    out_path.write_text(json.dumps(cert, indent=2) + "\n")
    click.echo(f"certified key {cert['key_id']} (generation {serial}) -> {out_path}")


@click.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--key", "key_path", required=True, type=click.Path(path_type=Path), help="Private key (PEM).")
@click.option("--cert", "cert_path", type=click.Path(exists=True, path_type=Path),
              help="The key's certificate (edgepack keys certify), carried in the signature.")
def sign(bundle, key_path, cert_path):
    """Sign BUNDLE's manifest (which hashes every file) in place, atomically."""
    from edgebundle.archive import sign_bundle
    from edgebundle.signing import load_private_key

    cert = json.loads(cert_path.read_text()) if cert_path else None
    sig = json.loads(sign_bundle(bundle, load_private_key(key_path), cert=cert))
    click.echo(f"signed {bundle} with key {sig['key_id']}")


COMMANDS = (keys, sign)
