"""TLS for the admin listener (and the local API when it is bound beyond loopback): TLS 1.3 only, with the
configured certificate, or a self-signed one made once at first start and kept beside the database, so its
fingerprint stays the same across restarts and can be checked against the box's console."""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import logging
import os
import socket
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from appliance.errors import ConfigError

log = logging.getLogger(__name__)


def make_self_signed(directory: Path) -> tuple[Path, Path]:
    """cert.pem and key.pem in directory, made now unless both exist; the key file is readable by root only."""
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    if cert_path.exists() and key_path.exists():
        return cert_path, key_path
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"r1box {socket.gethostname()}")])
    now = dt.datetime.now(dt.timezone.utc)
    alt = x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.DNSName(socket.gethostname()),
                                       x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=3650)).add_extension(alt, critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    log.info("made a self-signed certificate for the admin pages in %s", directory)
    return cert_path, key_path


def fingerprint(cert_path: Path) -> str:
    """SHA-256 of the certificate, as browsers show it (AB:CD:...)."""
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    digest = hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest().upper()
    return ":".join(digest[i:i + 2] for i in range(0, len(digest), 2))


def server_context(cert: str, key: str, state_dir: Path) -> tuple[ssl.SSLContext, str]:
    """A TLS 1.3-only server context and the certificate's fingerprint."""
    if cert:
        cert_path, key_path = Path(cert).expanduser(), Path(key).expanduser()
    else:
        cert_path, key_path = make_self_signed(state_dir)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    try:
        context.load_cert_chain(cert_path, key_path)
        return context, fingerprint(cert_path)
    except (OSError, ssl.SSLError, ValueError) as e:
        raise ConfigError(f"[admin] cert {cert_path} / key {key_path}: cannot use them ({e}); give a PEM "
                          "certificate and its key, or leave both empty for a self-signed pair.") from None
