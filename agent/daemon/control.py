"""Local control socket: JSON lines over a Unix stream socket, one reply per request.

Request:  {"id": 1, "cmd": "status", "args": {}}
Reply:    {"id": 1, "ok": true, "result": ...}
          {"id": 1, "ok": false, "error": {"type": "Es10Error", "message": "..."}}

A long command (a profile download) may send interim lines before its reply, each
`{"id": 1, "progress": {...}}` (no "ok"); `control_call(..., on_progress=)` hands them over.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import itertools
import os
import resource
import socket
import stat
import struct
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import msgspec
import structlog

from agent.errors import AgentError
from agent.limits import MAX_JSON_DEPTH, json_depth

log = structlog.get_logger(__name__)

Args = dict[str, Any]
Handler = Callable[[str, Args], Awaitable[object]]
CommandFn = Callable[[Args], Awaitable[object]]

MAX_LINE_BYTES = 64 * 1024
MAX_CONNECTIONS = 64
# Descriptors kept free for everything else (modem ports, probes, MQTT, SQLite, hooks): the
# connection cap never lets control clients take the daemon's last descriptors.
RESERVED_FDS = 256
IDLE_TIMEOUT_S = 30.0  # between requests, and for the rest of a half-sent one
SOCKET_MODE = 0o660
DEFAULT_CALL_TIMEOUT_S = 10.0
# Probing a leftover socket: a live daemon accepts within milliseconds.
STALE_PROBE_TIMEOUT_S = 1.0
WRITE_TIMEOUT_S = 5.0
CLOSE_TIMEOUT_S = 5.0


class ControlError(AgentError):
    """A control request failed; error_type is the daemon's error class name (or ours)."""

    def __init__(self, message: str, error_type: str | None = None) -> None:
        super().__init__(message)
        self.error_type = error_type or type(self).__name__
        self.message = message


class DaemonNotRunning(ControlError):
    """Nothing listens on the control socket."""


class DaemonAlreadyRunning(ControlError):
    """Another daemon answers on the control socket we were asked to bind."""


class ControlTimeout(ControlError, TimeoutError):
    """The daemon did not answer in time."""


class BadRequest(ControlError):
    """The request line was not a JSON object with a string `cmd` and an object `args`."""


class UnknownCommand(ControlError):
    """The handler does not know this command; raise it from handlers."""


class PermissionDenied(ControlError):
    """The peer is neither root nor the daemon's user or group."""


class Busy(ControlError):
    """Too many control connections are open."""


class RequestArgs(dict[str, Any]):
    """A request's args: a missing one is a BadRequest naming it, not a bare KeyError."""

    def __missing__(self, key: str) -> Any:
        raise BadRequest(f"missing argument {key!r}")


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a Unix socket (SO_PEERCRED)."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return pid, uid, gid


def _supplementary_groups(pid: int) -> set[int]:
    """The peer's supplementary groups from /proc (best effort: empty when it is gone)."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("Groups:"):
                    return {int(g) for g in line.split()[1:] if g.isdigit()}
    except OSError:
        pass
    return set()


def default_max_connections() -> int:
    """MAX_CONNECTIONS, fewer when the descriptor limit leaves less than RESERVED_FDS spare."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return MAX_CONNECTIONS
    return max(4, min(MAX_CONNECTIONS, (soft - RESERVED_FDS) // 2))


class _Request(msgspec.Struct, forbid_unknown_fields=False):
    cmd: str
    id: int | str | None = None
    args: Args = msgspec.field(default_factory=dict)


class _ErrorBody(msgspec.Struct):
    type: str
    message: str


class _Reply(msgspec.Struct, omit_defaults=True):
    id: int | str | None
    ok: bool
    result: Any = None
    error: _ErrorBody | None = None


_encoder = msgspec.json.Encoder()

ProgressSink = Callable[[object], None]
_progress_sink: contextvars.ContextVar[ProgressSink | None] = contextvars.ContextVar(
    "control_progress_sink", default=None
)


def progress_sink() -> ProgressSink | None:
    """Inside a control request's handler: send an interim `progress` line to the caller
    (JSON-able data; never blocks). None outside a control request."""
    return _progress_sink.get()


def encode_progress(request_id: int | str | None, data: object) -> bytes:
    """One interim progress line."""
    return _encoder.encode({"id": request_id, "progress": data}) + b"\n"


def encode_error(request_id: int | str | None, exc_type: str, message: str) -> bytes:
    """One error reply line."""
    reply = _Reply(id=request_id, ok=False, error=_ErrorBody(type=exc_type, message=message))
    return _encoder.encode(reply) + b"\n"


def encode_result(request_id: int | str | None, result: object) -> bytes:
    """One success reply line; raises msgspec.EncodeError/TypeError if result is not JSON-able."""
    return _encoder.encode(_Reply(id=request_id, ok=True, result=result)) + b"\n"


def parse_request(line: bytes) -> tuple[int | str | None, str, Args]:
    """Decode one request line into (id, cmd, args); raise BadRequest with the id when known."""
    if json_depth(line) > MAX_JSON_DEPTH:
        raise BadRequest(f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
    try:
        request = msgspec.json.decode(line, type=_Request)
    except msgspec.ValidationError as exc:
        raise BadRequest(f"invalid request: {exc}") from None
    except msgspec.DecodeError as exc:
        raise BadRequest(f"malformed JSON: {exc}") from None
    if not request.cmd:
        raise BadRequest("empty cmd")
    return request.id, request.cmd, RequestArgs(request.args)


def _salvage_id(line: bytes) -> int | str | None:
    # Echo the caller's id even on a bad request when the line is at least a JSON object.
    if json_depth(line) > MAX_JSON_DEPTH:
        return None
    try:
        raw = msgspec.json.decode(line)
    except msgspec.DecodeError:
        return None
    if isinstance(raw, dict):
        value = raw.get("id")
        if isinstance(value, int | str) and not isinstance(value, bool):
            return value
    return None


class CommandTable:
    """A handler that dispatches by command name; unknown names raise UnknownCommand."""

    def __init__(self, commands: Mapping[str, CommandFn] | None = None) -> None:
        self._commands: dict[str, CommandFn] = dict(commands or {})

    def register(self, name: str, fn: CommandFn) -> None:
        """Add or replace a command."""
        self._commands[name] = fn

    @property
    def names(self) -> list[str]:
        """Known command names, sorted."""
        return sorted(self._commands)

    async def __call__(self, cmd: str, args: Args) -> object:
        """Run the command or raise UnknownCommand."""
        fn = self._commands.get(cmd)
        if fn is None:
            raise UnknownCommand(f"unknown command {cmd!r}; known: {', '.join(self.names)}")
        return await fn(args)


def _replace_stale_socket(path: str) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ControlError(f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(STALE_PROBE_TIMEOUT_S)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        log.info("control_socket_stale_replaced", path=path)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        return
    except OSError as exc:
        raise ControlError(f"{path}: cannot probe existing socket: {exc}") from exc
    finally:
        probe.close()
    raise DaemonAlreadyRunning(f"another daemon is listening on {path}")


class ControlServer:
    """Serves handler(cmd, args) on a Unix socket; start() binds, close() unbinds."""

    def __init__(
        self,
        path: str,
        handler: Handler,
        *,
        mode: int = SOCKET_MODE,
        max_line: int = MAX_LINE_BYTES,
        handler_timeout: float | None = None,
        max_connections: int | None = None,
        idle_timeout: float = IDLE_TIMEOUT_S,
        allowed_uids: frozenset[int] | None = None,
        allowed_gids: frozenset[int] | None = None,
    ) -> None:
        self.path = path
        self._handler = handler
        self._mode = mode
        self._max_line = max_line
        self._handler_timeout = handler_timeout
        self._max_connections = max_connections or default_max_connections()
        self._idle_timeout = idle_timeout
        # Root, the daemon's own user (the service user under systemd) and its group.
        self._uids = allowed_uids if allowed_uids is not None else frozenset({0, os.geteuid()})
        self._gids = allowed_gids if allowed_gids is not None else frozenset({os.getegid()})
        self._refused = 0
        self._server: asyncio.Server | None = None
        self._inode: tuple[int, int] | None = None
        self._connections: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """Bind the socket (replacing a stale one) with the configured mode and start serving."""
        # Outside systemd (no RuntimeDirectory=) the default /run/esim-agent may not exist yet.
        with contextlib.suppress(OSError):
            os.makedirs(os.path.dirname(self.path) or ".", mode=0o750, exist_ok=True)
        _replace_stale_socket(self.path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        # Bind under a tight umask so the socket is never reachable with wider rights.
        old_umask = os.umask(0o777 & ~self._mode)
        try:
            sock.bind(self.path)
        except OSError as exc:
            sock.close()
            raise ControlError(f"cannot bind control socket {self.path}: {exc}") from exc
        finally:
            os.umask(old_umask)
        os.chmod(self.path, self._mode)
        st = os.stat(self.path)
        self._inode = (st.st_dev, st.st_ino)
        self._server = await asyncio.start_unix_server(self._serve, sock=sock, limit=self._max_line)
        log.info("control_socket_listening", path=self.path, mode=oct(self._mode))

    async def close(self) -> None:
        """Stop accepting, drop open connections and remove our socket file."""
        if self._server is None:
            return
        self._server.close()
        for task in list(self._connections):
            task.cancel()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(CLOSE_TIMEOUT_S):
                await asyncio.gather(*self._connections, return_exceptions=True)
                await self._server.wait_closed()
        self._server = None
        try:
            st = os.stat(self.path)
            # A newer daemon may have taken the path over; only remove the file we created.
            if (st.st_dev, st.st_ino) == self._inode:
                os.unlink(self.path)
        except FileNotFoundError:
            pass
        log.info("control_socket_closed", path=self.path)

    async def __aenter__(self) -> ControlServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _allowed(self, writer: asyncio.StreamWriter) -> bool:
        sock = writer.get_extra_info("socket")
        if sock is None:
            return False
        try:
            pid, uid, gid = peer_credentials(sock)
        except OSError:
            return False
        if uid in self._uids or gid in self._gids:
            return True
        if self._gids & _supplementary_groups(pid):
            return True
        log.warning("control_peer_refused", pid=pid, uid=uid, gid=gid)
        return False

    async def _refuse(self, writer: asyncio.StreamWriter, error: ControlError) -> None:
        """Answer one error line (never waiting long) and hang up."""
        with contextlib.suppress(ConnectionError, TimeoutError, RuntimeError):
            writer.write(encode_error(None, error.error_type, error.message))
            async with asyncio.timeout(1.0):
                await writer.drain()
        writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        if len(self._connections) >= self._max_connections:
            # Hang up at once so an open-connection flood holds no descriptors of ours; one
            # warning per burst, not one per connection.
            if self._refused == 0:
                log.warning("control_connections_capped", limit=self._max_connections)
            self._refused += 1
            await self._refuse(writer, Busy(f"more than {self._max_connections} connections"))
            return
        if self._refused:
            log.info("control_connections_refused", count=self._refused)
            self._refused = 0
        if not self._allowed(writer):
            await self._refuse(writer, PermissionDenied("not root, nor the daemon's user or group"))
            return
        self._connections.add(task)
        try:
            while True:
                try:
                    async with asyncio.timeout(self._idle_timeout):
                        line = await reader.readuntil(b"\n")
                except TimeoutError:
                    log.debug("control_connection_idle", timeout=self._idle_timeout)
                    return
                except asyncio.IncompleteReadError as exc:
                    if exc.partial.strip():
                        await self._write(writer, await self._answer(exc.partial, writer))
                    return
                except asyncio.LimitOverrunError:
                    # The rest of the line is still unread; there is no safe place to resume.
                    await self._write(
                        writer,
                        encode_error(None, "LineTooLong", f"request over {self._max_line} bytes"),
                    )
                    return
                if line.strip():
                    await self._write(writer, await self._answer(line, writer))
        except (ConnectionError, TimeoutError) as exc:
            log.debug("control_connection_dropped", error=repr(exc))
        except asyncio.CancelledError:
            # close() cancels open connections. Python 3.11's stream callback calls
            # task.exception() on the finished handler, which raises for a cancelled task
            # and prints a traceback at every shutdown: end normally instead.
            return
        finally:
            self._connections.discard(task)
            writer.close()

    @property
    def connections(self) -> int:
        """Control connections open now."""
        return len(self._connections)

    async def _write(self, writer: asyncio.StreamWriter, data: bytes) -> None:
        writer.write(data)
        async with asyncio.timeout(WRITE_TIMEOUT_S):
            await writer.drain()

    async def _answer(self, line: bytes, writer: asyncio.StreamWriter | None = None) -> bytes:
        try:
            request_id, cmd, args = parse_request(line)
        except BadRequest as exc:
            return encode_error(_salvage_id(line), exc.error_type, exc.message)

        def progress(data: object) -> None:
            if writer is None or writer.is_closing():
                return
            try:
                writer.write(encode_progress(request_id, data))
            except (msgspec.EncodeError, TypeError) as exc:
                log.error("control_progress_not_serialisable", cmd=cmd, error=str(exc))

        token = _progress_sink.set(progress)
        try:
            return await self._run(request_id, cmd, args)
        finally:
            _progress_sink.reset(token)

    async def _run(self, request_id: int | str | None, cmd: str, args: Args) -> bytes:
        try:
            async with asyncio.timeout(self._handler_timeout):
                result = await self._handler(cmd, args)
        except ControlError as exc:
            return encode_error(request_id, exc.error_type, exc.message)
        except AgentError as exc:
            return encode_error(request_id, type(exc).__name__, str(exc))
        except TimeoutError:
            log.warning("control_handler_timeout", cmd=cmd, timeout=self._handler_timeout)
            return encode_error(request_id, "Timeout", f"{cmd} did not finish in time")
        except Exception as exc:  # a handler bug must answer the caller, not kill the server
            log.exception("control_handler_crashed", cmd=cmd)
            return encode_error(request_id, "InternalError", f"{type(exc).__name__}: {exc}")
        try:
            return encode_result(request_id, result)
        except (msgspec.EncodeError, TypeError) as exc:
            log.error("control_result_not_serialisable", cmd=cmd, error=str(exc))
            return encode_error(request_id, "InternalError", f"result not serialisable: {exc}")


_request_ids = itertools.count(1)
_NO_PROGRESS = object()


def _progress_of(raw: bytes) -> object:
    """The data of an interim progress line, or _NO_PROGRESS for anything else."""
    if not raw.startswith(b'{"id":') or b'"progress":' not in raw:
        return _NO_PROGRESS
    try:
        value = msgspec.json.decode(raw)
    except msgspec.DecodeError:
        return _NO_PROGRESS
    if isinstance(value, dict) and "progress" in value and "ok" not in value:
        return value["progress"]
    return _NO_PROGRESS


async def control_call(
    path: str,
    cmd: str,
    args: Mapping[str, object] | None = None,
    timeout: float = DEFAULT_CALL_TIMEOUT_S,
    on_progress: ProgressSink | None = None,
) -> object:
    """Send one request and return its result; raise ControlError (or a subclass) otherwise.

    Interim progress lines go to on_progress (and are skipped without it)."""
    request_id = next(_request_ids)
    line = _encoder.encode({"id": request_id, "cmd": cmd, "args": dict(args or {})}) + b"\n"
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(timeout):
            try:
                reader, writer = await asyncio.open_unix_connection(path, limit=MAX_LINE_BYTES * 16)
            except (FileNotFoundError, ConnectionRefusedError) as exc:
                raise DaemonNotRunning(f"no daemon listening on {path}") from exc
            except PermissionError as exc:
                raise ControlError(f"{path}: permission denied") from exc
            writer.write(line)
            await writer.drain()
            while True:
                raw = await reader.readline()
                progress = _progress_of(raw)
                if progress is _NO_PROGRESS:
                    break
                if on_progress is not None:
                    on_progress(progress)
    except TimeoutError:
        raise ControlTimeout(f"{cmd}: no answer within {timeout:g}s") from None
    except ValueError:
        raise ControlError("reply too long") from None
    except ConnectionError as exc:
        raise ControlError(f"connection to daemon lost: {exc}") from exc
    finally:
        if writer is not None:
            writer.close()
    if not raw:
        raise ControlError("daemon closed the connection without answering")
    try:
        reply = msgspec.json.decode(raw, type=_Reply)
    except msgspec.DecodeError as exc:
        raise ControlError(f"unreadable reply: {exc}") from None
    if reply.id != request_id:
        raise ControlError(f"reply id {reply.id!r} does not match request {request_id}")
    if not reply.ok:
        error = reply.error or _ErrorBody(type="ControlError", message="unspecified error")
        raise ControlError(error.message, error.type)
    return reply.result
