"""ES9+ client (SGP.22 §5.6, §6.5): JSON over HTTPS to an SM-DP+, TLS always verified.

TLS trusts only the configured CI root certificates (SM-DP+ TLS certificates chain to a GSMA CI,
not to the web PKI). There is no switch to turn verification off: tests use a test CI.
Plain asyncio + ssl, one request per connection, a deadline on every await.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime
import json
import socket
import ssl
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import structlog

from agent.errors import AgentError, ConfigError

log = structlog.get_logger(__name__)

ADMIN_PROTOCOL: Final = "gsma/rsp/v2.2.0"
PATH_PREFIX: Final = "/gsma/rsp2/es9plus/"
USER_AGENT: Final = "esim-agent"
CONNECT_TIMEOUT_S: Final = 20.0
REQUEST_TIMEOUT_S: Final = 60.0  # one whole exchange; a BPP of a few hundred KB included
MAX_RESPONSE: Final = 2_000_000  # a bound profile package is well below this
MAX_HEADER: Final = 16_384

#: Opens a connected TCP socket to (address, port): how the daemon makes ES9+ traffic leave
#: through its active layer's link (interface, mark, source address). Called under a deadline.
Connector = Callable[[str, int], Awaitable[socket.socket]]


class Es9Error(AgentError):
    """ES9+ could not be completed (network, TLS, HTTP); smdp names the server."""

    def __init__(self, smdp: str, message: str) -> None:
        super().__init__(f"SM-DP+ {smdp}: {message}")
        self.smdp = smdp


class Es9Timeout(Es9Error, TimeoutError):
    """No connection or no answer in time."""


class Es9ClockError(Es9Error):
    """The SM-DP+ certificate is not yet valid by our clock: the clock is wrong."""


class Es9Refused(Es9Error):
    """The SM-DP+ answered with functionExecutionStatus Failed (subject/reason codes, §6.5.2)."""

    def __init__(
        self, smdp: str, function: str, subject: str, reason: str, message: str | None
    ) -> None:
        text = f"{function} refused: subject {subject}, reason {reason}"
        if message:
            text += f" ({message})"
        super().__init__(smdp, text)
        self.function = function
        self.subject = subject
        self.reason = reason
        self.detail = message


def b64(data: bytes) -> str:
    """Binary to the base64 text ES9+ carries."""
    return base64.b64encode(data).decode("ascii")


def unb64(smdp: str, body: dict[str, Any], name: str) -> bytes:
    """A base64 field of a response; Es9Error when missing or malformed."""
    value = body.get(name)
    if not isinstance(value, str):
        raise Es9Error(smdp, f"response lacks {name}")
    try:
        return base64.b64decode(value, validate=True)
    except ValueError as exc:
        raise Es9Error(smdp, f"{name} is not base64") from exc


@dataclass(frozen=True)
class Resolve:
    """`--resolve HOST:PORT:ADDR`: connect to ADDR for HOST:PORT, TLS still checks HOST."""

    host: str
    port: int
    address: str

    @classmethod
    def parse(cls, text: str) -> Resolve:
        """Parse HOST:PORT:ADDR (ADDR may be an IPv6 address in brackets or bare)."""
        host, sep, rest = text.partition(":")
        port_text, sep2, address = rest.partition(":")
        if not sep or not sep2 or not host or not address or not port_text.isdigit():
            raise ConfigError("--resolve", None, f"expected HOST:PORT:ADDR, got {text!r}")
        port = int(port_text)
        if not 0 < port < 65536:
            raise ConfigError("--resolve", None, f"bad port in {text!r}")
        return cls(host.lower(), port, address.strip("[]"))


def ssl_context(ci_certs: Sequence[Path]) -> ssl.SSLContext:
    """A client context trusting only the given CI roots (PEM files), hostname checked."""
    if not ci_certs:
        raise ConfigError("ci_certs", None, "no CI root certificate configured")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    for path in ci_certs:
        try:
            ctx.load_verify_locations(cafile=str(path))
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(str(path), None, f"cannot load CI certificate: {exc}") from exc
    return ctx


def _clock_problem(exc: ssl.SSLCertVerificationError) -> bool:
    # OpenSSL X509_V_ERR_CERT_NOT_YET_VALID (9): on a device that booted without a clock.
    return exc.verify_code == 9 or "not yet valid" in str(exc.verify_message)


class Es9Client:
    """ES9+ functions against one SM-DP+ address (host or host:port)."""

    def __init__(
        self,
        smdp_address: str,
        ci_certs: Sequence[Path],
        *,
        resolve: Sequence[Resolve] = (),
        timeout: float = REQUEST_TIMEOUT_S,
        connect_timeout: float = CONNECT_TIMEOUT_S,
        connect: Connector | None = None,
    ) -> None:
        self.smdp_address = smdp_address
        host, _, port = smdp_address.partition(":")
        self.host = host
        self.port = int(port) if port else 443
        self._ssl = ssl_context(ci_certs)
        self._resolve = {(r.host, r.port): r.address for r in resolve}
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self._connect = connect

    async def _open(self, address: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self._connect is None:
            return await asyncio.open_connection(
                address, self.port, ssl=self._ssl, server_hostname=self.host
            )
        sock = await self._connect(address, self.port)
        try:
            return await asyncio.open_connection(
                sock=sock, ssl=self._ssl, server_hostname=self.host
            )
        except BaseException:
            sock.close()
            raise

    async def call(self, function: str, body: dict[str, Any]) -> dict[str, Any] | None:
        """POST one ES9+ function; returns the JSON body (None for 204), raises on failure."""
        address = self._resolve.get((self.host.lower(), self.port), self.host)
        try:
            reader, writer = await asyncio.wait_for(self._open(address), self.connect_timeout)
        except ssl.SSLCertVerificationError as exc:
            if _clock_problem(exc):
                now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
                raise Es9ClockError(
                    self.smdp_address,
                    f"its TLS certificate is not valid yet at {now}: is this device's clock right?",
                ) from exc
            raise Es9Error(
                self.smdp_address, f"TLS certificate refused: {exc.verify_message}"
            ) from exc
        except TimeoutError as exc:
            raise Es9Timeout(
                self.smdp_address, f"no connection within {self.connect_timeout:.0f} s"
            ) from exc
        except (OSError, ssl.SSLError) as exc:
            raise Es9Error(self.smdp_address, f"cannot connect: {exc}") from exc
        try:
            return await asyncio.wait_for(
                self._exchange(reader, writer, function, body), self.timeout
            )
        except TimeoutError as exc:
            raise Es9Timeout(
                self.smdp_address, f"{function}: no answer within {self.timeout:.0f} s"
            ) from exc
        except (
            OSError,
            ssl.SSLError,
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
        ) as exc:
            raise Es9Error(self.smdp_address, f"{function}: connection failed: {exc}") from exc
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 2)

    async def _exchange(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        function: str,
        body: dict[str, Any],
    ) -> dict[str, Any] | None:
        payload = json.dumps(body, separators=(",", ":")).encode()
        host = self.host if self.port == 443 else f"{self.host}:{self.port}"
        head = (
            f"POST {PATH_PREFIX}{function} HTTP/1.1\r\n"
            f"Host: {host}\r\n"
            f"User-Agent: {USER_AGENT}\r\n"
            f"X-Admin-Protocol: {ADMIN_PROTOCOL}\r\n"
            "Content-Type: application/json;charset=UTF-8\r\n"
            "Accept: application/json\r\n"
            f"Content-Length: {len(payload)}\r\n"
            "Connection: close\r\n\r\n"
        )
        writer.write(head.encode() + payload)
        await writer.drain()
        raw_head = await reader.readuntil(b"\r\n\r\n")
        if len(raw_head) > MAX_HEADER:
            raise Es9Error(self.smdp_address, "response header too long")
        lines = raw_head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        if len(parts) < 2 or not parts[1].isdigit():
            raise Es9Error(self.smdp_address, f"not an HTTP response: {lines[0][:60]!r}")
        status = int(parts[1])
        headers = {
            k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in lines[1:] if h)
        }
        length_text = headers.get("content-length")
        if length_text is not None:
            if not length_text.isdigit() or int(length_text) > MAX_RESPONSE:
                raise Es9Error(self.smdp_address, f"bad Content-Length {length_text!r}")
            data = await reader.readexactly(int(length_text))
        else:
            data = await reader.read(MAX_RESPONSE + 1)
            if len(data) > MAX_RESPONSE:
                raise Es9Error(self.smdp_address, "response too large")
        if status == 204:
            return None
        if status != 200:
            raise Es9Error(
                self.smdp_address, f"{function}: HTTP {status} {' '.join(parts[2:])}".rstrip()
            )
        try:
            answer = json.loads(data)
        except ValueError as exc:
            raise Es9Error(self.smdp_address, f"{function}: response is not JSON") from exc
        if not isinstance(answer, dict):
            raise Es9Error(self.smdp_address, f"{function}: response is not a JSON object")
        self._check_status(function, answer)
        return answer

    def _check_status(self, function: str, answer: dict[str, Any]) -> None:
        header = answer.get("header")
        status = header.get("functionExecutionStatus") if isinstance(header, dict) else None
        if not isinstance(status, dict):
            raise Es9Error(self.smdp_address, f"{function}: response without a header status")
        if str(status.get("status", "")).startswith("Executed"):
            return
        data = status.get("statusCodeData")
        data = data if isinstance(data, dict) else {}
        message = data.get("message")
        raise Es9Refused(
            self.smdp_address,
            function,
            str(data.get("subjectCode", "?")),
            str(data.get("reasonCode", "?")),
            str(message) if message else None,
        )

    # -------------------------------------------------------------- the functions

    async def _required(self, function: str, body: dict[str, Any]) -> dict[str, Any]:
        answer = await self.call(function, body)
        if answer is None:
            raise Es9Error(self.smdp_address, f"{function}: empty response")
        return answer

    async def initiate_authentication(
        self, euicc_challenge: bytes, euicc_info1: bytes
    ) -> dict[str, Any]:
        """initiateAuthentication: returns transactionId and the four signed blobs (base64)."""
        return await self._required(
            "initiateAuthentication",
            {
                "euiccChallenge": b64(euicc_challenge),
                "euiccInfo1": b64(euicc_info1),
                "smdpAddress": self.smdp_address,
            },
        )

    async def authenticate_client(
        self, transaction_id: str, authenticate_server_response: bytes
    ) -> dict[str, Any]:
        """authenticateClient: profileMetadata, smdpSigned2, smdpSignature2, smdpCertificate."""
        return await self._required(
            "authenticateClient",
            {
                "transactionId": transaction_id,
                "authenticateServerResponse": b64(authenticate_server_response),
            },
        )

    async def get_bound_profile_package(
        self, transaction_id: str, prepare_download_response: bytes
    ) -> dict[str, Any]:
        """getBoundProfilePackage: boundProfilePackage."""
        return await self._required(
            "getBoundProfilePackage",
            {
                "transactionId": transaction_id,
                "prepareDownloadResponse": b64(prepare_download_response),
            },
        )

    async def handle_notification(self, pending_notification: bytes) -> None:
        """handleNotification (HTTP 204 expected)."""
        await self.call("handleNotification", {"pendingNotification": b64(pending_notification)})

    async def cancel_session(self, transaction_id: str, cancel_session_response: bytes) -> None:
        """cancelSession with the eUICC's signed CancelSessionResponse."""
        await self.call(
            "cancelSession",
            {
                "transactionId": transaction_id,
                "cancelSessionResponse": b64(cancel_session_response),
            },
        )
