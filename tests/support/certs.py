"""Test certificates made with ``cryptography``: CAs, server, client and expired certs.

:func:`make_pki` writes a complete set of PEM files to a directory: two
independent CAs, a server certificate (SANs ``DNS:localhost`` and
``IP:127.0.0.1``), an expired one, a server certificate from the other CA,
and client certificates from both CAs. EC P-256 keys keep it fast.
:func:`issue_into` adds more from the same CA: an RSA server certificate (the
only kind that can do static-RSA key exchange) or a client with a long
corporate subject (:func:`long_subject`); :func:`write_lax_printable` writes
the kind of certificate some CAs issue that OpenSSL verifies but
``cryptography`` cannot parse.
"""

from __future__ import annotations

import datetime
import ipaddress
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.padding import PKCS1v15
from cryptography.x509.name import _ASN1Type
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

ORG = "eth-twisted test"


@dataclass(frozen=True)
class Issued:
    """A key and its certificate."""

    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
    cert: x509.Certificate


@dataclass(frozen=True)
class PemPair:
    """Where one certificate and its key were written."""

    cert: str
    key: str


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORG),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def make_ca(cn: str = "eth-twisted test CA") -> Issued:
    """A self-signed CA certificate valid from yesterday for ten days."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(_name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=10))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
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
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return Issued(key, cert)


def issue(
    ca: Issued,
    cn: str,
    *,
    server: bool = False,
    dns: tuple[str, ...] = (),
    ips: tuple[str, ...] = (),
    days_valid: tuple[float, float] = (-1, 10),
    subject: x509.Name | None = None,
    rsa_bits: int | None = None,
) -> Issued:
    """A leaf certificate signed by ``ca``; ``days_valid`` is (start, end) relative to now.

    ``subject`` replaces ``O=<ORG>,CN=<cn>``; ``rsa_bits`` makes an RSA key
    instead of EC P-256.
    """
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
    if rsa_bits:
        key = rsa.generate_private_key(public_exponent=65537, key_size=rsa_bits)
    else:
        key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject if subject is not None else _name(cn))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now + datetime.timedelta(days=days_valid[0]))
        .not_valid_after(now + datetime.timedelta(days=days_valid[1]))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False
        )
    )
    sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
    sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return Issued(key, builder.sign(ca.key, hashes.SHA256()))


def write_pem(directory: Path, name: str, issued: Issued) -> PemPair:
    """Write ``name.crt`` and ``name.key`` (PKCS#8, 0600) under ``directory``."""
    cert_path = directory / f"{name}.crt"
    key_path = directory / f"{name}.key"
    cert_path.write_bytes(issued.cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        issued.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    return PemPair(str(cert_path), str(key_path))


@dataclass(frozen=True)
class PKI:
    """Paths of a complete test PKI (see :func:`make_pki`)."""

    ca: str
    other_ca: str
    server: PemPair
    expired_server: PemPair
    other_server: PemPair
    client: PemPair
    other_client: PemPair
    client_subject: str


SERVER_DNS = ("localhost",)
SERVER_IPS = ("127.0.0.1",)


def make_pki(directory: Path) -> PKI:
    """Write two CAs and the server/client certificates the TLS tests need."""
    directory.mkdir(parents=True, exist_ok=True)
    ca = make_ca("eth-twisted test CA")
    other = make_ca("eth-twisted other CA")
    ca_pair = write_pem(directory, "ca", ca)
    other_pair = write_pem(directory, "other-ca", other)
    server = issue(ca, "localhost", server=True, dns=SERVER_DNS, ips=SERVER_IPS)
    expired = issue(
        ca, "localhost", server=True, dns=SERVER_DNS, ips=SERVER_IPS, days_valid=(-10, -1)
    )
    other_server = issue(other, "localhost", server=True, dns=SERVER_DNS, ips=SERVER_IPS)
    client = issue(ca, "client-1")
    other_client = issue(other, "client-1")
    return PKI(
        ca=ca_pair.cert,
        other_ca=other_pair.cert,
        server=write_pem(directory, "server", server),
        expired_server=write_pem(directory, "expired-server", expired),
        other_server=write_pem(directory, "other-server", other_server),
        client=write_pem(directory, "client", client),
        other_client=write_pem(directory, "other-client", other_client),
        client_subject=client.cert.subject.rfc4514_string(),
    )


def load_issued(pair: PemPair) -> Issued:
    """A certificate and key written by :func:`write_pem`, read back (e.g. a PKI's CA)."""
    cert = x509.load_pem_x509_certificate(Path(pair.cert).read_bytes())
    key = serialization.load_pem_private_key(Path(pair.key).read_bytes(), password=None)
    assert isinstance(key, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey))
    return Issued(key, cert)


def issue_into(pki: PKI, name: str, cn: str = "localhost", **kwargs: object) -> PemPair:
    """Issue one more leaf from ``pki``'s CA (``issue``'s keyword arguments) and write it beside it."""
    directory = Path(pki.ca).parent
    ca = load_issued(PemPair(pki.ca, str(directory / "ca.key")))
    return write_pem(directory, name, issue(ca, cn, **kwargs))  # type: ignore[arg-type]


def long_subject(length: int = 320) -> x509.Name:
    """A corporate-style distinguished name whose RFC 4514 form is at least ``length`` characters.

    Each attribute stays within RFC 5280's upper bounds (64 characters), as a
    real CA's would; the length comes from many organisational units.
    """
    attrs = [
        x509.NameAttribute(NameOID.COUNTRY_NAME, "GB"),
        x509.NameAttribute(NameOID.STATE_OR_PROVINCE_NAME, "Greater London"),
        x509.NameAttribute(NameOID.LOCALITY_NAME, "London"),
        x509.NameAttribute(
            NameOID.ORGANIZATION_NAME, "Example Corporation International Holdings plc"
        ),
    ]
    units = [
        "Group Technology Operations and Infrastructure",
        "Digital Assets and Custody Services Division",
        "Blockchain Infrastructure Platform Engineering",
        "Market Data Distribution and Settlement Systems",
        "Production Support EMEA Region Ledger Services",
        "Regulated Entities Identity and Access Management",
    ]
    cn = x509.NameAttribute(NameOID.COMMON_NAME, "svc-eth-relay-01.prod.eu-west-1.corp.example")
    name = x509.Name([*attrs, cn])
    for unit in units:
        if len(name.rfc4514_string()) >= length:
            break
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, unit))
        name = x509.Name([*attrs, cn])
    assert len(name.rfc4514_string()) >= length, "add more units"
    return name


def _der_length(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    body = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(body)]) + body


def _der_skip(der: bytes, at: int) -> int:
    """The offset just after the DER element starting at ``at``."""
    length = der[at + 1]
    start = at + 2
    if length & 0x80:
        count = length & 0x7F
        length = int.from_bytes(der[start : start + count], "big")
        start += count
    return start + length


def write_lax_printable(pki: PKI, name: str, cn: str) -> PemPair:
    """Write a client certificate, validly signed by ``pki``'s CA, whose CN is a PrintableString ``cn``.

    ``cn`` may hold characters PrintableString does not allow (``_``, ``@``),
    as some CAs issue: OpenSSL parses and verifies such a certificate,
    ``cryptography`` refuses to load it (and to build it, so the TBS bytes
    are patched and signed again here).
    """
    directory = Path(pki.ca).parent
    ca = load_issued(PemPair(pki.ca, str(directory / "ca.key")))
    placeholder = "Q" * len(cn)
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORG),
            x509.NameAttribute(NameOID.COMMON_NAME, placeholder, _type=_ASN1Type.PrintableString),
        ]
    )
    template = issue(ca, placeholder, subject=subject)
    tbs = template.cert.tbs_certificate_bytes
    assert tbs.count(placeholder.encode()) == 1
    tbs = tbs.replace(placeholder.encode(), cn.encode("latin-1"))
    if isinstance(ca.key, ec.EllipticCurvePrivateKey):
        signature = ca.key.sign(tbs, ec.ECDSA(hashes.SHA256()))
    else:
        signature = ca.key.sign(tbs, PKCS1v15(), hashes.SHA256())
    # Certificate ::= SEQUENCE { tbsCertificate, signatureAlgorithm, signatureValue }
    der = template.cert.public_bytes(serialization.Encoding.DER)
    assert _der_skip(der, 0) == len(der)
    header = 2 + (der[1] & 0x7F if der[1] & 0x80 else 0)
    algorithm_at = _der_skip(der, header)
    algorithm = der[algorithm_at : _der_skip(der, algorithm_at)]
    bit_string = b"\x03" + _der_length(len(signature) + 1) + b"\x00" + signature
    body = tbs + algorithm + bit_string
    cert_der = b"\x30" + _der_length(len(body)) + body
    pair = write_pem(directory, name, template)
    Path(pair.cert).write_text(ssl.DER_cert_to_PEM_cert(cert_der))
    return pair
