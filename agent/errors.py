"""One exception root for the agent; data lives in attributes, retryable errors are marked by type."""

from __future__ import annotations


class AgentError(Exception):
    """Root of every error the agent raises on purpose."""


class ParseError(AgentError, ValueError):
    """A modem reply, TLV or payload could not be understood; carries the offending text."""

    def __init__(self, message: str, text: str | bytes | None = None) -> None:
        super().__init__(message)
        self.text = text


class AtError(AgentError):
    """A command ended in a failure result (plain ERROR and friends)."""

    def __init__(self, message: str, command: str | None = None, final: str | None = None) -> None:
        super().__init__(message)
        self.command = command
        self.final = final


class AtTimeout(AtError, TimeoutError):
    """No final result code arrived in time; the channel resynchronises before the next command."""


class _CodedError(AtError):
    """A failure result carrying a numeric code, a text, or both."""

    prefix = "ERROR"

    def __init__(
        self,
        code: int | None,
        text: str | None,
        command: str | None = None,
        final: str | None = None,
    ) -> None:
        label = text if text else (str(code) if code is not None else "?")
        super().__init__(f"{self.prefix}: {label}", command, final)
        self.code = code
        self.text = text


class CmeError(_CodedError):
    """`+CME ERROR: <n|text>` (27.007 §9.2); code is None when the modem answered in text only."""

    prefix = "+CME ERROR"


class CmsError(_CodedError):
    """`+CMS ERROR: <n|text>` (27.005 §3.2.5)."""

    prefix = "+CMS ERROR"


class PortGoneError(AtError):
    """The serial port disappeared (USB unplug, pty closed) or could not be opened."""

    def __init__(self, port: str, reason: str) -> None:
        super().__init__(f"{port}: {reason}")
        self.port = port
        self.reason = reason


class PortBusyError(PortGoneError):
    """Another process holds the port's exclusive lock."""


class ApduError(AgentError):
    """A card answered an APDU with a status word that is not success."""

    def __init__(self, message: str, sw: int | None = None) -> None:
        super().__init__(message)
        self.sw = sw


class Es10Error(AgentError):
    """An ES10 function returned a non-zero result; reason is SGP.22's name for the code."""

    def __init__(self, function: str, code: int, reason: str) -> None:
        super().__init__(f"{function}: {reason} ({code})")
        self.function = function
        self.code = code
        self.reason = reason


class ConfigError(AgentError):
    """A configuration file is invalid; names the file, the key and the reason."""

    def __init__(self, file: str, key: str | None, reason: str) -> None:
        where = f"{file}: {key}" if key else file
        super().__init__(f"{where}: {reason}")
        self.file = file
        self.key = key
        self.reason = reason
