"""Test and bootstrap key material for a federation, as Flower expects it (``dptrain federation pki``):

* a CA and the SuperLink's server certificate (PEM), naming the address the sites dial and 127.0.0.1 (the
  coordinator's ServerApp and CLI reach the SuperLink there, over the same TLS port);
* one SuperNode key pair per site for Flower's SuperNode authentication: NIST P-384 EC keys in OpenSSH format
  (the private key stays at the site; the coordinator lists the public key).

A production federation gets its server certificate from the hospital network's PKI (cert-manager, say); the keys
of each site are generated at that site. This module only spares tests and first trials openssl and ssh-keygen.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["ServerPki", "SiteKey", "make_server_pki", "make_site_key"]


@dataclass(frozen=True)
class ServerPki:
    ca_certificate: Path
    certificate: Path
    key: Path


@dataclass(frozen=True)
class SiteKey:
    private_key: Path
    public_key: str
    """The OpenSSH public key line (for the DPFederatedJob's sites[].publicKey)."""


def _write(path: Path, data: bytes, mode: int = 0o644) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    path.chmod(mode)
    return path


def _san(names: list[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for name in dict.fromkeys(names):
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return x509.SubjectAlternativeName(entries)


def make_server_pki(directory: Path, *, hosts: list[str], days: int = 30) -> ServerPki:
    """A CA (ca.crt, ca.key) and a SuperLink certificate (tls.crt, tls.key) for ``hosts`` plus localhost/127.0.0.1."""
    now = dt.datetime.now(dt.UTC)
    ca_key = rsa.generate_private_key(public_exponent=65537, key_size=3072)
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dptrain federation CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = rsa.generate_private_key(public_exponent=65537, key_size=3072)
    names = [*hosts, "localhost", "127.0.0.1"]
    certificate = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(_san(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    private = serialization.PrivateFormat.TraditionalOpenSSL
    plain = serialization.NoEncryption()
    _write(directory / "ca.key", ca_key.private_bytes(pem, private, plain), 0o600)
    return ServerPki(
        ca_certificate=_write(directory / "ca.crt", ca.public_bytes(pem)),
        certificate=_write(directory / "tls.crt", certificate.public_bytes(pem)),
        key=_write(directory / "tls.key", key.private_bytes(pem, private, plain), 0o600),
    )


def make_site_key(directory: Path, site: str) -> SiteKey:
    """A SuperNode key pair (EC P-384, OpenSSH format) for Flower's SuperNode authentication."""
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    path = _write(directory / f"{site}.key", private, 0o600)
    line = public.decode() + f" {site}"
    _write(directory / f"{site}.key.pub", (line + "\n").encode())
    return SiteKey(private_key=path, public_key=line)
