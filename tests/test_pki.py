"""The test PKI: chains verify, roles and names are where SGP.22 puts them, TLS works with it."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.x509.oid import NameOID

from hw_fixtures import pki
from hw_fixtures.pki import TestPki


def _role(cert: x509.Certificate) -> x509.ObjectIdentifier:
    policies = cert.extensions.get_extension_for_class(x509.CertificatePolicies).value
    role: x509.ObjectIdentifier = policies[0].policy_identifier
    return role


def test_chains_and_roles(test_pki: TestPki) -> None:
    chain = [
        (test_pki.ci, test_pki.ci, pki.ROLE_CI),
        (test_pki.eum, test_pki.ci, pki.ROLE_EUM),
        (test_pki.euicc, test_pki.eum, pki.ROLE_EUICC),
        (test_pki.dp_auth, test_pki.ci, pki.ROLE_DP_AUTH),
        (test_pki.dp_pb, test_pki.ci, pki.ROLE_DP_PB),
        (test_pki.dp_tls, test_pki.ci, pki.ROLE_DP_TLS),
    ]
    for issued, issuer, role in chain:
        issued.cert.verify_directly_issued_by(issuer.cert)
        assert _role(issued.cert) == role
        assert issued.cert.public_key().curve.name == "secp256r1"  # type: ignore[union-attr]
    serial = test_pki.euicc.cert.subject.get_attributes_for_oid(NameOID.SERIAL_NUMBER)
    assert serial[0].value == test_pki.eid
    assert len(test_pki.ci_key_id) == 20


def test_written_files(test_pki: TestPki) -> None:
    assert test_pki.directory is not None
    names = sorted(p.name for p in test_pki.directory.iterdir())
    assert "ci.pem" in names
    assert "dp_auth.key.pem" in names
    assert (test_pki.directory / "euicc.key.pem").stat().st_mode & 0o077 == 0


async def test_tls_certificate_verifies_against_the_ci(test_pki: TestPki) -> None:
    directory = test_pki.directory
    assert isinstance(directory, Path)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(directory / "dp_tls_chain.pem", directory / "dp_tls.key.pem")

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"ok")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=server_ctx)
    port = server.sockets[0].getsockname()[1]
    client_ctx = ssl.create_default_context(cafile=str(directory / "ci.pem"))
    async with server:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(
                "127.0.0.1", port, ssl=client_ctx, server_hostname=test_pki.smdp_host
            ),
            10,
        )
        assert await asyncio.wait_for(reader.read(), 10) == b"ok"
        writer.close()
