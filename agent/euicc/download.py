"""Profile download (SGP.22 §3.1.3): the LPA between the eUICC (ES10b) and the SM-DP+ (ES9+).

GetEUICCChallenge + Info1 -> initiateAuthentication -> AuthenticateServer -> authenticateClient
-> PrepareDownload -> getBoundProfilePackage -> LoadBoundProfilePackage (segments) ->
handleNotification -> NotificationSent. Once the eUICC holds a session, every failure path
(errors, timeouts, task cancellation when a link drops) cancels it on the card and, with the
card's signed answer, on the SM-DP+; the card installs a profile only after its last segment,
so nothing half-installed is left.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterator
from enum import StrEnum
from typing import Any, Final, Protocol

import msgspec
import structlog

from agent.errors import AgentError, ApduError, Es10Error, ParseError
from agent.euicc import es10, es10b, tlv
from agent.euicc.activation import ActivationCode
from agent.euicc.apdu import store_data
from agent.euicc.es9 import Es9Error, Es9Refused, unb64
from agent.euicc.es10b import CancelSessionReason
from agent.euicc.iccid import decode_iccid
from agent.euicc.lpa import Lpa

log = structlog.get_logger(__name__)

BPP_APDU_TIMEOUT_S: Final = 240.0  # one STORE DATA of a BPP segment: real modems need minutes
BPP_SEGMENT_TIMEOUT_S: Final = 600.0
CANCEL_TIMEOUT_S: Final = 60.0
DEFAULT_TAC: Final = bytes.fromhex("35290611")  # TAC sent in DeviceInfo when the modem's is unknown


def tac_from_imei(imei: str | None) -> bytes | None:
    """DeviceInfo's tac: the IMEI's 8-digit Type Allocation Code as 4 BCD bytes, or None."""
    if imei is None or len(imei) < 8 or not imei[:8].isdigit():
        return None
    return bytes.fromhex(imei[:8])


class Phase(StrEnum):
    """Download phases, as progress reports and errors name them."""

    AUTHENTICATE = "authenticate"
    PREPARE = "prepare"
    DOWNLOAD = "download"
    INSTALL = "install"
    NOTIFY = "notify"
    DONE = "done"


Progress = Callable[[Phase, int, int], None]  # phase, bytes done, bytes total (0 if unknown)


class DownloadError(AgentError):
    """A download failed; phase says where, cancelled whether both sides' sessions were closed."""

    def __init__(self, phase: Phase, message: str) -> None:
        super().__init__(f"{phase.value}: {message}")
        self.phase = phase
        self.message = message
        self.cancelled = False


class Es9Functions(Protocol):
    """What the download needs of an SM-DP+ (agent.euicc.es9.Es9Client implements it)."""

    smdp_address: str

    async def initiate_authentication(
        self, euicc_challenge: bytes, euicc_info1: bytes
    ) -> dict[str, Any]:
        """initiateAuthentication."""
        ...

    async def authenticate_client(
        self, transaction_id: str, authenticate_server_response: bytes
    ) -> dict[str, Any]:
        """authenticateClient."""
        ...

    async def get_bound_profile_package(
        self, transaction_id: str, prepare_download_response: bytes
    ) -> dict[str, Any]:
        """getBoundProfilePackage."""
        ...

    async def handle_notification(self, pending_notification: bytes) -> None:
        """handleNotification."""
        ...

    async def cancel_session(self, transaction_id: str, cancel_session_response: bytes) -> None:
        """cancelSession."""
        ...


class DownloadResult(msgspec.Struct, kw_only=True):
    """`profile download --json`."""

    iccid: str | None
    isdp_aid: str | None
    profile_name: str | None = None
    service_provider_name: str | None = None
    profile_class: str | None = None
    smdp_address: str
    transaction_id: str
    bpp_bytes: int
    notification_sent: bool


def _metadata(raw: bytes) -> dict[str, str | None]:
    """The listing fields of a StoreMetadataRequest (profileMetadata from authenticateClient)."""
    out: dict[str, str | None] = {}
    try:
        kids = tlv.decode_all(raw)[0].children()
    except (ParseError, IndexError):
        return out
    for item in kids:
        if item.tag == 0x5A:
            out["iccid"] = decode_iccid(item.value)
        elif item.tag == 0x91:
            out["service_provider_name"] = item.value.decode("utf-8", "replace")
        elif item.tag == 0x92:
            out["profile_name"] = item.value.decode("utf-8", "replace")
        elif item.tag == 0x95 and item.value:
            idx = item.value[-1]
            out["profile_class"] = es10.PROFILE_CLASSES[idx] if idx < 3 else None
    return out


@contextlib.contextmanager
def _long_apdu_deadline(lpa: Lpa, seconds: float) -> Iterator[None]:
    """Raise the transport's per-APDU deadline (AT+CGLA can take minutes during a BPP load)."""
    transport: Any = lpa.transport
    before = getattr(transport, "apdu_timeout", None)
    if before is not None:
        transport.apdu_timeout = max(before, seconds)
    try:
        yield
    finally:
        if before is not None:
            transport.apdu_timeout = before


class Downloader:
    """One download: `await Downloader(lpa, es9, code).run()`."""

    def __init__(
        self,
        lpa: Lpa,
        es9: Es9Functions,
        code: ActivationCode,
        *,
        confirmation_code: str | None = None,
        tac: bytes = DEFAULT_TAC,
        imei: bytes | None = None,
        progress: Progress | None = None,
        bpp_apdu_timeout: float = BPP_APDU_TIMEOUT_S,
    ) -> None:
        self.lpa = lpa
        self.es9 = es9
        self.code = code
        self.confirmation_code = confirmation_code
        self.tac = tac
        self.imei = imei
        self.progress = progress or (lambda _p, _d, _t: None)
        self.bpp_apdu_timeout = bpp_apdu_timeout
        self.transaction_id: str | None = None
        self._card_session = False  # the eUICC holds a session that CancelSession must end
        #: Set on a failure: whether CancelSession closed the session on the card and SM-DP+.
        self.session_cancelled = False
        #: (transactionId, the card's signed CancelSessionResponse) when the card's session was
        #: cancelled but the SM-DP+ could not be told (its link was gone): send it later.
        self.unsent_cancel: tuple[str, bytes] | None = None

    async def run(self) -> DownloadResult:
        """Download and install; raises DownloadError (sessions cancelled) or Es9Error/Es10Error."""
        phase = Phase.AUTHENTICATE
        try:
            self.progress(phase, 0, 0)
            tid = await self._authenticate()
            phase = Phase.PREPARE
            self.progress(phase, 0, 0)
            metadata, prepared = await self._prepare(tid)
            phase = Phase.DOWNLOAD
            self.progress(phase, 0, 0)
            answer = await self.es9.get_bound_profile_package(tid, prepared)
            bpp = unb64(self.es9.smdp_address, answer, "boundProfilePackage")
            phase = Phase.INSTALL
            result = await self._load(bpp)
        except BaseException as exc:
            cancelled = await self._cancel(phase, exc) if self._card_session else False
            self.session_cancelled = cancelled
            if isinstance(exc, DownloadError):
                exc.cancelled = cancelled
            elif isinstance(exc, (Es10Error, ApduError, ParseError)):
                wrapped = DownloadError(phase, str(exc))
                wrapped.cancelled = cancelled
                raise wrapped from exc
            raise
        phase = Phase.NOTIFY
        self.progress(phase, len(bpp), len(bpp))
        sent = await self._notify(result)
        if not result.success:
            raise DownloadError(
                Phase.INSTALL,
                f"the eUICC refused the profile: {result.error_reason} in {result.bpp_command}",
            )
        self.progress(Phase.DONE, len(bpp), len(bpp))
        return DownloadResult(
            iccid=result.iccid or metadata.get("iccid"),
            isdp_aid=result.isdp_aid,
            profile_name=metadata.get("profile_name"),
            service_provider_name=metadata.get("service_provider_name"),
            profile_class=metadata.get("profile_class"),
            smdp_address=self.es9.smdp_address,
            transaction_id=tid,
            bpp_bytes=len(bpp),
            notification_sent=sent,
        )

    async def _authenticate(self) -> str:
        challenge = es10b.decode_euicc_challenge(
            await self.lpa.call(es10b.get_euicc_challenge_request())
        )
        info1 = await self.lpa.call(es10.get_euicc_info1_request())
        es10.decode_euicc_info1(info1)  # well-formed before it goes to the server
        init = await self.es9.initiate_authentication(challenge, info1)
        smdp = self.es9.smdp_address
        tid = str(init.get("transactionId", ""))
        signed1 = unb64(smdp, init, "serverSigned1")
        if es10b.signed1_transaction_id(signed1).hex().upper() != tid.upper():
            raise DownloadError(Phase.AUTHENTICATE, "transactionId differs from serverSigned1")
        self.transaction_id = tid
        request = es10b.authenticate_server_request(
            signed1,
            unb64(smdp, init, "serverSignature1"),
            unb64(smdp, init, "euiccCiPKIdToBeUsed"),
            unb64(smdp, init, "serverCertificate"),
            matching_id=self.code.matching_id,
            device_info_content=es10b.device_info(self.tac, self.imei),
        )
        raw = await self.lpa.call(request)
        try:
            response = es10b.check_authenticate_server(raw)
        except Es10Error:
            # The SM-DP+ learns of the refusal from the eUICC's own error answer.
            with contextlib.suppress(Es9Error):
                await self.es9.authenticate_client(tid, raw)
            raise
        self._card_session = True
        self._auth_response = response
        return tid

    async def _prepare(self, tid: str) -> tuple[dict[str, str | None], bytes]:
        smdp = self.es9.smdp_address
        auth = await self.es9.authenticate_client(tid, self._auth_response)
        metadata = _metadata(unb64(smdp, auth, "profileMetadata"))
        signed2 = unb64(smdp, auth, "smdpSigned2")
        tid2, cc_required = es10b.smdp_signed2_fields(signed2)
        if tid2.hex().upper() != tid.upper():
            raise DownloadError(Phase.PREPARE, "transactionId differs from smdpSigned2")
        hash_cc = None
        if cc_required:
            if not self.confirmation_code:
                raise DownloadError(Phase.PREPARE, "the SM-DP+ requires a confirmation code")
            hash_cc = es10b.confirmation_code_hash(self.confirmation_code, tid2)
        request = es10b.prepare_download_request(
            signed2,
            unb64(smdp, auth, "smdpSignature2"),
            unb64(smdp, auth, "smdpCertificate"),
            hash_cc,
        )
        prepared = es10b.check_prepare_download(await self.lpa.call(request))
        return metadata, prepared

    async def _segment(self, segment: bytes) -> bytes:
        async with asyncio.timeout(BPP_SEGMENT_TIMEOUT_S):
            transport = self.lpa.transport
            return await store_data(
                transport.transmit, segment, transport.channel, self.lpa.block_size
            )

    async def _load(self, bpp: bytes) -> es10b.InstallResult:
        try:
            segments = es10b.bpp_segments(bpp)
        except ParseError as exc:
            raise DownloadError(Phase.INSTALL, f"malformed bound profile package: {exc}") from exc
        done = 0
        self.progress(Phase.INSTALL, 0, len(bpp))
        with _long_apdu_deadline(self.lpa, self.bpp_apdu_timeout):
            for n, segment in enumerate(segments):
                answer = await self._segment(segment)
                done += len(segment)
                self.progress(Phase.INSTALL, done, len(bpp))
                if answer:
                    # A ProfileInstallationResult ends the card's session, success or not.
                    self._card_session = False
                    result = es10b.decode_profile_installation_result(answer)
                    if result.success and n != len(segments) - 1:
                        raise DownloadError(Phase.INSTALL, "eUICC finished before the last segment")
                    return result
        raise DownloadError(Phase.INSTALL, "eUICC gave no ProfileInstallationResult")

    async def _notify(self, result: es10b.InstallResult) -> bool:
        """handleNotification, then NotificationSent; a failure leaves it pending for later."""
        try:
            await self.es9.handle_notification(bytes.fromhex(result.raw))
        except Es9Error as exc:
            log.warning("download_notification_pending", seq=result.seq_number, error=str(exc))
            return False
        try:
            await self.lpa.remove_notification(result.seq_number)
        except (Es10Error, ApduError, ParseError, TimeoutError) as exc:
            log.warning("download_notification_not_removed", seq=result.seq_number, error=str(exc))
        return True

    async def _cancel(self, phase: Phase, exc: BaseException) -> bool:
        """CancelSession on the card, then on the SM-DP+ with the card's signed answer."""
        tid = self.transaction_id
        if tid is None:
            return False
        if isinstance(exc, asyncio.CancelledError | TimeoutError):
            reason = CancelSessionReason.TIMEOUT
        elif phase is Phase.INSTALL:
            reason = CancelSessionReason.LOAD_BPP_EXECUTION_ERROR
        elif isinstance(exc, DownloadError) and "confirmation code" in exc.message:
            reason = CancelSessionReason.POSTPONED
        else:
            reason = CancelSessionReason.UNDEFINED
        log.info("download_cancel", phase=phase.value, reason=reason.name, error=str(exc))
        self._card_session = False

        async def both() -> None:
            raw = await self.lpa.call(es10b.cancel_session_request(bytes.fromhex(tid), reason))
            signed = es10b.check_cancel_session(raw)
            self.unsent_cancel = (tid, signed)
            try:
                await self.es9.cancel_session(tid, signed)
            except Es9Refused:
                self.unsent_cancel = None  # it was heard: a refusal is not worth a retry
                raise
            self.unsent_cancel = None

        # Shielded: a download cancelled because its link dropped must still close the sessions.
        task = asyncio.ensure_future(asyncio.wait_for(both(), CANCEL_TIMEOUT_S))
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(task, CANCEL_TIMEOUT_S)
            return task.done() and not task.cancelled() and task.exception() is None
        except (AgentError, TimeoutError) as cancel_exc:
            log.warning("download_cancel_failed", error=str(cancel_exc))
            return False
        return True
