"""Command intake: decode, validate and authorise a request, run the handler, build the response."""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec
import structlog

from agent.errors import AgentError, ConfigError, Es10Error
from agent.limits import MAX_JSON_DEPTH, too_deep
from agent.mqtt.payloads import (
    COMMANDS,
    MAX_COMMAND_BYTES,
    MAX_NICKNAME_BYTES,
    CommandResponse,
    ErrorBody,
    ProfileNicknameCommand,
)

log = structlog.get_logger(__name__)


# Codes decode_request (and the bridge's concurrency cap) answer before a request is known to be
# authorised and well-formed: such answers go only to the device's own fallback response topic.
INTAKE_CODES = frozenset(
    {
        "commands_disabled",
        "unknown_command",
        "command_not_allowed",
        "payload_too_large",
        "invalid_payload",
        "invalid_json",
        "unauthorized",
        "busy",
    }
)


def rejected_at_intake(response: CommandResponse) -> bool:
    """True when the response refuses a request that never passed intake."""
    return not response.ok and response.error is not None and response.error.code in INTAKE_CODES


class CommandRejected(AgentError):
    """A command refused with a stable error `code` (raised by intake or by the handler)."""

    def __init__(self, code: str, message: str = "") -> None:
        super().__init__(f"{code}: {message}" if message else code)
        self.code = code
        self.message = message


@dataclass(frozen=True, slots=True)
class CommandPolicy:
    """What remote callers may do: the master switch, the allowed commands and the credentials."""

    enabled: bool = False
    allowed: frozenset[str] = field(default_factory=lambda: frozenset(COMMANDS))
    token: str | None = None
    allowed_senders: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class CommandContext:
    """Where a request came from and how to answer it; handed to the handler for logging."""

    command: str
    topic: str
    response_topic: str
    correlation_data: bytes | None
    request_id: str | None
    sender: str | None


CommandHandler = Callable[[str, dict[str, Any], CommandContext], Awaitable[object]]


@dataclass(frozen=True, slots=True)
class Request:
    """A decoded, authorised request: the command name and its arguments without credentials."""

    command: str
    args: dict[str, Any]
    request_id: str | None
    sender: str | None


_CREDENTIAL_FIELDS = ("token", "sender", "request_id")
#: Arguments that are bearer tokens themselves (an activation code's matching ID): never logged.
_SECRET_ARGS = frozenset({"code", "confirmation_code"})


def loggable(args: dict[str, Any]) -> dict[str, Any]:
    """A request's arguments with secret ones masked, for the log."""
    return {k: ("***" if k in _SECRET_ARGS and v is not None else v) for k, v in args.items()}


def peek_request_id(payload: bytes) -> str | None:
    """Best-effort request_id from a payload that may fail validation, so errors can echo it."""
    if len(payload) > MAX_COMMAND_BYTES or too_deep(payload):
        return None
    try:
        obj = msgspec.json.decode(payload)
    except msgspec.DecodeError:
        return None
    if isinstance(obj, dict):
        rid = obj.get("request_id")
        if isinstance(rid, str) and len(rid) <= 128:
            return rid
    return None


def decode_request(command: str, payload: bytes, policy: CommandPolicy) -> Request:
    """Validate and authorise one request; raise CommandRejected with a stable code otherwise."""
    if not policy.enabled:
        raise CommandRejected("commands_disabled", "remote commands are disabled in the config")
    struct = COMMANDS.get(command)
    if struct is None:
        raise CommandRejected("unknown_command", f"no command named {command[:64]!r}")
    if command not in policy.allowed:
        raise CommandRejected("command_not_allowed", f"{command} is not allowed by the config")
    if len(payload) > MAX_COMMAND_BYTES:
        raise CommandRejected("payload_too_large", f"payload exceeds {MAX_COMMAND_BYTES} bytes")
    if too_deep(payload):
        raise CommandRejected("invalid_json", f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
    # An empty body is how a human types "no arguments" in mosquitto_pub.
    body = payload if payload.strip() else b"{}"
    try:
        decoded = msgspec.json.decode(body, type=struct)
    except msgspec.ValidationError as exc:
        raise CommandRejected("invalid_payload", str(exc)) from None
    except msgspec.DecodeError as exc:
        raise CommandRejected("invalid_json", str(exc)) from None
    if policy.token is not None and not _token_matches(decoded.token, policy.token):
        raise CommandRejected("unauthorized", "missing or wrong token")
    if policy.allowed_senders and decoded.sender not in policy.allowed_senders:
        raise CommandRejected("unauthorized", "sender is not allowed")
    if (
        isinstance(decoded, ProfileNicknameCommand)
        and len(decoded.nickname.encode("utf-8")) > MAX_NICKNAME_BYTES
    ):
        raise CommandRejected(
            "invalid_payload", f"nickname exceeds {MAX_NICKNAME_BYTES} UTF-8 bytes"
        )
    args = msgspec.to_builtins(decoded)
    for key in _CREDENTIAL_FIELDS:
        args.pop(key, None)
    return Request(command, args, decoded.request_id, decoded.sender)


def _token_matches(given: str | None, expected: str) -> bool:
    """Constant-time token comparison; a missing token never matches."""
    if given is None:
        return False
    return hmac.compare_digest(given.encode("utf-8"), expected.encode("utf-8"))


def error_code(exc: BaseException) -> ErrorBody:
    """Map an exception from intake or the handler onto the error body callers see."""
    if isinstance(exc, CommandRejected):
        return ErrorBody(code=exc.code, message=exc.message)
    if isinstance(exc, TimeoutError):
        return ErrorBody(code="timeout", message="the command did not finish in time")
    if isinstance(exc, Es10Error):
        return ErrorBody(code="euicc_error", message=str(exc))
    if isinstance(exc, ConfigError):
        return ErrorBody(code="not_allowed", message=str(exc))
    if isinstance(exc, AgentError):
        return ErrorBody(code="failed", message=str(exc))
    # Internals stay in the log: a remote caller learns only that it failed.
    return ErrorBody(code="internal_error", message="internal error")


async def execute(
    command: str,
    payload: bytes,
    ctx_base: CommandContext,
    *,
    policy: CommandPolicy,
    handler: CommandHandler | None,
    timeout: float,
) -> CommandResponse:
    """Run one request end to end and return its response; never raises except on cancellation."""
    request_id = peek_request_id(payload)
    try:
        request = decode_request(command, payload, policy)
        request_id = request.request_id
        ctx = CommandContext(
            command=command,
            topic=ctx_base.topic,
            response_topic=ctx_base.response_topic,
            correlation_data=ctx_base.correlation_data,
            request_id=request.request_id,
            sender=request.sender,
        )
        if handler is None:
            raise CommandRejected("not_supported", "no command handler is attached")
        log.info(
            "mqtt_command_received",
            command=command,
            sender=request.sender,
            args=loggable(request.args),
        )
        async with asyncio.timeout(timeout):
            result = await handler(command, request.args, ctx)
        response = CommandResponse(
            ok=True, command=command, request_id=request_id, result=msgspec.to_builtins(result)
        )
        log.info("mqtt_command_done", command=command, sender=request.sender)
        return response
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        body = error_code(exc)
        if body.code == "internal_error":
            log.exception("mqtt_command_crashed", command=command[:64])
        else:
            log.warning(
                "mqtt_command_rejected", command=command[:64], code=body.code, reason=body.message
            )
        known = command if command in COMMANDS else None
        return CommandResponse(ok=False, command=known, request_id=request_id, error=body)
