"""A throw-away PKI for TLS tests: a CA, a server certificate for 127.0.0.1 and a client certificate."""
from __future__ import annotations

import datetime
from pathlib import Path


def make_pki(d: Path) -> dict:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, made here."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    import ipaddress

    now = datetime.datetime.now(datetime.timezone.utc)

    def key():
        return ec.generate_private_key(ec.SECP256R1())

    def name(cn):
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def write(path, obj):
        path.write_bytes(obj.public_bytes(serialization.Encoding.PEM) if hasattr(obj, "public_bytes")
                         and not hasattr(obj, "private_numbers") else
                         obj.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
        return str(path)

    ca_key = key()
    ca = (x509.CertificateBuilder().subject_name(name("edgepack test CA")).issuer_name(name("edgepack test CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    out = {"ca": write(d / "ca.pem", ca)}
    for role in ("server", "client"):
        k = key()
        b = (x509.CertificateBuilder().subject_name(name(f"edgepack {role}")).issuer_name(ca.subject)
             .public_key(k.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1)))
        if role == "server":
            b = b.add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                                             x509.DNSName("localhost")]), critical=False)
        cert = b.sign(ca_key, hashes.SHA256())
        out[f"{role}_cert"], out[f"{role}_key"] = write(d / f"{role}.pem", cert), write(d / f"{role}.key", k)
    return out
