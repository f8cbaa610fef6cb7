"""The local profile assistant: ES10 functions over an ApduTransport, with the safety rules."""

from __future__ import annotations

import asyncio

import msgspec
import structlog

from agent.errors import AgentError, ApduError, CmeError, Es10Error, ParseError
from agent.euicc import es10
from agent.euicc.apdu import STORE_DATA_BLOCK, store_data
from agent.euicc.es10 import (
    EuiccInfo1,
    EuiccInfo2,
    NotificationMetadata,
    PendingNotification,
    ProfileInfo,
)
from agent.euicc.iccid import normalize_iccid
from agent.euicc.transport import ApduTransport

log = structlog.get_logger(__name__)

# How a card (or a modem in front of it) says "I will not tell you that".
_REFUSALS = (ApduError, ParseError, CmeError)

CAT_BUSY = 5
ES10_TIMEOUT_S = 60.0  # one whole ES10 function, all its APDUs included


class LpaSafetyError(AgentError):
    """An operation refused by our own rules before anything was sent to the card."""


class EuiccInfo(msgspec.Struct, kw_only=True):
    """`euicc info --json`: what the card refuses to tell is null."""

    eid: str | None = None
    svn: str | None = None
    firmware_version: str | None = None
    free_nvm: int | None = None
    free_vm: int | None = None
    profile_version: str | None = None
    euicc_ci_pki_ids: list[str] | None = None
    installed_applications: int | None = None
    globalplatform_version: str | None = None
    ts102241_version: str | None = None
    pp_version: str | None = None
    sas_accreditation_number: str | None = None


class Lpa:
    """ES10a/b/c client; use as `async with Lpa(transport) as lpa:` so the channel always closes."""

    def __init__(
        self,
        transport: ApduTransport,
        *,
        block_size: int = STORE_DATA_BLOCK,
        timeout: float = ES10_TIMEOUT_S,
        cat_busy_retry_s: float = 1.0,
    ) -> None:
        self.transport = transport
        self.block_size = block_size
        self.timeout = timeout
        self.cat_busy_retry_s = cat_busy_retry_s

    async def __aenter__(self) -> Lpa:
        await self.transport.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.transport.close()

    async def call(self, request: bytes) -> bytes:
        """Send one ES10 request and return the response TLV bytes."""
        async with asyncio.timeout(self.timeout):
            return await store_data(
                self.transport.transmit, request, self.transport.channel, self.block_size
            )

    # -------------------------------------------------------------- reads

    async def get_eid(self) -> str:
        """The EID (32 hex digits)."""
        return es10.decode_eid(await self.call(es10.get_eid_request()))

    async def get_euicc_info1(self) -> EuiccInfo1:
        """GetEUICCInfo1."""
        return es10.decode_euicc_info1(await self.call(es10.get_euicc_info1_request()))

    async def get_euicc_info2(self) -> EuiccInfo2:
        """GetEUICCInfo2."""
        return es10.decode_euicc_info2(await self.call(es10.get_euicc_info2_request()))

    async def info(self) -> EuiccInfo:
        """Everything `euicc info` shows; a function the card refuses leaves its fields null."""
        out = EuiccInfo()
        try:
            out.eid = await self.get_eid()
        except _REFUSALS as exc:
            log.info("euicc_info_field_refused", function="GetEuiccData", error=str(exc))
        try:
            info1 = await self.get_euicc_info1()
            out.svn = info1.svn
            out.euicc_ci_pki_ids = info1.ci_pki_ids_verification or None
        except _REFUSALS as exc:
            log.info("euicc_info_field_refused", function="GetEUICCInfo1", error=str(exc))
        try:
            info2 = await self.get_euicc_info2()
        except _REFUSALS as exc:
            log.info("euicc_info_field_refused", function="GetEUICCInfo2", error=str(exc))
        else:
            out.svn = info2.svn or out.svn
            out.firmware_version = info2.firmware_version
            out.free_nvm = info2.free_nvm
            out.free_vm = info2.free_vm
            out.profile_version = info2.profile_version
            out.euicc_ci_pki_ids = info2.ci_pki_ids_verification or out.euicc_ci_pki_ids
            out.installed_applications = info2.installed_applications
            out.globalplatform_version = info2.globalplatform_version
            out.ts102241_version = info2.ts102241_version
            out.pp_version = info2.pp_version
            out.sas_accreditation_number = info2.sas_accreditation_number
        return out

    async def list_profiles(self) -> list[ProfileInfo]:
        """Every installed profile."""
        return es10.decode_profiles_info(await self.call(es10.get_profiles_info_request()))

    async def get_profile(self, iccid: str) -> ProfileInfo | None:
        """One profile by ICCID, or None when it is not installed."""
        want = normalize_iccid(iccid)
        return next((p for p in await self.list_profiles() if p.iccid == want), None)

    async def enabled_profile(self) -> ProfileInfo | None:
        """The enabled profile, if any."""
        return next((p for p in await self.list_profiles() if p.state == "enabled"), None)

    # -------------------------------------------------------------- profile management

    async def _managed(self, function: str, request: bytes) -> None:
        """Run a result-code function; catBusy gets one retry once the modem settles."""
        code = es10.decode_result(function, await self.call(request))
        if code == CAT_BUSY:
            log.info("euicc_cat_busy_retry", function=function, delay_s=self.cat_busy_retry_s)
            await asyncio.sleep(self.cat_busy_retry_s)
            code = es10.decode_result(function, await self.call(request))
        es10.check_result(function, code)

    async def enable_profile(self, iccid: str, *, refresh: bool = True) -> bool:
        """Enable a profile; returns False when it already was enabled (nothing sent changed)."""
        want = normalize_iccid(iccid)
        try:
            await self._managed("EnableProfile", es10.enable_profile_request(want, refresh=refresh))
        except Es10Error as exc:
            if exc.code == 2:
                current = await self.get_profile(want)
                if current is not None and current.state == "enabled":
                    log.info("euicc_profile_already_enabled", iccid=want)
                    return False
            raise
        log.info("euicc_profile_enabled", iccid=want, refresh=refresh)
        return True

    async def disable_profile(self, iccid: str, *, refresh: bool = True) -> None:
        """Disable a profile; the modem then has no profile to register with until one is enabled."""
        want = normalize_iccid(iccid)
        await self._managed("DisableProfile", es10.disable_profile_request(want, refresh=refresh))
        log.info("euicc_profile_disabled", iccid=want)

    async def delete_profile(self, iccid: str) -> None:
        """Delete a disabled profile; refuses the enabled one before asking the card."""
        want = normalize_iccid(iccid)
        target = await self.get_profile(want)
        if target is not None and target.state == "enabled":
            raise LpaSafetyError(f"{want} is the enabled profile: enable another one first")
        await self._managed("DeleteProfile", es10.delete_profile_request(want))
        log.info("euicc_profile_deleted", iccid=want)

    async def set_nickname(self, iccid: str, nickname: str) -> None:
        """Set (or with "" clear) a profile's nickname."""
        want = normalize_iccid(iccid)
        await self._managed("SetNickname", es10.set_nickname_request(want, nickname))
        log.info("euicc_nickname_set", iccid=want)

    # -------------------------------------------------------------- notifications

    async def list_notifications(self, operation: str | None = None) -> list[NotificationMetadata]:
        """Queued notifications (metadata only)."""
        return es10.decode_list_notification(
            await self.call(es10.list_notification_request(operation))
        )

    async def retrieve_notifications(
        self, seq_number: int | None = None
    ) -> list[PendingNotification]:
        """Signed notifications ready for the SM-DP+; kept on the card until removed."""
        return es10.decode_retrieve_notifications(
            await self.call(es10.retrieve_notifications_request(seq_number))
        )

    async def remove_notification(self, seq_number: int) -> None:
        """NotificationSent: remove a notification once the SM-DP+ has acknowledged it."""
        await self._managed("NotificationSent", es10.notification_sent_request(seq_number))
        log.info("euicc_notification_removed", seq_number=seq_number)
