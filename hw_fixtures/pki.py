"""A test PKI shaped like SGP.26's: CI root, EUM, eUICC, SM-DP+ auth/PB/TLS, all NIST P-256.

Keys are generated at run time (a pytest fixture makes one per session); nothing private is
committed. The certificate profile follows SGP.22 §4.5.2: certificate policies name the role
(id-rspRole, 2.23.146.1.2.1.x), the eUICC certificate's subject serialNumber is the EID, SM-DP+
certificates carry the SM-DP+ OID as a registeredID subject alternative name.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

ROLE_CI: Final = x509.ObjectIdentifier("2.23.146.1.2.1.0")
ROLE_EUICC: Final = x509.ObjectIdentifier("2.23.146.1.2.1.1")
ROLE_EUM: Final = x509.ObjectIdentifier("2.23.146.1.2.1.2")
ROLE_DP_TLS: Final = x509.ObjectIdentifier("2.23.146.1.2.1.3")
ROLE_DP_AUTH: Final = x509.ObjectIdentifier("2.23.146.1.2.1.4")
ROLE_DP_PB: Final = x509.ObjectIdentifier("2.23.146.1.2.1.5")

DEFAULT_EID: Final = "89049032123451234512345678901235"
DEFAULT_SMDP_HOST: Final = "smdp.example.test"
DEFAULT_SMDP_OID: Final = "2.999.10"  # under 2.999 (ITU-T example arc), never a real SM-DP+
_VALIDITY: Final = datetime.timedelta(days=365)


@dataclass(frozen=True)
class Issued:
    """A certificate and its private key."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    def cert_pem(self) -> bytes:
        """The certificate as PEM."""
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def cert_der(self) -> bytes:
        """The certificate as DER (what ES9+/ES10b carry)."""
        return self.cert.public_bytes(serialization.Encoding.DER)

    def key_pem(self) -> bytes:
        """The private key as unencrypted PKCS#8 PEM (test data only)."""
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def key_id(self) -> bytes:
        """The certificate's subjectKeyIdentifier."""
        ski = self.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
        return ski.value.digest


@dataclass(frozen=True)
class TestPki:
    """Every certificate of a download, plus where they were written."""

    __test__ = False  # not a pytest test class despite the name

    ci: Issued
    eum: Issued
    euicc: Issued
    dp_auth: Issued
    dp_pb: Issued
    dp_tls: Issued
    eid: str
    smdp_host: str
    smdp_oid: str
    directory: Path | None = None

    @property
    def ci_key_id(self) -> bytes:
        """The CI's key id: what euiccCiPKIdListForVerification/Signing name."""
        return self.ci.key_id()

    def write(self, directory: Path) -> TestPki:
        """Write `<name>.pem` (certificate) and `<name>.key.pem` for each role; returns self with directory."""
        directory.mkdir(parents=True, exist_ok=True)
        for name in ("ci", "eum", "euicc", "dp_auth", "dp_pb", "dp_tls"):
            issued: Issued = getattr(self, name)
            (directory / f"{name}.pem").write_bytes(issued.cert_pem())
            key_path = directory / f"{name}.key.pem"
            key_path.write_bytes(issued.key_pem())
            key_path.chmod(0o600)
        (directory / "dp_tls_chain.pem").write_bytes(self.dp_tls.cert_pem() + self.ci.cert_pem())
        return TestPki(**{**self.__dict__, "directory": directory})


def _name(common: str, org: str, serial: str | None = None) -> x509.Name:
    attrs = [
        x509.NameAttribute(NameOID.COUNTRY_NAME, "ES"),
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, org),
        x509.NameAttribute(NameOID.COMMON_NAME, common),
    ]
    if serial is not None:
        attrs.append(x509.NameAttribute(NameOID.SERIAL_NUMBER, serial))
    return x509.Name(attrs)


def _policy(role: x509.ObjectIdentifier) -> x509.CertificatePolicies:
    return x509.CertificatePolicies([x509.PolicyInformation(role, None)])


def _issue(
    subject: x509.Name,
    role: x509.ObjectIdentifier,
    issuer: Issued | None,
    *,
    ca: bool,
    path_length: int | None = None,
    key_usage: str = "sign",
    san: list[x509.GeneralName] | None = None,
    server_auth: bool = False,
    now: datetime.datetime,
) -> Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    signer_key = issuer.key if issuer else key
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.cert.subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + _VALIDITY)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(_policy(role), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=key_usage == "sign",
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=ca,
                crl_sign=ca,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    )
    if issuer is not None:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
                issuer.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
            ),
            critical=False,
        )
    if ca:
        builder = builder.add_extension(
            x509.BasicConstraints(ca=True, path_length=path_length), critical=True
        )
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    if server_auth:
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=True
        )
    return Issued(builder.sign(signer_key, hashes.SHA256()), key)


def generate(
    *,
    eid: str = DEFAULT_EID,
    smdp_host: str = DEFAULT_SMDP_HOST,
    smdp_oid: str = DEFAULT_SMDP_OID,
    now: datetime.datetime | None = None,
) -> TestPki:
    """A fresh PKI; now shifts validity (a clock-skew test issues certificates in the future)."""
    now = now or datetime.datetime.now(datetime.UTC)
    dp_id = x509.RegisteredID(x509.ObjectIdentifier(smdp_oid))
    ci = _issue(_name("Test CI", "esim-agent test PKI"), ROLE_CI, None, ca=True, now=now)
    eum = _issue(
        _name("Test EUM", "esim-agent test EUM"), ROLE_EUM, ci, ca=True, path_length=0, now=now
    )
    euicc = _issue(
        _name("Test eUICC", "esim-agent test EUM", serial=eid), ROLE_EUICC, eum, ca=False, now=now
    )
    dp_auth = _issue(
        _name("TEST SM-DP+ auth", "esim-agent test SM-DP+"),
        ROLE_DP_AUTH,
        ci,
        ca=False,
        san=[dp_id],
        now=now,
    )
    dp_pb = _issue(
        _name("TEST SM-DP+ PB", "esim-agent test SM-DP+"),
        ROLE_DP_PB,
        ci,
        ca=False,
        san=[dp_id],
        now=now,
    )
    tls_names: list[x509.GeneralName] = [x509.DNSName(smdp_host), dp_id]
    with contextlib.suppress(ValueError):
        tls_names.append(x509.IPAddress(ipaddress.ip_address(smdp_host)))
    dp_tls = _issue(
        _name(smdp_host, "esim-agent test SM-DP+"),
        ROLE_DP_TLS,
        ci,
        ca=False,
        san=tls_names,
        server_auth=True,
        now=now,
    )
    return TestPki(
        ci=ci,
        eum=eum,
        euicc=euicc,
        dp_auth=dp_auth,
        dp_pb=dp_pb,
        dp_tls=dp_tls,
        eid=eid,
        smdp_host=smdp_host,
        smdp_oid=smdp_oid,
    )
