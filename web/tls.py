"""HTTPS for the API: the listener's certificate, and the contexts both ends of a connection use.

Boot files stay on plain HTTP (iPXE builds and UEFI HTTP Boot without an enrolled CA cannot check a
certificate, and the files are public anyway); what carries a token — the API, the dashboard, a write
forwarded to another appliance — goes over TLS once `api.tls_listen` is set. An operator who gives no
certificate gets a self-signed one made on the first start and kept in the state dir, so its SHA-256
fingerprint (logged at every start, and `cello doctor`'s) is the same from one start to the next.

Everything here reads or writes files: callers run it off the event loop.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import os
import secrets
import ssl
from dataclasses import dataclass
from pathlib import Path

SELF_SIGNED_DAYS = 3650  # the appliance's own certificate; an operator's is theirs to renew


class TlsError(Exception):
    """A certificate or key that cannot be used, in one line that names the file."""


@dataclass(frozen=True)
class ServerCertificate:
    cert: Path
    key: Path
    fingerprint: str  # SHA-256 of the DER certificate, hex pairs joined by ':' (as openssl x509 -fingerprint)
    made: bool  # made by this start (self-signed), not found


def fingerprint(cert_pem: bytes) -> str:
    """The leaf's SHA-256 fingerprint, as `openssl x509 -noout -fingerprint -sha256` prints it."""
    der = ssl.PEM_cert_to_DER_cert(cert_pem.decode("ascii", "replace"))
    digest = hashlib.sha256(der).hexdigest().upper()
    return ":".join(digest[i:i + 2] for i in range(0, len(digest), 2))


def server_certificate(cert: str, key: str, tls_dir: Path, names: list[str]) -> ServerCertificate:
    """The operator's certificate and key if given; else this appliance's self-signed one in `tls_dir`
    (made for `names`, host names or IP addresses, the first time)."""
    if cert or key:
        if not (cert and key):
            raise TlsError("api.tls_cert and api.tls_key go together: give both, or neither for a self-signed "
                           "certificate")
        paths = Path(cert), Path(key)
        made = False
    else:
        paths = tls_dir / "cert.pem", tls_dir / "key.pem"
        made = not paths[0].exists()
        if made:
            _make_self_signed(tls_dir, names)
    server_context(*paths)  # refuses a pair that does not load, before anything listens
    return ServerCertificate(paths[0], paths[1], fingerprint(paths[0].read_bytes()), made)


def server_context(cert: Path, key: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    for path in (cert, key):  # load_cert_chain's OSError does not say which of the two it was
        if not path.is_file():
            raise TlsError(f"{path}: no such file")
        if not os.access(path, os.R_OK):
            raise TlsError(f"{path}: not readable by this process")
    try:
        context.load_cert_chain(cert, key)
    except ssl.SSLError as e:
        raise TlsError(f"{cert} / {key}: not a PEM certificate and its own private key ({e.reason or e})") from None
    return context


def certificate_problem(cert: Path, key: Path, now: datetime.datetime | None = None) -> str | None:
    """What is wrong with a pair a start would serve (None: nothing): it does not load, or its
    certificate is not valid now."""
    from cryptography import x509

    try:
        server_context(cert, key)
    except TlsError as e:
        return str(e)
    leaf = x509.load_pem_x509_certificate(cert.read_bytes())
    now = now or datetime.datetime.now(datetime.UTC)
    if now > leaf.not_valid_after_utc:
        return f"{cert} expired on {leaf.not_valid_after_utc:%Y-%m-%d}: renew it (clients refuse it)"
    if now < leaf.not_valid_before_utc:
        return f"{cert} is not valid before {leaf.not_valid_before_utc:%Y-%m-%d %H:%M} UTC (this host's clock?)"
    return None


def _make_self_signed(tls_dir: Path, names: list[str]) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    # A name of its own: a client's CA file holding several appliances' certificates finds the issuer
    # by subject, and two appliances with the same one (the same advertised address) would shadow each other.
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0] if names else "cello"),
                         x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Cello appliance (self-signed)"),
                         x509.NameAttribute(NameOID.SERIAL_NUMBER, secrets.token_hex(8))])
    alt: list[x509.GeneralName] = []
    for name in dict.fromkeys(names):  # in order, once each
        try:
            alt.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            alt.append(x509.DNSName(name))
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))  # a client's clock a little behind
               .not_valid_after(now + datetime.timedelta(days=SELF_SIGNED_DAYS))
               .add_extension(x509.SubjectAlternativeName(alt), critical=False)
               # its own trust anchor: a client given this file as its CA (curl --cacert, CELLO_CACERT)
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, content_commitment=False,
                                            key_encipherment=False, data_encipherment=False, key_agreement=False,
                                            crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
               .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False))
    cert = builder.sign(key, hashes.SHA256())
    tls_dir.mkdir(parents=True, exist_ok=True)
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    # The key first, owner-only from its creation; the certificate last, as the sign both are whole.
    _write(tls_dir / "key.pem", key_pem, 0o600)
    _write(tls_dir / "cert.pem", cert.public_bytes(serialization.Encoding.PEM), 0o644)


def _write(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)  # whatever the umask
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
