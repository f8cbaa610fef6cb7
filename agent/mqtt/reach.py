"""The broker as the config describes it: settings from the config, and a one-shot reachability
check with those credentials and that TLS (used by `esim-agent check`)."""

from __future__ import annotations

import asyncio
import secrets
from pathlib import Path
from urllib.parse import unquote, urlsplit

import aiomqtt
from paho.mqtt.client import MQTT_CLEAN_START_FIRST_ONLY

from agent.config import Config, read_secret
from agent.errors import AgentError, ConfigError
from agent.mqtt.bridge import MqttSettings


class BrokerUnreachable(AgentError):
    """The broker refused us or could not be reached; the message says which and why."""


def settings_from_config(cfg: Config, config_path: str | None) -> MqttSettings:
    """MqttSettings for cfg; relative secret files are read beside the config file."""
    m = cfg.mqtt
    base = Path(config_path).parent if config_path else Path.cwd()
    return MqttSettings(
        host=m.host,
        port=m.port,
        username=m.username,
        password=read_secret(m.password, m.password_file, base),
        tls=m.tls is not None,
        tls_ca=m.tls.ca_file if m.tls else None,
        tls_cert=m.tls.cert_file if m.tls else None,
        tls_key=m.tls.key_file if m.tls else None,
        tls_insecure=m.tls.insecure if m.tls else False,
        client_id=cfg.mqtt_client_id,
        base_topic=m.base_topic,
        keepalive=m.keepalive,
        discovery_prefix=m.discovery_prefix if m.discovery else None,
        commands_enabled=m.commands.enabled,
        allowed_commands=frozenset(m.commands.allowed),
        command_token=read_secret(m.commands.token, m.commands.token_file, base),
        allowed_senders=frozenset(m.commands.allowed_senders),
        redact=m.redact,
    )


def observer_client(
    settings: MqttSettings,
    role: str,
    timeout: float,
    protocol: aiomqtt.ProtocolVersion = aiomqtt.ProtocolVersion.V5,
    queue_type: type[asyncio.Queue[aiomqtt.Message]] | None = None,
) -> aiomqtt.Client:
    """A client with the daemon's credentials and TLS but a fresh id `esim-agent-<role>-<hex>`.

    Never the daemon's own id: taking over its session would cut a running daemon off the broker.
    `queue_type` is aiomqtt's incoming message queue class (default asyncio.Queue).
    """
    tls = None
    if settings.tls or settings.tls_ca or settings.tls_cert or settings.tls_insecure:
        tls = aiomqtt.TLSParameters(
            ca_certs=settings.tls_ca, certfile=settings.tls_cert, keyfile=settings.tls_key
        )
    return aiomqtt.Client(
        settings.host,
        settings.port,
        username=settings.username,
        password=settings.password,
        identifier=f"esim-agent-{role}-{secrets.token_hex(4)}",
        protocol=protocol,
        # clean_session is 3.1.1's flag (paho refuses it on v5); clean_start is 5's.
        clean_start=True if protocol == aiomqtt.ProtocolVersion.V5 else MQTT_CLEAN_START_FIRST_ONLY,
        clean_session=None if protocol == aiomqtt.ProtocolVersion.V5 else True,
        timeout=timeout,
        keepalive=settings.keepalive,
        tls_params=tls,
        tls_insecure=settings.tls_insecure if tls is not None else None,
        queue_type=queue_type,
    )


async def check_broker(settings: MqttSettings, timeout: float) -> None:
    """Connect and disconnect once; BrokerUnreachable with the reason otherwise."""
    client = observer_client(settings, "check", timeout)
    where = f"{settings.host}:{settings.port}"
    try:
        async with client:
            pass
    except aiomqtt.MqttCodeError as exc:
        raise BrokerUnreachable(f"{where} refused the connection: {exc}") from None
    except aiomqtt.MqttError as exc:
        raise BrokerUnreachable(f"{where}: {exc}") from None
    except OSError as exc:  # TLS files missing or unreadable
        raise BrokerUnreachable(f"{where}: {exc.strerror or exc}") from None


def settings_from_url(url: str, *, base_topic: str, tls_ca: str | None = None) -> MqttSettings:
    """MqttSettings from `mqtt://[user[:pass]@]host[:port]` or `mqtts://…` (TLS, system CAs
    unless `tls_ca`); ConfigError for anything else."""
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
        raise ConfigError("--broker", None, f"{url!r} is not mqtt://host[:port] or mqtts://…")
    tls = parts.scheme == "mqtts"
    try:
        port = parts.port or (8883 if tls else 1883)
    except ValueError:
        raise ConfigError("--broker", None, f"bad port in {url!r}") from None
    return MqttSettings(
        host=parts.hostname,
        port=port,
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password is not None else None,
        tls=tls,
        tls_ca=tls_ca,
        base_topic=base_topic,
        discovery_prefix=None,
    )
